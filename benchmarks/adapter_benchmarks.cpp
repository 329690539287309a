// Many adapters on one base (issue 3): adapter swap, and a mixed-adapter batch (8 adapters, 512
// columns, d = k = 4096, r = 8) against a single-adapter forward of the same batch, all float.
// Loading a PEFT adapter of 2,000 modules whose ranks and alphas differ from module to module
// (one rank_pattern and one alpha_pattern key per module), against the same adapter with one rank
// and alpha (no pattern): the cost of resolving the patterns, which once grew with modules x keys.
//
//   lora_adapter_benchmarks [--benchmark_filter=...]
#include <lora/core.hpp>

#include <lora/peft/adapter_io.hpp>

#include <unistd.h>

#include <benchmark/benchmark.h>
#include <nlohmann/json.hpp>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <vector>

namespace {

constexpr int kD = 4096, kK = 4096, kN = 512, kRank = 8, kAdapters = 8;

using Matrix = Eigen::MatrixXf;
using Layer = lora::MultiLoRALinear<float>;

/// A d x k base with kAdapters non-zero rank-8 adapters "a0".."a7" (built once, shared).
Layer& layer() {
  static Layer* instance = [] {
    lora::Rng rng(1);
    Matrix W0(kD, kK);
    lora::fill_normal(W0, rng, 0.0, 0.02);
    auto* l = new Layer(std::move(W0));  // the dense storage's default: MergeMode::InPlace
    for (int i = 0; i < kAdapters; ++i) {
      lora::LoRAConfig cfg;
      cfg.rank = kRank;
      cfg.alpha = 16;
      cfg.seed = static_cast<std::uint64_t>(i + 1);
      auto& a = l->add_adapter("a" + std::to_string(i), cfg);
      lora::fill_normal(a.B(), rng, 0.0, 0.01);
    }
    return l;
  }();
  return *instance;
}

const Matrix& input() {
  static const Matrix X = Matrix::Random(kK, kN);
  return X;
}

/// The base alone: H = W0 X, the floor of every forward.
void BM_BaseForward(benchmark::State& state) {
  Layer& l = layer();
  l.disable();
  Matrix H(kD, kN);
  lora::Workspace<float> ws;
  for (auto _ : state) {
    l.forward(input(), H, ws);
    benchmark::DoNotOptimize(H.data());
  }
}

/// One adapter for the whole batch: W0 X + s B (A X).
void BM_SingleAdapterForward(benchmark::State& state) {
  Layer& l = layer();
  l.disable();
  l.set_active("a0");
  Matrix H(kD, kN);
  lora::Workspace<float> ws;
  for (auto _ : state) {
    l.forward(input(), H, ws);
    benchmark::DoNotOptimize(H.data());
  }
  l.disable();
}

/// Every column picks one of 8 adapters (round robin): one W0 X, then 8 gathered low-rank products.
void BM_MixedBatchForward(benchmark::State& state) {
  Layer& l = layer();
  l.disable();
  std::vector<int> which(kN);
  for (int j = 0; j < kN; ++j) which[static_cast<std::size_t>(j)] = j % kAdapters;
  Matrix H(kD, kN);
  lora::Workspace<float> ws;
  for (auto _ : state) {
    l.forward_mixed(input(), which, H, ws);
    benchmark::DoNotOptimize(H.data());
  }
}

/// Switching the active adapter while unmerged: O(1), W0 untouched.
void BM_SwapUnmerged(benchmark::State& state) {
  Layer& l = layer();
  l.disable();
  int i = 0;
  for (auto _ : state) {
    l.set_active(i++ % 2 ? "a1" : "a0");
    benchmark::ClobberMemory();
  }
  l.disable();
}

/// Switching while merged: unmerge the old delta and merge the new (2 d k r multiply-adds).
void BM_SwapMerged(benchmark::State& state) {
  Layer& l = layer();
  l.disable();
  l.set_active("a0");
  l.merge();
  int i = 1;
  for (auto _ : state) {
    l.set_active(i++ % 2 ? "a1" : "a0");
    benchmark::ClobberMemory();
  }
  l.disable();
}

// ---- loading a PEFT adapter of many modules
// ------------------------------------------------------

constexpr int kModules = 2000;

enum class Patterns { None, Escaped, PlainPaths };

/// A PEFT adapter directory of kModules small modules (16 x 16), written once per kind: `None`, one
/// rank and alpha for all; `Escaped`, ranks 1..4 and alphas that differ from module to module, so
/// that save_adapter writes an escaped full-path key (model\.layers\.0\.q_proj) per module to
/// rank_pattern and to alpha_pattern; `PlainPaths`, the same with the keys written as plain paths
/// (model.layers.0.q_proj, '.' then a regex wildcard), as hand-written and EVA configs have them.
const std::string& adapter_dir(Patterns kind) {
  static std::map<Patterns, std::string> dirs;
  auto it = dirs.find(kind);
  if (it != dirs.end()) return it->second;
  const char* names[] = {"q_proj",    "k_proj",  "v_proj",   "o_proj",
                         "gate_proj", "up_proj", "down_proj"};
  std::vector<lora::LoRAAdapter<float>> adapters;
  std::map<std::string, const lora::LoRAAdapter<float>*> by_path;
  adapters.reserve(kModules);
  lora::Rng rng(3);
  for (int i = 0; i < kModules; ++i) {
    lora::LoRAConfig cfg;
    cfg.rank = kind == Patterns::None ? 4 : 1 + i % 4;
    cfg.alpha = kind == Patterns::None ? 8 : 2.0 * cfg.rank + (i % 3);
    cfg.seed = static_cast<std::uint64_t>(i);
    adapters.emplace_back(16, 16, cfg);
    lora::fill_normal(adapters.back().B(), rng, 0.0, 0.01);
  }
  for (int i = 0; i < kModules; ++i)
    by_path["model.layers." + std::to_string(i / 7) + ".mlp." + names[i % 7]] =
        &adapters[static_cast<std::size_t>(i)];
  const std::string dir = (std::filesystem::temp_directory_path() /
                           ("lora_bench_adapter_" + std::to_string(static_cast<int>(kind)) + "_" +
                            std::to_string(::getpid())))
                              .string();
  lora::peft::write_adapter(dir, by_path);
  if (kind == Patterns::PlainPaths) {  // unescape the keys: "a\.b" -> "a.b"
    const std::string path = dir + "/adapter_config.json";
    std::ifstream in(path);
    nlohmann::json j = nlohmann::json::parse(in);
    for (const char* field : {"rank_pattern", "alpha_pattern"}) {
      nlohmann::json plain = nlohmann::json::object();
      for (const auto& [k, v] : j[field].items()) {
        std::string key;
        for (char c : k)
          if (c != '\\') key += c;
        plain[key] = v;
      }
      j[field] = plain;
    }
    lora::io::write_file_atomically(path, j.dump(2));
  }
  std::atexit([] {
    for (const auto& [k, d] : dirs) std::filesystem::remove_all(d);
  });
  return dirs.emplace(kind, dir).first->second;
}

/// read_adapter<float> of the whole directory: the config (patterns compiled once), every
/// module's rank and alpha, and the weights. Counters: modules and pattern keys.
void BM_LoadAdapter2000Modules(benchmark::State& state) {
  const auto kind = static_cast<Patterns>(state.range(0));
  const std::string& dir = adapter_dir(kind);
  std::size_t keys = 0;
  for (auto _ : state) {
    const auto file = lora::peft::read_adapter<float>(dir);
    keys = file.config.rank_pattern.size() + file.config.alpha_pattern.size();
    benchmark::DoNotOptimize(file.modules.size());
  }
  state.counters["modules"] = kModules;
  state.counters["pattern_keys"] = static_cast<double>(keys);
  state.SetLabel(kind == Patterns::None      ? "one rank and alpha (baseline)"
                 : kind == Patterns::Escaped ? "a rank and alpha key per module, escaped"
                                             : "a rank and alpha key per module, plain paths");
}

BENCHMARK(BM_LoadAdapter2000Modules)
    ->Arg(static_cast<int>(Patterns::None))
    ->Arg(static_cast<int>(Patterns::Escaped))
    ->Arg(static_cast<int>(Patterns::PlainPaths))
    ->Unit(benchmark::kMillisecond);

BENCHMARK(BM_BaseForward)->Unit(benchmark::kMillisecond)->MinTime(2.0);
BENCHMARK(BM_SingleAdapterForward)->Unit(benchmark::kMillisecond)->MinTime(2.0);
BENCHMARK(BM_MixedBatchForward)->Unit(benchmark::kMillisecond)->MinTime(2.0);
BENCHMARK(BM_SwapUnmerged)->Unit(benchmark::kNanosecond);
BENCHMARK(BM_SwapMerged)->Unit(benchmark::kMillisecond)->MinTime(2.0);

}  // namespace

BENCHMARK_MAIN();
