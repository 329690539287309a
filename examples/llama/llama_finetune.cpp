// llama_finetune: LoRA fine-tuning of a llama-family model read from a GGUF file, in C++, with
// files that llama.cpp loads as they are.
//
//   llama_finetune --demo [--quick] [--out DIR]
//       Pretrains a small byte-level llama on the historical books of the King James Bible
//       (Debian's bible-kjv), writes it as DIR/base.gguf; LoRA fine-tunes it (r = 8 on all seven
//       projections) on its poetry (Psalms to the Song of Solomon), writes DIR/adapter.gguf; prints
//       held-out perplexity on both texts for the base, LoRA at r = 1 ... 16 and full fine-tuning,
//       and greedy continuations; writes DIR/llama_demo.json.
//   llama_finetune --model M.gguf [--lora A.gguf] --score "1 5 6 7 8"
//       Prints, as one JSON array, the natural-log probabilities of every vocabulary token at the
//       position after the last given token.
//   llama_finetune --model M.gguf --train TOKENS.txt [--lora-out A.gguf] [--rank R] [--steps N]
//       LoRA fine-tunes any llama-family GGUF model (F32/F16/BF16/Q8_0 tensors) on a file of
//       whitespace-separated token ids, and writes the adapter.
#include <lora/core.hpp>

#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "llama/llama_gguf.hpp"
#include "llama/llama_model.hpp"
#include "llama/text_data.hpp"
#include "llama/train.hpp"

namespace {

using Model = llama::Model<float>;
using json = nlohmann::json;

const char* kUsage =
    "usage: llama_finetune --demo [--quick] [--out DIR]\n"
    "       llama_finetune --model M.gguf [--lora A.gguf] --score \"ID ID ...\"\n"
    "       llama_finetune --model M.gguf --train TOKENS.txt [--lora-out A.gguf] [--rank R]\n"
    "                      [--steps N] [--seq-len L] [--batch S] [--lr LR]\n";

std::vector<int> parse_ids(const std::string& text) {
  std::istringstream in(text);
  std::vector<int> ids;
  long long v;
  while (in >> v) ids.push_back(static_cast<int>(v));
  if (!in.eof()) throw std::invalid_argument("token ids must be whitespace-separated integers");
  if (ids.empty()) throw std::invalid_argument("no token ids given");
  return ids;
}

std::string printable(const std::string& s) {
  std::string out;
  for (char c : s) out += (c == '\n') ? std::string(" / ") : std::string(1, c);
  return out;
}

const std::vector<llama::Proj> kAllProjections = {
    llama::Proj::Q,    llama::Proj::K,  llama::Proj::V,   llama::Proj::O,
    llama::Proj::Gate, llama::Proj::Up, llama::Proj::Down};

lora::LoRAConfig lora_config(int rank, std::uint64_t seed) {
  lora::LoRAConfig c;
  c.rank = rank;
  c.alpha = 2.0 * rank;  // s = 2 at every rank, so the table compares ranks at one step size
  c.seed = seed;
  return c;
}

int run_demo(bool quick, const std::string& out_dir) {
  std::cout << "Reading the King James Bible (Debian's bible-kjv)...\n";
  const llama::Corpus prose = llama::prose_corpus();
  const llama::Corpus poetry = llama::poetry_corpus();

  llama::Config cfg;
  cfg.n_vocab = llama::kByteVocab;
  cfg.n_embd = quick ? 64 : 128;
  cfg.n_layer = quick ? 2 : 4;
  cfg.n_head = 4;
  cfg.n_head_kv = 2;
  cfg.n_ff = quick ? 192 : 384;
  cfg.n_ctx = 128;
  llama::TrainOptions pre;
  pre.steps = quick ? 60 : 400;
  pre.batch = quick ? 4 : 16;
  pre.seq_len = quick ? 64 : 128;
  pre.lr = 3e-3;
  pre.weight_decay = 0.01;
  llama::TrainOptions fine = pre;
  fine.steps = quick ? 40 : 100;
  fine.batch = quick ? 4 : 8;
  fine.lr = 2e-3;
  fine.weight_decay = 0;
  fine.seed = 2;
  const int eval_windows = llama::demo_eval_windows(quick);
  const auto prose_eval = llama::eval_windows(prose.held_out, pre.seq_len, eval_windows);
  const auto poetry_eval = llama::eval_windows(poetry.held_out, pre.seq_len, eval_windows);

  json report;
  report["command"] = std::string("llama_finetune --demo") + (quick ? " --quick" : "");
  report["config"] = {{"n_vocab", cfg.n_vocab},     {"n_embd", cfg.n_embd},
                      {"n_layer", cfg.n_layer},     {"n_head", cfg.n_head},
                      {"n_head_kv", cfg.n_head_kv}, {"n_ff", cfg.n_ff},
                      {"n_ctx", cfg.n_ctx}};
  report["texts"] = {{"base",
                      {{"name", prose.name},
                       {"train_bytes", prose.train.size()},
                       {"held_out_bytes", prose.held_out.size()}}},
                     {"adapter",
                      {{"name", poetry.name},
                       {"train_bytes", poetry.train.size()},
                       {"held_out_bytes", poetry.held_out.size()}}}};

  lora::Rng init_rng(42);
  Model base(cfg, init_rng);
  std::cout << "Pretraining the base on " << prose.name << ": " << pre.steps << " steps of "
            << pre.batch << " x " << pre.seq_len << " tokens...\n";
  const llama::TrainResult pre_result = llama::train(base, prose.train, pre);
  std::printf("  %.1f s, %.0f tokens/s, final training loss %.3f\n", pre_result.seconds,
              pre_result.tokens / pre_result.seconds, pre_result.final_loss);
  report["pretraining"] = {{"steps", pre.steps},
                           {"seconds", pre_result.seconds},
                           {"tokens_per_s", pre_result.tokens / pre_result.seconds}};
  llama::write_model_gguf(out_dir + "/base.gguf", base, "lora llama demo base (KJV prose)");
  Model pretrained = base;  // every weight trainable: the start of full fine-tuning
  base.freeze();            // the frozen products an adapted copy runs with its adapters off

  const double base_prose = llama::perplexity(base, prose_eval);
  const double base_poetry = llama::perplexity(base, poetry_eval);
  json rows = json::array();
  rows.push_back({{"model", "base"},
                  {"trainable", 0},
                  {"poetry_ppl", base_poetry},
                  {"prose_ppl", base_prose}});
  std::printf("\n%-22s %12s %14s %14s %9s\n", "model", "trainable", "poetry ppl", "prose ppl",
              "seconds");
  std::printf("%-22s %12d %14.3f %14.3f %9s\n", "base", 0, base_poetry, base_prose, "");

  const std::vector<int> ranks = quick ? std::vector<int>{2, 8} : std::vector<int>{1, 2, 4, 8, 16};
  for (int rank : ranks) {
    Model adapted = base;
    adapted.adapt(lora_config(rank, 100 + rank), kAllProjections);
    const long long trainable = adapted.trainable_parameter_count();
    const llama::TrainResult r = llama::train(adapted, poetry.train, fine);
    const double poetry_ppl = llama::perplexity(adapted, poetry_eval);
    const double prose_ppl = llama::perplexity(adapted, prose_eval);
    // The base's own numbers with the adapter switched off: the frozen weights are untouched.
    adapted.set_adapters_enabled(false);
    const double disabled_prose = llama::perplexity(adapted, prose_eval);
    adapted.set_adapters_enabled(true);
    const std::string name = "LoRA r=" + std::to_string(rank);
    std::printf("%-22s %12lld %14.3f %14.3f %9.1f\n", name.c_str(), trainable, poetry_ppl,
                prose_ppl, r.seconds);
    rows.push_back({{"model", name},
                    {"rank", rank},
                    {"trainable", trainable},
                    {"poetry_ppl", poetry_ppl},
                    {"prose_ppl", prose_ppl},
                    {"prose_ppl_adapter_disabled", disabled_prose},
                    {"disabled_equals_base", disabled_prose == base_prose},
                    {"seconds", r.seconds},
                    {"tokens_per_s", r.tokens / r.seconds}});
    if (disabled_prose != base_prose) {
      std::cerr << "error: the adapter-disabled model is not the base (" << disabled_prose << " vs "
                << base_prose << ")\n";
      return 1;
    }
    if (rank == 8) {
      llama::write_adapter_gguf(out_dir + "/adapter.gguf", adapted);
      const std::string prompt = "And the LORD said";
      const auto base_text = llama::tokens_to_bytes(
          llama::generate_greedy(base, llama::bytes_to_tokens(prompt), quick ? 20 : 80));
      const auto lora_text = llama::tokens_to_bytes(
          llama::generate_greedy(adapted, llama::bytes_to_tokens(prompt), quick ? 20 : 80));
      report["generated"] = {{"prompt", prompt}, {"base", base_text}, {"lora_r8", lora_text}};
      report["adapter_poetry_ppl"] = poetry_ppl;
    }
  }

  Model full = pretrained;  // full fine-tuning: every weight trains
  const long long full_trainable = full.trainable_parameter_count();
  const llama::TrainResult fr = llama::train(full, poetry.train, fine);
  const double full_poetry = llama::perplexity(full, poetry_eval);
  const double full_prose = llama::perplexity(full, prose_eval);
  std::printf("%-22s %12lld %14.3f %14.3f %9.1f\n", "full fine-tuning", full_trainable, full_poetry,
              full_prose, fr.seconds);
  rows.push_back({{"model", "full fine-tuning"},
                  {"trainable", full_trainable},
                  {"poetry_ppl", full_poetry},
                  {"prose_ppl", full_prose},
                  {"seconds", fr.seconds},
                  {"tokens_per_s", fr.tokens / fr.seconds}});
  report["table"] = rows;
  report["base_prose_ppl"] = base_prose;
  report["base_poetry_ppl"] = base_poetry;
  report["eval_windows"] = {{"count", eval_windows}, {"seq_len", pre.seq_len}};

  std::printf("\nGreedy continuations of \"%s\":\n  base: %s\n  LoRA: %s\n",
              report["generated"]["prompt"].get<std::string>().c_str(),
              printable(report["generated"]["base"].get<std::string>()).c_str(),
              printable(report["generated"]["lora_r8"].get<std::string>()).c_str());
  std::ofstream(out_dir + "/llama_demo.json") << report.dump(2) << "\n";
  std::cout << "\nWrote " << out_dir << "/base.gguf, " << out_dir << "/adapter.gguf and " << out_dir
            << "/llama_demo.json\n"
            << "llama.cpp: llama-cli -m " << out_dir << "/base.gguf --lora " << out_dir
            << "/adapter.gguf\n";
  return 0;
}

int run_score(const std::string& model_path, const std::string& lora_path, const std::string& ids) {
  Model model = llama::read_model_gguf(model_path);
  if (!lora_path.empty()) llama::apply_adapter_gguf(model, lora_path);
  const std::vector<int> tokens = parse_ids(ids);
  const Eigen::VectorXd lp = llama::next_token_log_probs(model, tokens);
  std::string out = "[";
  char buf[32];
  for (Eigen::Index i = 0; i < lp.size(); ++i) {
    std::snprintf(buf, sizeof buf, "%s%.9g", i ? ", " : "", lp(i));
    out += buf;
  }
  std::cout << out << "]\n";
  return 0;
}

int run_train(const std::string& model_path, const std::string& tokens_path,
              const std::string& lora_out, int rank, llama::TrainOptions o) {
  Model model = llama::read_model_gguf(model_path);
  std::ifstream in(tokens_path);
  if (!in) throw std::runtime_error("cannot read " + tokens_path);
  std::stringstream ss;
  ss << in.rdbuf();
  const std::vector<int> tokens = parse_ids(ss.str());
  o.seq_len = std::min(o.seq_len, model.config().n_ctx);
  model.adapt(lora_config(rank, 1), kAllProjections);
  const auto r = llama::train(model, tokens, o);
  std::printf("%d steps, %.0f tokens/s, final training loss %.4f\n", o.steps, r.tokens / r.seconds,
              r.final_loss);
  llama::write_adapter_gguf(lora_out, model);
  std::cout << "wrote " << lora_out << "\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  llama::keep_freed_memory();  // train.hpp: each step's temporaries are reused, not re-faulted
  try {
    bool demo = false, quick = false;
    std::string out = ".", model, lora, score, train_file, lora_out = "adapter.gguf";
    int rank = 8;
    llama::TrainOptions o;
    for (int i = 1; i < argc; ++i) {
      const std::string a = argv[i];
      auto value = [&]() -> std::string {
        if (i + 1 >= argc) throw std::invalid_argument(a + " needs a value");
        return argv[++i];
      };
      if (a == "--demo")
        demo = true;
      else if (a == "--quick")
        quick = true;
      else if (a == "--out")
        out = value();
      else if (a == "--model")
        model = value();
      else if (a == "--lora")
        lora = value();
      else if (a == "--score")
        score = value();
      else if (a == "--train")
        train_file = value();
      else if (a == "--lora-out")
        lora_out = value();
      else if (a == "--rank")
        rank = std::stoi(value());
      else if (a == "--steps")
        o.steps = std::stoi(value());
      else if (a == "--seq-len")
        o.seq_len = std::stoi(value());
      else if (a == "--batch")
        o.batch = std::stoi(value());
      else if (a == "--lr")
        o.lr = std::stod(value());
      else if (a == "--help" || a == "-h") {
        std::cout << kUsage;
        return 0;
      } else {
        throw std::invalid_argument("unknown argument " + a);
      }
    }
    if (demo) return run_demo(quick, out);
    if (!model.empty() && !score.empty()) return run_score(model, lora, score);
    if (!model.empty() && !train_file.empty())
      return run_train(model, train_file, lora_out, rank, o);
    std::cerr << kUsage;
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "llama_finetune: " << e.what() << "\n";
    return 1;
  }
}
