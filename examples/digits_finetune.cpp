// The main demo: LoRA fine-tuning on real data, the UCI handwritten digits (8 x 8 images).
//
//   1. upstream:   train an MLP 64 -> 128 -> 128 -> 10 (ReLU, softmax cross-entropy) on the digits;
//   2. downstream: the same digits turned 90 degrees. Freeze the base, wrap every linear layer in
//                  lora::LoRALinear and train only the adapters, for several ranks, as LoRA
//                  and as DoRA (a learned magnitude per output, config.use_dora) at each rank;
//                  and, for comparison, fine-tune every weight of a copy of the base;
//   3. a table: rank, trainable parameters, downstream accuracy, upstream accuracy with the
//      adapter disabled (it must be the pre-adaptation figure exactly), training time;
//   4. merge the best adapter, check merged and unmerged predictions agree, time inference;
//   5. demo_summary.json (and demo_curves.dat) in --out DIR (default: the working folder;
//      scripts/demo passes build/demo).
//
// Usage: digits_finetune [--quick] [--base fp32|bf16|nf4] [--init NAME] [--ranks 1,2,...]
//                        [--data PATH] [--out DIR]
//   --quick  fewer epochs and ranks: the small-scale check that ctest runs.
//   --init   how the adapters start, by PEFT's name: kaiming (PEFT's true, the default),
//            gaussian, pissa, pissa_niter_N, olora, loftq (with --base nf4), orthogonal. PiSSA,
//            OLoRA and LoftQ change the frozen base to a residual (docs/inits.md); DoRA runs are
//            skipped with them.
// Exit status 1 when one of the demo's claims does not hold (see "checks" at the end).
#include "digits/dataset.hpp"
#include "digits/mlp.hpp"

#include <lora/base_init.hpp>
#include <lora/bf16_frozen_weight.hpp>
#include <lora/core.hpp>
#include <lora/ggml_frozen_weight.hpp>
#include <lora/nf4_frozen_weight.hpp>
#include <lora/optim.hpp>
#include <lora/peft.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#ifndef DIGITS_DATA_FILE
#define DIGITS_DATA_FILE "examples/data/digits.csv.gz"
#endif

namespace {

using Clock = std::chrono::steady_clock;
using Matrix = Eigen::MatrixXf;
using digits::Dataset;
using digits::DenseLinear;
using digits::Mlp;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

struct Settings {
  bool quick = false;
  std::string base = "fp32";  // frozen storage of the LoRA models: fp32, bf16, nf4 or q4_k
  std::string data = DIGITS_DATA_FILE;
  std::string out = ".";
  int batch = 32;
  int upstream_epochs = 60;
  int lora_epochs = 60;
  int full_epochs = 60;
  std::vector<int> ranks{1, 2, 4, 8, 16};
  double upstream_lr = 2e-3;
  double lora_lr = 1e-2;
  double full_lr = 1e-2;
  double lora_dropout = 0.0;
  bool validate = false;  // tuning: hold 20% of the training set out and report on it, not on test
  // How the LoRA adapters start (--init): PEFT's names. PiSSA, OLoRA and LoftQ factor the fp32 W0
  // and leave the residual in the frozen storage (no DoRA runs then: they exclude each other).
  std::string init = "kaiming";
  lora::Init init_kind = lora::Init::KaimingUniform;
  int svd_iterations = 0;
};

struct EpochStats {
  int epoch;
  double loss, train_acc, test_acc, elapsed;
};

struct Run {
  std::string name;
  int rank = 0;       // 0: full fine-tuning
  bool dora = false;  // DoRA (a learned magnitude per output) rather than plain LoRA
  std::vector<int> layer_ranks;
  Eigen::Index trainable = 0;
  double downstream_acc = 0, upstream_acc = 0, seconds = 0;
  bool upstream_exact = false;  // adapter-disabled logits bit-identical to the base model's
  std::vector<EpochStats> curve;
};

template <typename Layer>
double accuracy(const Mlp<Layer>& model, const Dataset& d, bool with_adapter = true) {
  return 100.0 * digits::count_correct(model.predict(d.X, with_adapter), d.y) / double(d.size());
}

/// Trains `model` with AdamW on `train` in shuffled batches; a progress line per epoch.
template <typename Layer>
std::vector<EpochStats> fit(Mlp<Layer>& model, const Dataset& train, const Dataset& test,
                            int epochs, double lr, std::uint64_t seed, const std::string& label,
                            const Settings& s) {
  lora::AdamWOptions opt_options;
  opt_options.lr = lr;
  opt_options.weight_decay = 0.0;
  lora::AdamW<float> opt(model.parameters(), opt_options);
  lora::Rng rng(seed);
  const int n = static_cast<int>(train.size());
  Matrix Xb(train.X.rows(), s.batch);
  std::vector<int> yb(std::size_t(s.batch));
  std::vector<EpochStats> curve;
  const auto t0 = Clock::now();
  for (int epoch = 1; epoch <= epochs; ++epoch) {
    model.train();
    const std::vector<int> order = digits::permutation(n, rng);
    double loss_sum = 0;
    int correct = 0;
    // A cosine learning-rate schedule from lr down to lr / 20 over the run.
    const double progress = double(epoch - 1) / std::max(1, epochs - 1);
    opt.set_learning_rate(lr * (0.05 + 0.95 * 0.5 * (1 + std::cos(3.141592653589793 * progress))));
    for (int start = 0; start < n; start += s.batch) {
      const int m = std::min(s.batch, n - start);
      for (int j = 0; j < m; ++j) {
        Xb.col(j) = train.X.col(order[std::size_t(start + j)]);
        yb[std::size_t(j)] = train.y[std::size_t(order[std::size_t(start + j)])];
      }
      opt.zero_grad();
      loss_sum += m * model.forward_backward(Xb.leftCols(m), yb.data());
      correct +=
          digits::count_correct(model.logits(), std::vector<int>(yb.begin(), yb.begin() + m));
      opt.step();
    }
    model.eval();
    const EpochStats e{epoch, loss_sum / n, 100.0 * correct / n, accuracy(model, test),
                       seconds_since(t0)};
    curve.push_back(e);
    std::printf("  %-8s epoch %2d/%d  loss %.4f  train %5.1f%%  test %5.1f%%  %6.2f s\n",
                label.c_str(), epoch, epochs, e.loss, e.train_acc, e.test_acc, e.elapsed);
  }
  return curve;
}

/// Median wall time of one call of f, in microseconds.
template <typename F>
double median_us(F&& f, int reps) {
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    const auto t0 = Clock::now();
    f();
    t.push_back(1e6 * seconds_since(t0));
  }
  std::nth_element(t.begin(), t.begin() + reps / 2, t.end());
  return t[std::size_t(reps / 2)];
}

Settings parse(int argc, char** argv) {
  Settings s;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--base" && i + 1 < argc) {
      s.base = argv[++i];
      if (s.base != "fp32" && s.base != "bf16" && s.base != "nf4" && s.base != "q4_k") {
        std::fprintf(stderr, "--base must be fp32, bf16, nf4 or q4_k, got %s\n", s.base.c_str());
        std::exit(2);
      }
    } else if (a == "--init" && i + 1 < argc) {
      s.init = argv[++i];
      const bool known =
          s.init == "kaiming" || lora::init_from_peft_name(s.init, s.init_kind, s.svd_iterations);
      if (!known || s.init == "false") {
        std::fprintf(stderr,
                     "--init must be kaiming (PEFT's true), gaussian, pissa, pissa_niter_N, olora, "
                     "loftq or orthogonal, got %s\n",
                     s.init.c_str());
        std::exit(2);
      }
      if (s.init == "true") s.init = "kaiming";
    } else if (a == "--ranks" && i + 1 < argc) {
      s.ranks.clear();
      std::stringstream list(argv[++i]);
      for (std::string r; std::getline(list, r, ',');) s.ranks.push_back(std::stoi(r));
    } else if (a == "--quick") {
      s.quick = true;
      s.upstream_epochs = 12;
      s.lora_epochs = 12;
      s.full_epochs = 12;
      s.ranks = {8};
    } else if (a == "--validate") {
      s.validate = true;
    } else if (a == "--epochs" && i + 1 < argc) {
      s.upstream_epochs = s.lora_epochs = s.full_epochs = std::stoi(argv[++i]);
    } else if (a == "--lora-lr" && i + 1 < argc) {
      s.lora_lr = std::stod(argv[++i]);
    } else if (a == "--full-lr" && i + 1 < argc) {
      s.full_lr = std::stod(argv[++i]);
    } else if (a == "--dropout" && i + 1 < argc) {
      s.lora_dropout = std::stod(argv[++i]);
    } else if (a == "--data" && i + 1 < argc) {
      s.data = argv[++i];
    } else if (a == "--out" && i + 1 < argc) {
      s.out = argv[++i];
    } else {
      std::fprintf(
          stderr,
          "usage: %s [--quick] [--base fp32|bf16|nf4|q4_k] [--init NAME] [--ranks 1,2,...] "
          "[--validate] [--epochs N] [--lora-lr X] [--full-lr X] [--dropout P] [--data PATH] "
          "[--out DIR]\n",
          argv[0]);
      std::exit(2);
    }
  }
  return s;
}

/// llama.cpp's Q4_K as the frozen base, quantized by llama.cpp's own quantizer. The layers have 64
/// and 128 input features, less than Q4_K's super-block of 256: each row is padded exactly with
/// zeros to 256 values (llama-quantize would fall back to Q5_0 for such tensors instead, and the
/// demo would then hold no Q4_K at all); the padding is counted in W0's bytes.
struct Q4KFrozenWeight : lora::GgmlFrozenWeight {
  explicit Q4KFrozenWeight(const Eigen::MatrixXf& W0)
      : lora::GgmlFrozenWeight(quantize(W0, lora::io::GgmlType::Q4_K)) {}
};

/// Bytes the LoRA model's frozen storages hold for W0 (all layers): stored_bytes() where the
/// storage reports it, else d * k * element size.
template <typename Frozen>
std::size_t w0_bytes(const Mlp<lora::LoRALinear<float, Frozen>>& model) {
  std::size_t bytes = 0;
  for (const auto& l : model.layers()) {
    if constexpr (lora::storage_detail::has_stored_bytes<Frozen>::value) {
      bytes += l.frozen().stored_bytes();
    } else {
      const std::size_t element = std::is_same_v<Frozen, lora::Bf16FrozenWeight> ? 2 : 4;
      bytes += std::size_t(l.out_features() * l.in_features()) * element;
    }
  }
  return bytes;
}

/// The whole demo for one frozen-weight storage (the layer type is the only thing to swap).
template <typename Frozen>
int run(const Settings& s) {
  const auto t_start = Clock::now();
  const Dataset all = digits::load_csv_gz(s.data);
  auto [train_up, test_up] = digits::split(all, 0.2, /*seed=*/2024);
  if (s.validate) {  // the test set is not looked at: a validation split of the training set
    auto [t, v] = digits::split(train_up, 0.2, /*seed=*/77);
    train_up = std::move(t);
    test_up = std::move(v);
    std::printf("--validate: reporting on a validation split of the training set, not on test\n");
  }
  const Dataset train_down = digits::rotate90(train_up), test_down = digits::rotate90(test_up);
  std::printf(
      "digits: %lld images (8x8), %lld train / %lld test; downstream task: rotated 90 deg\n",
      (long long)all.size(), (long long)train_up.size(), (long long)test_up.size());

  // 1. Upstream: a fully trained base model.
  std::printf("\n[1] upstream: MLP 64-128-128-10 trained on the digits\n");
  Mlp<DenseLinear<float>> base = digits::make_base_mlp();
  const Eigen::Index full_count = base.trainable_parameter_count();
  const auto t_up = Clock::now();
  const auto up_curve =
      fit(base, train_up, test_up, s.upstream_epochs, s.upstream_lr, 1, "base", s);
  const double up_seconds = seconds_since(t_up);
  const double base_on_rotated = accuracy(base, test_down);
  std::printf("upstream test accuracy %.2f%%; the same model on rotated digits: %.2f%%\n",
              accuracy(base, test_up), base_on_rotated);
  // The base as the LoRA models hold it (W0 in the frozen storage, no adapter): the reference
  // for "adapter disabled". With an fp32 base it is the trained model itself; a bf16 base rounds
  // W0 and X, which can move a borderline prediction.
  const Matrix base_logits_up = digits::make_lora_mlp<Frozen>(base, 1, 101, s.lora_dropout)
                                    .predict(test_up.X, /*with_adapter=*/false);
  const double upstream_before =
      100.0 * digits::count_correct(base_logits_up, test_up.y) / double(test_up.size());
  if (s.base != "fp32")
    std::printf("upstream test accuracy on the %s frozen base: %.2f%%\n", s.base.c_str(),
                upstream_before);

  // 2. Downstream: LoRA adapters of each rank on the frozen base, and full fine-tuning.
  std::vector<Run> runs;
  std::optional<Mlp<lora::LoRALinear<float, Frozen>>> best_model;  // kept for step 4
  std::size_t best = 0;
  for (int r : s.ranks) {
    std::printf("\n[2] downstream: LoRA r = %d on every layer (base frozen)\n", r);
    auto model = digits::make_lora_mlp<Frozen>(base, r, 100 + std::uint64_t(r), s.lora_dropout,
                                               /*dora=*/false, s.init_kind, s.svd_iterations);
    Run run;
    run.name = "LoRA r=" + std::to_string(r);
    run.rank = r;
    for (const auto& l : model.layers()) run.layer_ranks.push_back(int(l.rank()));
    run.trainable = model.trainable_parameter_count();
    const auto t0 = Clock::now();
    run.curve = fit(model, train_down, test_down, s.lora_epochs, s.lora_lr, 10 + std::uint64_t(r),
                    "r=" + std::to_string(r), s);
    run.seconds = seconds_since(t0);
    model.eval();
    run.downstream_acc = accuracy(model, test_down);
    const Matrix disabled = model.predict(test_up.X, /*with_adapter=*/false);
    run.upstream_acc = 100.0 * digits::count_correct(disabled, test_up.y) / double(test_up.size());
    run.upstream_exact = disabled == base_logits_up;
    runs.push_back(run);
    if (!best_model || run.downstream_acc > runs[best].downstream_acc) {  // ties: smaller rank
      best = runs.size() - 1;
      best_model = std::move(model);
    }

    // DoRA at the same rank, from the same seeds: d more trainable numbers per layer. (Not with
    // PiSSA, OLoRA or LoftQ, which change the base DoRA normalises by.)
    if (lora::changes_base(s.init_kind)) continue;
    std::printf("\n[2] downstream: DoRA r = %d on every layer (base frozen)\n", r);
    auto dora = digits::make_lora_mlp<Frozen>(base, r, 100 + std::uint64_t(r), s.lora_dropout,
                                              /*dora=*/true);
    Run drun;
    drun.name = "DoRA r=" + std::to_string(r);
    drun.rank = r;
    drun.dora = true;
    for (const auto& l : dora.layers()) drun.layer_ranks.push_back(int(l.rank()));
    drun.trainable = dora.trainable_parameter_count();
    const auto t1 = Clock::now();
    drun.curve = fit(dora, train_down, test_down, s.lora_epochs, s.lora_lr, 10 + std::uint64_t(r),
                     "dora=" + std::to_string(r), s);
    drun.seconds = seconds_since(t1);
    dora.eval();
    drun.downstream_acc = accuracy(dora, test_down);
    const Matrix dora_disabled = dora.predict(test_up.X, /*with_adapter=*/false);
    drun.upstream_acc =
        100.0 * digits::count_correct(dora_disabled, test_up.y) / double(test_up.size());
    drun.upstream_exact = dora_disabled == base_logits_up;
    runs.push_back(drun);
  }
  std::printf("\n[2] downstream: full fine-tuning of every weight (a copy of the base)\n");
  Mlp<DenseLinear<float>> full = base;
  Run full_run;
  full_run.name = "full FT";
  full_run.trainable = full.trainable_parameter_count();
  {
    const auto t0 = Clock::now();
    full_run.curve = fit(full, train_down, test_down, s.full_epochs, s.full_lr, 99, "full", s);
    full_run.seconds = seconds_since(t0);
  }
  full_run.downstream_acc = accuracy(full, test_down);
  full_run.upstream_acc = accuracy(full, test_up);

  // 3. The table.
  std::printf("\n[3] results (test sets: %lld images)\n", (long long)test_up.size());
  auto row = [](const std::string& method, const std::string& ranks, long long trainable,
                double percent, double down, const std::string& up, double secs) {
    std::printf("| %-9s | %-8s | %7lld (%5.1f%%) | %10.2f%% | %-21s | %7.2f |\n", method.c_str(),
                ranks.c_str(), trainable, percent, down, up.c_str(), secs);
  };
  auto pct = [](double a, const char* mark) {
    char b[32];
    std::snprintf(b, sizeof b, "%.2f%% %s", a, mark);
    return std::string(b);
  };
  std::printf(
      "| method    | layer r  | trainable params | downstream  | upstream, adapter off | "
      "train s |\n");
  std::printf(
      "|-----------|----------|------------------|-------------|-----------------------|"
      "---------|\n");
  row("base", "-", full_count, 100.0, base_on_rotated, pct(upstream_before, ""), up_seconds);
  for (const auto& r : runs) {
    std::string lr;
    for (int x : r.layer_ranks) lr += (lr.empty() ? "" : "/") + std::to_string(x);
    row(r.name, lr, r.trainable, 100.0 * double(r.trainable) / double(full_count), r.downstream_acc,
        pct(r.upstream_acc, r.upstream_exact ? "(=)" : "(X)"), r.seconds);
  }
  row("full FT", "-", full_run.trainable, 100.0, full_run.downstream_acc,
      pct(full_run.upstream_acc, "(no adapter)"), full_run.seconds);
  std::printf(
      "base: the upstream model before adaptation (its downstream figure: the rotated test set).\n"
      "(=): with the adapter disabled the LoRA model's upstream logits are bit-identical to the\n"
      "base model's ((X): they are not). Full FT's upstream figure is the fine-tuned model "
      "itself.\n"
      "Layer ranks are min(r, d, k): the 10 x 128 output layer caps r at 10.\n");

  // 4. Merge the best adapter; merged and unmerged must agree; inference latency.
  std::printf("\n[4] merge the best adapter (LoRA r = %d) and time inference on %lld images\n",
              runs[best].rank, (long long)test_down.size());
  auto& model = *best_model;
  const Matrix unmerged = model.predict(test_down.X);
  const int reps = s.quick ? 20 : 200;
  const double base_us = median_us([&] { base.predict(test_down.X); }, reps);
  const double unmerged_us = median_us([&] { model.predict(test_down.X); }, reps);
  const std::size_t frozen_bytes = w0_bytes(model);  // W0 as trained on (before the merge)
  // PiSSA and OLoRA adapters belong on their residual base. Saved as plain adapters (PEFT's
  // path_initial_model_for_weight_conversion: rank 2r, init_lora_weights true), they load onto
  // the original fp32 model and must give the trained model's outputs, to float rounding.
  std::optional<double> plain_diff;
  if constexpr (std::is_same_v<Frozen, lora::DenseFrozenWeight<float>>) {
    // The plain adapter has rank 2r, which lora (unlike PEFT) holds to at most min(d, k): the
    // 10 x 128 output layer allows it up to r = 5 (--ranks 4 does).
    bool representable = true;
    for (const auto& l : model.layers())
      representable = representable && 2 * l.rank() <= std::min(l.out_features(), l.in_features());
    if (lora::changes_base(s.init_kind) && !representable)
      std::printf(
          "not saved as a plain adapter: its rank 2r would exceed min(d, k) of a layer "
          "(run with --ranks 5 or less)\n");
    if (lora::changes_base(s.init_kind) && representable) {
      const std::string dir = s.out + "/plain_adapter";
      std::map<std::string, const lora::LoRALinear<float>*> trained;
      auto original = digits::make_lora_mlp(base, runs[best].rank, 1);  // W0 itself, Kaiming
      std::map<std::string, lora::LoRALinear<float>*> onto;
      for (std::size_t i = 0; i < model.layers().size(); ++i) {
        trained["layers." + std::to_string(i)] = &model.layers()[i];
        onto["layers." + std::to_string(i)] = &original.layers()[i];
      }
      lora::peft::SaveOptions convert;
      convert.convert_to_plain = true;
      lora::peft::save_adapter(dir, trained, convert);
      lora::peft::load_adapter(dir, onto);
      plain_diff = (original.predict(test_down.X) - unmerged).cwiseAbs().maxCoeff();
      std::printf(
          "saved as a plain adapter (%s), loaded onto the original fp32 model: max |logit "
          "difference| %.2e\n",
          dir.c_str(), *plain_diff);
    }
  }
  for (auto& l : model.layers()) l.merge();
  const Matrix merged = model.predict(test_down.X);
  const double merged_us = median_us([&] { model.predict(test_down.X); }, reps);
  const double max_diff = (merged - unmerged).cwiseAbs().maxCoeff();
  int agree = 0;
  for (Eigen::Index j = 0; j < merged.cols(); ++j) {
    Eigen::Index a = 0, b = 0;
    merged.col(j).maxCoeff(&a);
    unmerged.col(j).maxCoeff(&b);
    agree += a == b;
  }
  std::printf("merged vs unmerged: max |logit difference| %.2e, same prediction for %d/%lld\n",
              max_diff, agree, (long long)merged.cols());
  std::printf(
      "latency per batch of %lld (median of %d): base %.1f us, unmerged %.1f us, merged "
      "%.1f us\n",
      (long long)test_down.size(), reps, base_us, unmerged_us, merged_us);

  // The demo's claims.
  // The rank-8 run (or, when --ranks has no 8, the plain run of the highest rank).
  const Run* r8 = nullptr;
  for (const auto& r : runs) {
    if (r.dora) continue;
    if (r8 == nullptr || r.rank == 8 || (r8->rank != 8 && r.rank > r8->rank)) r8 = &r;
  }
  const std::string r8_name = "r = " + std::to_string(r8 ? r8->rank : 8);
  bool all_exact = true;
  // With PiSSA, OLoRA or LoftQ the adapter is part of the base's value: disabling it leaves the
  // residual, not the base, so this check does not apply.
  for (const auto& r : runs)
    all_exact = all_exact && (lora::changes_base(s.init_kind) ||
                              (r.upstream_exact && r.upstream_acc == upstream_before));
  struct Check {
    std::string what;
    bool ok;
  };
  // fp32: merging reorders a few roundings. bf16: the merged weight is round(W0 + s·B·A) to bf16
  // (relative 2^-9), against W0 rounded plus an fp32 adapter term: about 1% of the logits' scale.
  const double merge_tolerance =
      s.base == "bf16" ? 1e-2 * double(unmerged.cwiseAbs().maxCoeff()) : 1e-3;
  std::vector<Check> checks{
      {"upstream accuracy with the adapter disabled == before adaptation (exact)", all_exact},
      {"merged and unmerged predictions agree",
       agree == merged.cols() && max_diff < merge_tolerance},
      {"full fine-tuning forgets: its upstream accuracy drops by more than 10 points",
       full_run.upstream_acc < upstream_before - 10},
      {"LoRA learns the new task: " + r8_name + " beats the base on rotated digits by 40+ points",
       r8 != nullptr && r8->downstream_acc > base_on_rotated + 40}};
  if (plain_diff)
    checks.push_back(
        {"saved as a plain adapter, it gives the trained outputs on the original "
         "fp32 model",
         *plain_diff < 1e-4});
  if (!s.quick)
    checks.push_back({"LoRA " + r8_name + " is within 2 points of full fine-tuning",
                      r8 != nullptr && r8->downstream_acc >= full_run.downstream_acc - 2});
  std::printf("\nchecks:\n");
  bool ok = true;
  for (const auto& c : checks) {
    std::printf("  [%s] %s\n", c.ok ? " ok " : "FAIL", c.what.c_str());
    ok = ok && c.ok;
  }

  // 5. demo_summary.json and the curves.
  using nlohmann::json;
  json j;
  j["data"] = {{"file", s.data},
               {"train", train_up.size()},
               {"test", test_up.size()},
               {"split_seed", 2024},
               {"downstream", "rotated 90 degrees counter-clockwise"}};
  j["model"] = {{"layers", {64, 128, 128, 10}}, {"parameters", full_count}};
  j["quick"] = s.quick;
  j["lora_frozen_base"] = s.base;
  j["lora_init"] = s.init;
  j["frozen_w0_bytes"] = frozen_bytes;
  j["upstream"] = {{"test_accuracy_before", upstream_before},
                   {"rotated_test_accuracy_before", base_on_rotated},
                   {"train_seconds", up_seconds},
                   {"epochs", s.upstream_epochs}};
  auto test_curve = [](const Run& r) {
    std::vector<double> acc;
    for (const auto& e : r.curve) acc.push_back(e.test_acc);
    return acc;
  };
  for (const auto& r : runs)
    j[r.dora ? "dora" : "lora"].push_back(
        {{"rank", r.rank},
         {"layer_ranks", r.layer_ranks},
         {"trainable_parameters", r.trainable},
         {"percent_of_full", 100.0 * double(r.trainable) / double(full_count)},
         {"downstream_accuracy", r.downstream_acc},
         {"upstream_accuracy_adapter_disabled", r.upstream_acc},
         {"upstream_logits_bit_identical", r.upstream_exact},
         {"train_seconds", r.seconds},
         {"epochs", s.lora_epochs},
         {"test_accuracy_per_epoch", test_curve(r)}});
  j["full_finetune"] = {{"trainable_parameters", full_run.trainable},
                        {"downstream_accuracy", full_run.downstream_acc},
                        {"upstream_accuracy_after", full_run.upstream_acc},
                        {"train_seconds", full_run.seconds},
                        {"epochs", s.full_epochs}};
  j["merge"] = {{"rank", runs[best].rank},
                {"max_abs_logit_difference", max_diff},
                {"same_predictions", agree},
                {"of", merged.cols()}};
  j["latency_us_per_batch"] = {{"batch", test_down.size()},
                               {"base", base_us},
                               {"unmerged", unmerged_us},
                               {"merged", merged_us}};
  for (const auto& c : checks) j["checks"][c.what] = c.ok;
  j["total_seconds"] = seconds_since(t_start);
  const std::string summary = s.out + "/demo_summary.json";
  std::ofstream(summary) << j.dump(2) << "\n";
  // Training curves, one block per run (gnuplot: plot ... index i).
  const std::string curves = s.out + "/demo_curves.dat";
  std::ofstream c(curves);
  auto block = [&](const std::string& name, const std::vector<EpochStats>& curve) {
    if (c.tellp() > 0) c << "\n\n";  // gnuplot: two blank lines between blocks
    c << "# " << name << "\n# epoch loss train_acc test_acc elapsed_s\n";
    for (const auto& e : curve)
      c << e.epoch << " " << e.loss << " " << e.train_acc << " " << e.test_acc << " " << e.elapsed
        << "\n";
  };
  block("base (upstream)", up_curve);
  for (const auto& r : runs) block(r.name, r.curve);
  block("full FT", full_run.curve);
  std::printf("\nwrote %s and %s (total %.1f s)\n", summary.c_str(), curves.c_str(),
              seconds_since(t_start));
  return ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  const Settings s = parse(argc, argv);
  try {
    // The frozen storage is the one thing to change to run the demo on another weight format.
    if (s.base == "nf4") {
      std::printf("LoRA models on an NF4 frozen base (%s)\n",
                  lora::Nf4FrozenWeight::backend_report().c_str());
      return run<lora::Nf4FrozenWeight>(s);
    }
    if (s.base == "q4_k") {
      std::printf(
          "LoRA models on a Q4_K frozen base (llama.cpp's blocks, rows padded to 256; %s)\n",
          lora::GgmlFrozenWeight::backend_report().c_str());
      return run<Q4KFrozenWeight>(s);
    }
    if (s.base == "bf16") {
      std::printf("LoRA models on a bf16 frozen base (%s)\n",
                  lora::Bf16FrozenWeight::backend_report().c_str());
      return run<lora::Bf16FrozenWeight>(s);
    }
    return run<lora::DenseFrozenWeight<float>>(s);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "digits_finetune: %s\n", e.what());
    return 1;
  }
}
