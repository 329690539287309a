// The cost of the inits that factor the base weight (lora/init.hpp), at d = k = 4096, r = 16:
//   BM_InitPissaNiter<N>  PiSSA with PEFT's randomized SVD (pissa_niter_N), N = 2, 4, 8
//   BM_InitPissaExact     PiSSA with the exact SVD (BDCSVD): the slow reference
//   BM_InitOlora          OLoRA (a Householder QR of W0)
//   BM_InitLoftq<T>       LoftQ on the 4-bit base, T alternations, randomized SVD (niter 4)
//   BM_InitGaussian       the plain init (A drawn, B = 0, the base untouched): the baseline
// Each iteration builds a layer from a fresh copy of W0 (the copy is excluded from the time).
// Arguments: d, k, r. Run by hand (seconds per iteration); CI only builds this binary.
#include <benchmark/benchmark.h>
#include <lora/base_init.hpp>
#include <lora/core.hpp>
#include <lora/nf4_frozen_weight.hpp>

#include <Eigen/Core>

namespace {

Eigen::MatrixXf weight(Eigen::Index d, Eigen::Index k) {
  lora::Rng rng(11);
  Eigen::MatrixXf W(d, k);
  lora::fill_normal(W, rng, 0.0, 0.02);
  return W;
}

template <typename Frozen>
void run_init(benchmark::State& state, lora::Init init, int svd_iterations, int loftq_iterations) {
  const Eigen::Index d = state.range(0), k = state.range(1);
  const Eigen::MatrixXf W = weight(d, k);
  lora::LoRAConfig cfg;
  cfg.rank = static_cast<int>(state.range(2));
  cfg.alpha = 2.0 * cfg.rank;
  cfg.init = init;
  cfg.svd_iterations = svd_iterations;
  cfg.loftq_iterations = loftq_iterations;
  for (auto _ : state) {
    state.PauseTiming();
    Eigen::MatrixXf copy = W;
    state.ResumeTiming();
    lora::LoRALinear<float, Frozen> layer(std::move(copy), cfg);
    benchmark::DoNotOptimize(layer.A().data());
  }
}

void BM_InitGaussian(benchmark::State& s) {
  run_init<lora::DenseFrozenWeight<float>>(s, lora::Init::Gaussian, 0, 1);
}
void BM_InitPissaNiter2(benchmark::State& s) {
  run_init<lora::DenseFrozenWeight<float>>(s, lora::Init::PiSSA, 2, 1);
}
void BM_InitPissaNiter4(benchmark::State& s) {
  run_init<lora::DenseFrozenWeight<float>>(s, lora::Init::PiSSA, 4, 1);
}
void BM_InitPissaNiter8(benchmark::State& s) {
  run_init<lora::DenseFrozenWeight<float>>(s, lora::Init::PiSSA, 8, 1);
}
void BM_InitPissaExact(benchmark::State& s) {
  run_init<lora::DenseFrozenWeight<float>>(s, lora::Init::PiSSA, 0, 1);
}
void BM_InitOlora(benchmark::State& s) {
  run_init<lora::DenseFrozenWeight<float>>(s, lora::Init::OLoRA, 0, 1);
}
void BM_InitLoftq1(benchmark::State& s) {
  run_init<lora::Nf4FrozenWeight>(s, lora::Init::LoftQ, 4, 1);
}
void BM_InitLoftq5(benchmark::State& s) {
  run_init<lora::Nf4FrozenWeight>(s, lora::Init::LoftQ, 4, 5);
}

#define INIT_BENCH(name) \
  BENCHMARK(name)->Args({512, 512, 16})->Args({4096, 4096, 16})->Unit(benchmark::kMillisecond)

INIT_BENCH(BM_InitGaussian);
INIT_BENCH(BM_InitPissaNiter2);
INIT_BENCH(BM_InitPissaNiter4);
INIT_BENCH(BM_InitPissaNiter8);
INIT_BENCH(BM_InitPissaExact);
INIT_BENCH(BM_InitOlora);
INIT_BENCH(BM_InitLoftq1);
INIT_BENCH(BM_InitLoftq5);

}  // namespace

BENCHMARK_MAIN();
