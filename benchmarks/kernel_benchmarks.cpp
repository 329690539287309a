// lora_kernel_benchmarks: the fp32 frozen product on every kernel lora can run it on, side by
// side in one binary, at the shapes of real models. The numbers behind DenseKernel::Auto's rule
// (lora/detail/dense_kernels.hpp) and the kernel table of docs/performance.md.
//
//   BM_Kernel/<kernel>/<product>/d/k/n
//     kernel   Eigen (lora's driver of Eigen's GEMM, detail/gemm.hpp), Blis, OpenBlas (the same
//              calls DenseFrozenWeight makes), OneDnn (onednn::OneDnnFrozenWeight: prepacked fp32
//              matmul), Default (DenseFrozenWeight<float> as built here: its Auto rule)
//     product  WX (H = W X), WXAdd (H += W X), WtG (dX += W^T G); W is d x k (out x in)
//   BM_ReadWeight/d/k     one read of the d x k fp32 weight (a vectorised sum): the floor of n = 1
//   BM_MemcpyWeight/d/k   memcpy of the same bytes into a second buffer (read + write)
// Counters: GFLOPS (2 d k n per iteration), GBps (weight bytes per second), allocs_per_iter,
// threads. Thread count: OMP_NUM_THREADS (Eigen, BLIS and oneDNN use OpenMP; OpenBLAS's own pool
// is sized to the same count by lora).
#include "alloc_counter.hpp"

#include <lora/dense_frozen_weight.hpp>
#if defined(LORA_WITH_ONEDNN)
#include <lora/onednn/onednn_frozen_weight.hpp>
#endif

#include <benchmark/benchmark.h>

#include <Eigen/Core>

#include <array>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace {

using Matrix = Eigen::MatrixXf;
using Index = Eigen::Index;
using lora::DenseKernel;

enum class Product { WX, WXAdd, WtG };
enum class Kernel { Eigen, Blis, OpenBlas, OneDnn, Default };

const char* product_name(Product p) {
  return p == Product::WX ? "WX" : p == Product::WXAdd ? "WXAdd" : "WtG";
}
const char* kernel_name(Kernel k) {
  switch (k) {
    case Kernel::Eigen:
      return "Eigen";
    case Kernel::Blis:
      return "Blis";
    case Kernel::OpenBlas:
      return "OpenBlas";
    case Kernel::OneDnn:
      return "OneDnn";
    default:
      return "Default";
  }
}

/// One weight at a time (the largest is 180 MB, and oneDNN keeps prepacked copies).
struct Weights {
  Index d = 0, k = 0;
  Matrix W;
  std::unique_ptr<lora::DenseFrozenWeight<float>> dense;
#if defined(LORA_WITH_ONEDNN)
  std::unique_ptr<lora::onednn::OneDnnFrozenWeight> onednn;
#endif
  static Weights& get(Index d, Index k, bool with_onednn) {
    static Weights w;
    if (w.d != d || w.k != k) {
      w = Weights();
      w.d = d;
      w.k = k;
      w.W = Matrix::Random(d, k);
    }
    if (!w.dense) w.dense = std::make_unique<lora::DenseFrozenWeight<float>>(w.W);
#if defined(LORA_WITH_ONEDNN)
    if (with_onednn && !w.onednn)
      w.onednn = std::make_unique<lora::onednn::OneDnnFrozenWeight>(w.W);
#else
    (void)with_onednn;
#endif
    return w;
  }
};

template <typename Body>
void timed_loop(benchmark::State& state, Body&& body) {
  body();  // warm-up: buffers, prepacked copies, thread pools
  const std::uint64_t before = lora::bench::allocation_count();
  for (auto _ : state) body();
  const std::uint64_t after = lora::bench::allocation_count();
  state.counters["allocs_per_iter"] = benchmark::Counter(static_cast<double>(after - before) /
                                                         static_cast<double>(state.iterations()));
  state.counters["threads"] = Eigen::nbThreads();
}

void kernel_product(benchmark::State& state, Kernel kernel, Product product) {
  const Index d = state.range(0), k = state.range(1), n = state.range(2);
  Weights& w = Weights::get(d, k, kernel == Kernel::OneDnn);
  const bool transposed = product == Product::WtG;
  const Index in = transposed ? d : k, out = transposed ? k : d;
  const Matrix R = Matrix::Random(in, n);
  Matrix C = Matrix::Random(out, n);
  const bool accumulate = product != Product::WX;
  std::function<void()> body;
  switch (kernel) {
    case Kernel::Eigen:
      body = [&] {
        if (!accumulate) C.setZero();
        if (transposed)
          lora::detail::gemm_add(C, w.W.transpose(), R, 1.0f);
        else
          lora::detail::gemm_add(C, w.W, R, 1.0f);
      };
      break;
    case Kernel::Blis:
    case Kernel::OpenBlas: {
      const DenseKernel dk = kernel == Kernel::Blis ? DenseKernel::Blis : DenseKernel::OpenBlas;
      if (!lora::detail::dense_kernel_built(dk)) {
        state.SkipWithError("not built in");
        return;
      }
      body = [&, dk] {
        lora::detail::blas_product<float>(dk, transposed, w.W.data(), d, k, R.data(), R.rows(), n,
                                          C.data(), C.rows(), accumulate);
      };
      break;
    }
    case Kernel::OneDnn:
#if defined(LORA_WITH_ONEDNN)
      body = [&] {
        if (product == Product::WX) w.onednn->multiply(R, C);
        if (product == Product::WXAdd) w.onednn->multiply_add(R, C);
        if (product == Product::WtG) w.onednn->multiply_transposed_add(R, C);
      };
      break;
#else
      state.SkipWithError("built without oneDNN");
      return;
#endif
    case Kernel::Default:
      body = [&] {
        if (product == Product::WX) w.dense->multiply(R, C);
        if (product == Product::WXAdd) w.dense->multiply_add(R, C);
        if (product == Product::WtG) w.dense->multiply_transposed_add(R, C);
      };
      break;
  }
  timed_loop(state, body);
  const double flops = 2.0 * double(d) * double(k) * double(n);
  state.counters["GFLOPS"] =
      benchmark::Counter(flops * 1e-9 * double(state.iterations()), benchmark::Counter::kIsRate);
  state.counters["GBps"] = benchmark::Counter(
      double(d) * double(k) * 4e-9 * double(state.iterations()), benchmark::Counter::kIsRate);
}

void read_weight(benchmark::State& state) {
  const Index d = state.range(0), k = state.range(1);
  Weights& w = Weights::get(d, k, false);
  float sink = 0;
  timed_loop(state, [&] {
    sink += w.W.sum();
    benchmark::DoNotOptimize(sink);
  });
  state.counters["GBps"] = benchmark::Counter(
      double(d) * double(k) * 4e-9 * double(state.iterations()), benchmark::Counter::kIsRate);
}

void memcpy_weight(benchmark::State& state) {
  const Index d = state.range(0), k = state.range(1);
  Weights& w = Weights::get(d, k, false);
  std::vector<float> copy(static_cast<std::size_t>(d * k));
  timed_loop(state, [&] {
    std::memcpy(copy.data(), w.W.data(), copy.size() * sizeof(float));
    benchmark::ClobberMemory();
  });
  state.counters["GBps"] = benchmark::Counter(
      double(d) * double(k) * 4e-9 * double(state.iterations()), benchmark::Counter::kIsRate);
}

// d x k (out x in): a 7B model's attention projection, MLP down (in 11008), MLP up/gate
// (out 11008), and a 1B model's MLP.
constexpr std::array<std::array<Index, 2>, 4> kShapes = {
    {{4096, 4096}, {4096, 11008}, {11008, 4096}, {2048, 8192}}};
constexpr std::array<Index, 4> kBatches = {1, 8, 64, 512};

}  // namespace

int main(int argc, char** argv) {
  // Shape-major order: each weight is built once and used by every kernel and product.
  for (const auto& s : kShapes) {
    benchmark::RegisterBenchmark("BM_ReadWeight", read_weight)
        ->Args({s[0], s[1]})
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
    benchmark::RegisterBenchmark("BM_MemcpyWeight", memcpy_weight)
        ->Args({s[0], s[1]})
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
    for (Kernel kernel :
         {Kernel::Eigen, Kernel::Blis, Kernel::OpenBlas, Kernel::OneDnn, Kernel::Default}) {
      if (kernel == Kernel::Blis && !lora::detail::dense_kernel_built(DenseKernel::Blis)) continue;
      if (kernel == Kernel::OpenBlas && !lora::detail::dense_kernel_built(DenseKernel::OpenBlas))
        continue;
#if !defined(LORA_WITH_ONEDNN)
      if (kernel == Kernel::OneDnn) continue;
#endif
      for (Product product : {Product::WX, Product::WXAdd, Product::WtG}) {
        const std::string name =
            std::string("BM_Kernel/") + kernel_name(kernel) + "/" + product_name(product);
        auto* b = benchmark::RegisterBenchmark(name.c_str(), kernel_product, kernel, product);
        b->UseRealTime()->Unit(benchmark::kMillisecond);
        for (Index n : kBatches) b->Args({s[0], s[1], n});
      }
    }
  }
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::AddCustomContext("lora_eigen_threads", std::to_string(Eigen::nbThreads()));
  benchmark::AddCustomContext("lora_dense_kernels", lora::detail::dense_kernels_report());
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
