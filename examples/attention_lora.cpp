// Which weights, which rank: the LoRA paper's Tables 5 and 6 (arXiv 2106.09685, section 7) at
// small scale, on a self-attention classifier whose W_q, W_k, W_v, W_o are lora::LoRALinear.
//
//   1. Pretrain the whole model (dense projections, embeddings, head) on the upstream task
//      "which alpha token is in the sequence" (attention/sequence_tasks.hpp).
//   2. Downstream, "which beta token is in the sequence": freeze the base and adapt
//      (a) at a fixed budget of trainable parameters: LoRA on {Wq}, {Wk}, {Wv}, {Wo} (r = 8),
//          {Wq, Wv} (r = 4), {Wq, Wk, Wv, Wo} (r = 2);
//      (b) on {Wq, Wv} and on all four, ranks 1, 2, 4, 8, 16, 64;
//      against the frozen base and full fine-tuning of every parameter.
//   3. Print both tables and write them as JSON (attention_tables.json, or --json PATH).
//
// Usage: attention_lora [--quick] [--seeds N] [--threads N] [--json PATH]
//                       [--pretrain-steps N] [--adapt-steps N] [--lora-lr X] [--full-lr X] [--alpha
//                       X]
#include "attention/attention_model.hpp"
#include "attention/sequence_tasks.hpp"
#include "attention/train.hpp"

#include <lora/core.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <fstream>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace {

using attention::AttentionModel;
using attention::Batch;
using attention::Which;
using Model = AttentionModel<float>;

struct Settings {
  bool quick = false;
  int seeds = 5;
  int threads = 2;
  std::string json_path = "attention_tables.json";
  attention::TaskSpec task;
  attention::ModelConfig model;
  int upstream_train = 8000, downstream_train = 1000, test_size = 2000;
  attention::TrainOptions pretrain, full, lora;
  double lora_alpha = 8;
};

Settings parse(int argc, char** argv) {
  Settings s;
  std::vector<std::pair<std::string, std::string>> overrides;  // applied after --quick
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--quick") {
      s.quick = true;
    } else if (a == "--threads" && i + 1 < argc) {
      s.threads = std::atoi(argv[++i]);
    } else if (a == "--json" && i + 1 < argc) {
      s.json_path = argv[++i];
    } else if ((a == "--seeds" || a == "--pretrain-steps" || a == "--adapt-steps" ||
                a == "--lora-lr" || a == "--full-lr" || a == "--alpha") &&
               i + 1 < argc) {
      overrides.emplace_back(a, argv[++i]);
    } else {
      throw std::invalid_argument(
          "unknown argument '" + a +
          "'; usage: attention_lora [--quick] [--seeds N] [--threads N] [--json PATH] "
          "[--pretrain-steps N] [--adapt-steps N] [--lora-lr X] "
          "[--full-lr X] [--alpha X]");
    }
  }
  if (s.threads < 1) throw std::invalid_argument("--threads must be at least 1");
  s.model.vocab = s.task.vocab();
  s.model.seq_len = s.task.seq_len();
  s.model.d_model = 64;  // >= 64 so that rank 64 fits every 64 x 64 projection
  s.model.heads = 2;
  s.model.layers = 1;
  s.model.classes = s.task.classes;
  s.model.pooling = attention::Pooling::First;

  s.pretrain.steps = 1500;
  s.pretrain.adamw.lr = 3e-3;
  s.pretrain.adamw.weight_decay = 1e-2;
  s.full.steps = 600;
  s.full.adamw.lr = 1e-3;
  s.full.adamw.weight_decay = 1e-2;
  s.lora.steps = 600;
  s.lora.adamw.lr = 3e-3;
  s.lora.adamw.weight_decay = 0;
  if (s.quick) {
    s.seeds = 1;
    s.upstream_train = 3000;
    s.downstream_train = 500;
    s.test_size = 500;
    s.pretrain.steps = 400;
    s.full.steps = s.lora.steps = 150;
  }
  for (const auto& [flag, value] : overrides) {
    if (flag == "--seeds") s.seeds = std::stoi(value);
    if (flag == "--pretrain-steps") s.pretrain.steps = std::stoi(value);
    if (flag == "--adapt-steps") s.full.steps = s.lora.steps = std::stoi(value);
    if (flag == "--lora-lr") s.lora.adamw.lr = std::stod(value);
    if (flag == "--full-lr") s.full.adamw.lr = std::stod(value);
    if (flag == "--alpha") s.lora_alpha = std::stod(value);
  }
  if (s.seeds < 1) throw std::invalid_argument("--seeds must be at least 1");
  return s;
}

struct Config {
  std::vector<Which> which;
  int rank = 0;
  std::string label() const {
    std::string out = "{";
    for (std::size_t i = 0; i < which.size(); ++i)
      out += (i ? ", " : "") + std::string(attention::name(which[i]));
    return out + "}";
  }
  std::string key() const { return label() + " r=" + std::to_string(rank); }
};

struct Result {
  long long trainable = 0;
  std::vector<double> accuracy;  // one per seed
  double mean() const {
    double m = 0;
    for (double a : accuracy) m += a;
    return m / accuracy.size();
  }
  double stddev() const {
    if (accuracy.size() < 2) return 0;
    double v = 0;
    for (double a : accuracy) v += (a - mean()) * (a - mean());
    return std::sqrt(v / (accuracy.size() - 1));
  }
};

/// Calls f(0) .. f(n - 1) on `threads` threads (the calling one included); rethrows the first
/// exception once all have stopped.
template <typename F>
void parallel_for(std::size_t n, int threads, F f) {
  std::atomic<std::size_t> next{0};
  std::exception_ptr error;
  std::mutex error_mutex;
  auto work = [&] {
    for (std::size_t i = next++; i < n; i = next++) {
      try {
        f(i);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (!error) error = std::current_exception();
        next = n;  // stop handing out work
      }
    }
  };
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t) pool.emplace_back(work);
  work();
  for (auto& t : pool) t.join();
  if (error) std::rethrow_exception(error);
}

struct Downstream {
  Downstream(std::string n, std::string d, int s)
      : name(std::move(n)), description(std::move(d)), shift(s) {}
  std::string name, description;
  int shift = 0;  // label of b_j = (j + shift) mod K
  Result frozen, full;
  std::map<std::string, Result> lora;  // by Config::key()
};

nlohmann::json row(const std::string& name, const Config* c, const Result& r) {
  nlohmann::json j;
  j["name"] = name;
  std::vector<std::string> w;
  if (c)
    for (Which x : c->which) w.push_back(attention::name(x));
  j["matrices"] = w;
  j["rank"] = c ? c->rank : 0;
  j["trainable_parameters"] = r.trainable;
  j["accuracy"] = r.mean();
  j["accuracy_std"] = r.stddev();
  j["accuracy_per_seed"] = r.accuracy;
  return j;
}

void print_row(const std::string& name, int rank, const Result& r) {
  std::printf("  %-18s %4s %9lld   %5.1f %%  (+- %4.1f)   ", name.c_str(),
              rank ? std::to_string(rank).c_str() : "-", r.trainable, 100 * r.mean(),
              100 * r.stddev());
  for (double a : r.accuracy) std::printf(" %5.1f", 100 * a);
  std::printf("\n");
}

void print_header() {
  std::printf("  %-18s %4s %9s   %-20s    %s\n", "adapted", "rank", "trainable",
              "accuracy (mean, sd)", "per seed");
}

}  // namespace

int main(int argc, char** argv) try {
  const Settings S = parse(argc, argv);
  const auto start = std::chrono::steady_clock::now();
  const std::vector<Which> qv{Which::Q, Which::V}, all{Which::Q, Which::K, Which::V, Which::O};
  std::vector<Config> budget{{{Which::Q}, 8}, {{Which::K}, 8}, {{Which::V}, 8},
                             {{Which::O}, 8}, {qv, 4},         {all, 2}};
  std::vector<Config> ranks;
  for (const auto& w : {qv, all})
    for (int r : {1, 2, 4, 8, 16, 64}) ranks.push_back({w, r});

  std::printf(
      "LoRA on W_q, W_k, W_v, W_o of a self-attention classifier (d_model %d, %d head(s), "
      "%d layer(s), sequences of %d tokens)\n%s mode, %d seed(s)\n\n",
      S.model.d_model, S.model.heads, S.model.layers, S.model.seq_len, S.quick ? "quick" : "full",
      S.seeds);

  // Two downstream tasks on the same inputs (attention/sequence_tasks.hpp): the reversed
  // priority alone, and the reversed priority with relabelled classes (label of b_j = j + 1 mod K).
  std::vector<Downstream> tasks{
      {"beta_first",
       "label = index of the beta token (both tokens present); needs a new attention pattern", 0},
      {"beta_first_shifted",
       "label = (index of the beta token + 1) mod K; needs a new attention pattern and a "
       "relabelling of the values read",
       1}};
  std::vector<Config> configs = budget;  // every configuration, each once
  for (const Config& c : ranks)
    if (std::none_of(configs.begin(), configs.end(),
                     [&](const Config& b) { return b.key() == c.key(); }))
      configs.push_back(c);
  std::vector<double> upstream_acc;
  for (int seed = 0; seed < S.seeds; ++seed) {
    lora::Rng data_rng(1000 + seed);
    const Batch up_train =
        attention::make_task(attention::Rule::AlphaFirst, 0.5, S.upstream_train, S.task, data_rng);
    const Batch up_test =
        attention::make_task(attention::Rule::AlphaFirst, 0.5, S.test_size, S.task, data_rng);
    lora::Rng init_rng(2000 + seed);
    Model base(S.model, init_rng);
    attention::TrainOptions pre = S.pretrain;
    pre.seed = 3000 + seed;
    const double pre_loss = attention::train(base, up_train, pre);
    upstream_acc.push_back(base.accuracy(up_test));
    std::printf("seed %d: pretrained (final loss %.4f), upstream test accuracy %.1f %%\n", seed,
                pre_loss, 100 * upstream_acc.back());

    // Every (task, configuration) is an independent job: a copy of the base, trained and tested
    // on its own, so the results do not depend on the number of threads.
    std::vector<Batch> trains, tests;
    for (Downstream& task : tasks) {
      trains.push_back(attention::make_task(attention::Rule::BetaFirst, 1.0, S.downstream_train,
                                            S.task, data_rng, task.shift));
      tests.push_back(attention::make_task(attention::Rule::BetaFirst, 1.0, S.test_size, S.task,
                                           data_rng, task.shift));
      task.frozen.accuracy.push_back(base.accuracy(tests.back()));
    }
    struct Job {
      std::size_t task;
      const Config* config;  // nullptr: full fine-tuning
      Result* result;
    };
    std::vector<Job> jobs;
    for (std::size_t t = 0; t < tasks.size(); ++t) {
      jobs.push_back({t, nullptr, &tasks[t].full});
      for (const Config& c : configs) {
        Result& r = tasks[t].lora[c.key()];  // created here, before any thread starts
        if (r.accuracy.size() == static_cast<std::size_t>(seed)) {  // once: in both tables
          r.accuracy.push_back(0);
          jobs.push_back({t, &c, &r});
        }
      }
    }
    parallel_for(jobs.size(), S.threads, [&](std::size_t i) {
      const Job& job = jobs[i];
      Model m = base;
      attention::TrainOptions o = job.config ? S.lora : S.full;
      o.seed = (job.config ? 6000 : 4000) + seed;
      if (job.config) {  // else full fine-tuning: every parameter trains
        lora::LoRAConfig lc;
        lc.rank = job.config->rank;
        lc.alpha = S.lora_alpha;
        lc.init = lora::Init::KaimingUniform;
        lc.seed = 5000 + 100 * seed;
        m.adapt(job.config->which, lc);
      }
      attention::train(m, trains[job.task], o);
      job.result->trainable = m.trainable_parameter_count();
      job.result->accuracy.resize(seed + 1);
      job.result->accuracy[seed] = m.accuracy(tests[job.task]);
    });
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

  double up_mean = 0;
  for (double a : upstream_acc) up_mean += a / upstream_acc.size();
  std::printf("\nUpstream (alpha first) test accuracy of the pretrained base: %.1f %%\n",
              100 * up_mean);
  for (Downstream& task : tasks) {
    std::printf(
        "\n== Downstream task %s: %s.\nTest accuracy, mean over %d seed(s) (+- sd); chance is "
        "%.1f %%\n",
        task.name.c_str(), task.description.c_str(), S.seeds, 100.0 / S.task.classes);
    std::printf("\nTable 1: a fixed budget of trainable parameters\n");
    print_header();
    print_row("frozen base", 0, task.frozen);
    for (const Config& c : budget) print_row(c.label(), c.rank, task.lora[c.key()]);
    print_row("full fine-tuning", 0, task.full);
    std::printf("\nTable 2: the rank r\n");
    print_header();
    for (const Config& c : ranks) print_row(c.label(), c.rank, task.lora[c.key()]);
  }
  std::printf("\n%.1f s in all\n", seconds);

  nlohmann::json j;
  j["settings"] = {{"mode", S.quick ? "quick" : "full"},
                   {"seeds", S.seeds},
                   {"d_model", S.model.d_model},
                   {"heads", S.model.heads},
                   {"layers", S.model.layers},
                   {"seq_len", S.model.seq_len},
                   {"vocab", S.model.vocab},
                   {"classes", S.model.classes},
                   {"upstream_train", S.upstream_train},
                   {"downstream_train", S.downstream_train},
                   {"test_size", S.test_size},
                   {"pretrain_steps", S.pretrain.steps},
                   {"adapt_steps", S.lora.steps},
                   {"lora_alpha", S.lora_alpha},
                   {"lora_lr", S.lora.adamw.lr},
                   {"full_lr", S.full.adamw.lr},
                   {"seconds", seconds}};
  j["upstream_accuracy"] = up_mean;
  j["chance"] = 1.0 / S.task.classes;
  for (Downstream& task : tasks) {
    nlohmann::json t;
    t["name"] = task.name;
    t["description"] = task.description;
    t["label_shift"] = task.shift;
    t["frozen_base"] = row("frozen base", nullptr, task.frozen);
    t["full_fine_tuning"] = row("full fine-tuning", nullptr, task.full);
    for (const Config& c : budget)
      t["table_budget"].push_back(row(c.label(), &c, task.lora[c.key()]));
    for (const Config& c : ranks) t["table_rank"].push_back(row(c.label(), &c, task.lora[c.key()]));
    j["downstream"].push_back(t);
  }
  // Write to a temporary file and rename, so that a failed run never leaves half a file.
  const std::string tmp = S.json_path + ".tmp";
  {
    std::ofstream out(tmp);
    out << j.dump(2) << "\n";
    if (!out) throw std::runtime_error("cannot write " + tmp);
  }
  if (std::rename(tmp.c_str(), S.json_path.c_str()) != 0)
    throw std::runtime_error("cannot rename " + tmp + " to " + S.json_path);
  std::printf("wrote %s\n", S.json_path.c_str());
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "attention_lora: %s\n", e.what());
  return 1;
}
