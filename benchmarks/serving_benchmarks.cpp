// The cost of distinct adapters in one batch (S-LoRA / Punica-style serving on a CPU).
//
//   BM_MixedBatchDistinct/<base>/m/n   one forward of n columns (d = k = 4096, r = 16) where the
//                                      columns use m distinct adapters, round robin (column j uses
//                                      adapter j % m, so an adapter's columns are not adjacent).
//                                      m = 1 is the plain single-adapter forward: the baseline.
//                                      Prefill: n = 512; decode: n = m (one column per adapter).
//   BM_MemoryBandwidth                 reads a 512 MiB buffer once per iteration
//   (bytes_per_second):
//                                      the bandwidth at which the adapters' own bytes are read.
// <base>: fp32 (DenseFrozenWeight<float>), bf16 (Bf16FrozenWeight), nf4 (Nf4FrozenWeight). The
// adapters are fp32 in every case. Counters: adapter_bytes (the bytes of the m adapters' A and B,
// each read once), allocs_per_iter.
//
//   lora_serving_benchmarks --benchmark_min_time=0.2 --benchmark_out=...
//   --benchmark_out_format=json
#include "alloc_counter.hpp"

#include <lora/bf16_frozen_weight.hpp>
#include <lora/core.hpp>
#include <lora/nf4_frozen_weight.hpp>

#include <benchmark/benchmark.h>

#include <Eigen/Core>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace {

constexpr int kD = 4096, kK = 4096, kRank = 16, kMaxAdapters = 512;

using Matrix = Eigen::MatrixXf;

/// The layer of the base being measured, with kMaxAdapters non-zero adapters "a0", ... (built on
/// first use; the previous base's layer is freed first, so only one set of adapters is resident).
template <typename Frozen>
lora::MultiLoRALinear<float, Frozen>& layer() {
  using Layer = lora::MultiLoRALinear<float, Frozen>;
  static std::shared_ptr<void> current;
  static Layer* instance = nullptr;
  if (instance != nullptr && current.get() == instance) return *instance;
  current.reset();
  lora::Rng rng(1);
  Matrix W0(kD, kK);
  lora::fill_normal(W0, rng, 0.0, 0.02);
  auto l = std::make_shared<Layer>(Frozen(W0));
  for (int i = 0; i < kMaxAdapters; ++i) {
    lora::LoRAConfig cfg;
    cfg.rank = kRank;
    cfg.alpha = 32;
    cfg.seed = static_cast<std::uint64_t>(i + 1);
    auto& a = l->add_adapter("a" + std::to_string(i), cfg);
    lora::fill_normal(a.B(), rng, 0.0, 0.01);
  }
  l->eval();
  instance = l.get();
  current = l;
  return *instance;
}

template <typename Frozen>
void mixed_batch_distinct(benchmark::State& state) {
  const int m = static_cast<int>(state.range(0));
  const Eigen::Index n = state.range(1);
  auto& l = layer<Frozen>();
  lora::Rng rng(7);
  Matrix X(kK, n);
  lora::fill_normal(X, rng, 0.0, 1.0);
  Matrix H(kD, n);
  lora::Workspace<float> ws;
  std::vector<int> which(static_cast<std::size_t>(n));
  for (Eigen::Index j = 0; j < n; ++j) which[static_cast<std::size_t>(j)] = static_cast<int>(j % m);
  if (m == 1) {
    l.set_active("a0");
  } else {
    l.disable();
  }
  auto run = [&] {
    if (m == 1) {
      l.forward(X, H, ws);
    } else {
      l.forward_mixed(X, which, H, ws);
    }
  };
  run();  // grows the workspace
  const std::uint64_t before = lora::bench::allocation_count();
  for (auto _ : state) {
    run();
    benchmark::DoNotOptimize(H.data());
  }
  const std::uint64_t after = lora::bench::allocation_count();
  state.counters["allocs_per_iter"] =
      static_cast<double>(after - before) / static_cast<double>(state.iterations());
  state.counters["adapter_bytes"] = double(m) * kRank * (kD + kK) * sizeof(float);
  state.SetLabel(m == 1 ? "single adapter (baseline)" : "mixed batch");
  l.disable();
}

void memory_bandwidth(benchmark::State& state) {
  const Eigen::Index count = Eigen::Index(128) * 1024 * 1024;  // 512 MiB of floats
  Eigen::VectorXf v = Eigen::VectorXf::Constant(count, 1.0f);
  for (auto _ : state) {
    float s = v.sum();
    benchmark::DoNotOptimize(s);
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * count *
                          static_cast<std::int64_t>(sizeof(float)));
}

template <typename Frozen>
void add_family(const char* base) {
  const std::string name = std::string("BM_MixedBatchDistinct/") + base;
  auto* b = benchmark::RegisterBenchmark(name.c_str(), mixed_batch_distinct<Frozen>);
  // Prefill (n = 512) and decode (n = m, with its single-adapter baseline m = 1, n = m).
  for (int m : {1, 8, 64, 512}) b->Args({m, 512});
  for (int m : {8, 64}) b->Args({1, m})->Args({m, m});
  b->Args({1, 1})->Unit(benchmark::kMillisecond)->UseRealTime();
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::RegisterBenchmark("BM_MemoryBandwidth", memory_bandwidth)
      ->Unit(benchmark::kMillisecond)
      ->UseRealTime();
  add_family<lora::DenseFrozenWeight<float>>("fp32");
  add_family<lora::Bf16FrozenWeight>("bf16");
  add_family<lora::Nf4FrozenWeight>("nf4");
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::AddCustomContext("lora_eigen_threads", std::to_string(Eigen::nbThreads()));
  benchmark::AddCustomContext("lora_bf16_backend", lora::Bf16FrozenWeight::backend_report());
  benchmark::AddCustomContext("lora_nf4_backend", lora::Nf4FrozenWeight::backend_report());
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
