// Many adapters on one base (issue 3): adapter swap, and a mixed-adapter batch (8 adapters, 512
// columns, d = k = 4096, r = 8) against a single-adapter forward of the same batch, all float.
//
//   lora_adapter_benchmarks [--benchmark_filter=...]
#include <lora/core.hpp>

#include <benchmark/benchmark.h>

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

BENCHMARK(BM_BaseForward)->Unit(benchmark::kMillisecond)->MinTime(2.0);
BENCHMARK(BM_SingleAdapterForward)->Unit(benchmark::kMillisecond)->MinTime(2.0);
BENCHMARK(BM_MixedBatchForward)->Unit(benchmark::kMillisecond)->MinTime(2.0);
BENCHMARK(BM_SwapUnmerged)->Unit(benchmark::kNanosecond);
BENCHMARK(BM_SwapMerged)->Unit(benchmark::kMillisecond)->MinTime(2.0);

}  // namespace

BENCHMARK_MAIN();
