// lora_benchmarks: the cost of a LoRA layer against the dense product it adds to.
//
// Arguments of every family: n/k/d/r (batch, in features, out features, rank). Each family is
// registered for each frozen-weight storage: no suffix = Eigen fp32 (DenseFrozenWeight<float>),
// "OneDnn" = oneDNN fp32 matmul (when built with oneDNN), "Bf16" = the bf16 frozen base
// (Bf16FrozenWeight, oneDNN when present, else the portable kernel), "Nf4" = the 4-bit NormalFloat
// base (Nf4FrozenWeight with double quantization: bf16 panels into oneDNN when present, else fp32
// panels into Eigen). Counters:
//   allocs_per_iter  heap allocations per iteration (operator new and malloc, any thread)
//   w0_bytes         bytes the storage holds for W0 (forward and train-step families)
//   GFLOPS           2*d*k*n per iteration, for the dense product
//   threads          the threads Eigen's products use (OMP_NUM_THREADS)
// Thread count: OMP_NUM_THREADS (Eigen and oneDNN both follow it).
// "Bf16Strided" = the bf16 base with Bf16WeightLayout::Strided (oneDNN reads the stored weight
// through strides) against "Bf16" (prepacked, the default). BM_OneDnnMatmulBf16Reference is
// oneDNN's own bf16 matmul on the same shapes (bf16 X^T (n x k) times W^T in the layout oneDNN
// prefers on this CPU, f32 output, weight reordered before timing): the limit for the frozen
// product; ...RowMajor the same with W^T in a plain row-major layout (no reorder).
// "OneDnnStrided" = the fp32 oneDNN storage with onednn::WeightLayout::Strided ("OneDnn" is
// prepacked, the default).
// "GgmlQ4K", "GgmlQ8_0" = llama.cpp's Q4_K and Q8_0 blocks as the frozen base (GgmlFrozenWeight,
// quantized by llama.cpp's own quantizer; bf16 panels into oneDNN when present, else fp32 panels;
// batches of at most 8 columns through the fused decoding kernel); "GgmlQ6K", "GgmlQ4_0" the same
// for Q6_K (the other half of a Q4_K_M file) and Q4_0, dense forward only; with the extra counter
//   panel_bytes      the per-thread panel buffer a product holds beside w0_bytes
#include "alloc_counter.hpp"

#include <lora/bf16_frozen_weight.hpp>
#include <lora/core.hpp>
#include <lora/ggml_frozen_weight.hpp>
#include <lora/nf4_frozen_weight.hpp>
#if defined(LORA_WITH_ONEDNN)
#include <lora/onednn/onednn_frozen_weight.hpp>
#endif

#include <benchmark/benchmark.h>

#include <Eigen/Core>

#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <memory>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <vector>

namespace {

using Matrix = Eigen::MatrixXf;
using Index = Eigen::Index;

struct Shape {
  Index n, k, d, r;
  bool operator==(const Shape& o) const { return n == o.n && k == o.k && d == o.d && r == o.r; }
};

Shape shape_of(const benchmark::State& state) {
  return {state.range(0), state.range(1), state.range(2), state.range(3)};
}

// The one fixture alive at a time (the large shapes hold a few hundred MB): building a new one
// releases the previous, whatever its storage type.
std::function<void()> g_release_fixture;

/// The layer of a benchmark: plain LoRA, or DoRA (Dora = true: the same adapter with a learned
/// magnitude, docs/dora.md).
template <typename Frozen, bool Dora = false>
struct Fixture {
  Shape shape;
  Matrix X, G, H, dX;
  lora::LoRALinear<float, Frozen> layer;
  lora::Workspace<float> ws;

  static lora::LoRALinear<float, Frozen> make_layer(const Shape& s) {
    lora::LoRAConfig cfg;
    cfg.rank = static_cast<int>(s.r);
    cfg.alpha = 2.0 * static_cast<double>(s.r);
    cfg.seed = 7;
    cfg.use_dora = Dora;
    Matrix W0 = Matrix::Random(s.d, s.k) * (1.0f / std::sqrt(static_cast<float>(s.k)));
    // The storage with its default merge mode (the NF4 base supports ExactRestore only).
    lora::LoRALinear<float, Frozen> layer(Frozen(std::move(W0)), Eigen::VectorXf(), cfg);
    layer.B() = Matrix::Random(s.d, s.r) * 0.01f;  // a trained-looking B: the path is not zero
    return layer;
  }

  explicit Fixture(const Shape& s)
      : shape(s),
        X(Matrix::Random(s.k, s.n)),
        G(Matrix::Random(s.d, s.n)),
        H(s.d, s.n),
        dX(s.k, s.n),
        layer(make_layer(s)) {
    // Grow the workspace and every lazily built cache before timing starts.
    layer.forward(X, H, ws);
    layer.backward(X, G, dX, ws);
    layer.backward_without_input_grad(X, G, ws);
    layer.frozen().multiply(X, H);
    layer.merge();
    layer.forward(X, H, ws);
    layer.unmerge();
    layer.zero_grad();
  }

  static Fixture& get(const Shape& s) {
    static std::unique_ptr<Fixture> current;
    if (!current || !(current->shape == s)) {
      if (g_release_fixture) g_release_fixture();
      current.reset();
      current = std::make_unique<Fixture>(s);
      g_release_fixture = [] { current.reset(); };
    }
    return *current;
  }
};

/// Runs `body` over the benchmark loop and reports allocations per iteration.
template <typename Body>
void timed_loop(benchmark::State& state, Body&& body) {
  const std::uint64_t before = lora::bench::allocation_count();
  for (auto _ : state) body();
  const std::uint64_t after = lora::bench::allocation_count();
  state.counters["allocs_per_iter"] = benchmark::Counter(static_cast<double>(after - before) /
                                                         static_cast<double>(state.iterations()));
  state.counters["threads"] = Eigen::nbThreads();
}

void report_flops(benchmark::State& state, const Shape& s) {
  const double flops = 2.0 * double(s.d) * double(s.k) * double(s.n);
  state.counters["GFLOPS"] =
      benchmark::Counter(flops * 1e-9 * double(state.iterations()), benchmark::Counter::kIsRate);
  state.SetItemsProcessed(state.iterations() * s.n);
}

/// Bytes held for W0: stored_bytes() where the storage reports it, else d * k * element size.
template <typename Frozen>
void report_w0_bytes(benchmark::State& state, const Frozen& frozen) {
  double bytes = 0;
  if constexpr (lora::storage_detail::has_stored_bytes<Frozen>::value) {
    bytes = static_cast<double>(frozen.stored_bytes());
  } else {
    const std::size_t element = std::is_same_v<Frozen, lora::Bf16FrozenWeight> ? 2 : sizeof(float);
    bytes = static_cast<double>(frozen.out_features() * frozen.in_features()) * double(element);
  }
  state.counters["w0_bytes"] = bytes;
  if constexpr (std::is_base_of_v<lora::GgmlFrozenWeight, Frozen>)
    state.counters["panel_bytes"] = static_cast<double>(frozen.panel_bytes());
}

// ---- the families -------------------------------------------------------------------------------

/// W0 * X only, through the storage's own product: the baseline every ratio divides by.
template <typename Frozen>
void dense_forward(benchmark::State& state) {
  auto& f = Fixture<Frozen>::get(shape_of(state));
  timed_loop(state, [&] {
    f.layer.frozen().multiply(f.X, f.H);
    benchmark::DoNotOptimize(f.H.data());
    benchmark::ClobberMemory();
  });
  report_flops(state, f.shape);
  report_w0_bytes(state, f.layer.frozen());
}

/// Eigen's own `H = W0 * X` (its OpenMP threading, its per-call packing buffers): the product a
/// plain Eigen dense layer runs, for comparison with the library's allocation-free one.
void dense_forward_eigen(benchmark::State& state) {
  auto& f = Fixture<lora::DenseFrozenWeight<float>>::get(shape_of(state));
  const Matrix& W = f.layer.frozen().matrix();
  timed_loop(state, [&] {
    f.H.noalias() = W * f.X;
    benchmark::DoNotOptimize(f.H.data());
    benchmark::ClobberMemory();
  });
  report_flops(state, f.shape);
}

/// H = W0 X + s B (A X), unmerged. DoRA: H = m / ||W0 + s B A||_row .* (W0 X + s B A X), in
/// evaluation mode (an inference forward: the row norms every call, no tape for backward).
template <typename Frozen, bool Dora = false>
void lora_forward(benchmark::State& state) {
  auto& f = Fixture<Frozen, Dora>::get(shape_of(state));
  if (Dora) {
    f.layer.eval();
    f.layer.forward(f.X, f.H, f.ws);  // grows the evaluation path's workspace slots
  }
  timed_loop(state, [&] {
    f.layer.forward(f.X, f.H, f.ws);
    benchmark::DoNotOptimize(f.H.data());
    benchmark::ClobberMemory();
  });
  f.layer.train();
  report_flops(state, f.shape);
  report_w0_bytes(state, f.layer.frozen());
}

/// The merged layer's forward: should cost exactly the dense product.
template <typename Frozen>
void merged_forward(benchmark::State& state) {
  auto& f = Fixture<Frozen>::get(shape_of(state));
  f.layer.merge();
  timed_loop(state, [&] {
    f.layer.forward(f.X, f.H, f.ws);
    benchmark::DoNotOptimize(f.H.data());
    benchmark::ClobberMemory();
  });
  f.layer.unmerge();
  report_flops(state, f.shape);
}

/// Forward, then backward with dX (gradients accumulate; no optimiser step). DoRA: the training
/// forward keeps its tape, so backward needs no second dense product.
template <typename Frozen, bool Dora = false>
void train_step(benchmark::State& state) {
  auto& f = Fixture<Frozen, Dora>::get(shape_of(state));
  timed_loop(state, [&] {
    f.layer.forward(f.X, f.H, f.ws);
    f.layer.backward(f.X, f.G, f.dX, f.ws);
    benchmark::DoNotOptimize(f.dX.data());
    benchmark::ClobberMemory();
  });
  report_flops(state, f.shape);
  report_w0_bytes(state, f.layer.frozen());
}

/// Forward, then the gradients of A and B only (a first layer).
template <typename Frozen>
void train_step_no_input_grad(benchmark::State& state) {
  auto& f = Fixture<Frozen>::get(shape_of(state));
  timed_loop(state, [&] {
    f.layer.forward(f.X, f.H, f.ws);
    f.layer.backward_without_input_grad(f.X, f.G, f.ws);
    benchmark::DoNotOptimize(f.layer.grad_A().data());
    benchmark::ClobberMemory();
  });
  report_flops(state, f.shape);
}

void report_weight_bytes(benchmark::State& state, const Shape& s, std::size_t element_bytes) {
  // Read the weight once and write it once.
  state.SetBytesProcessed(state.iterations() * 2 * s.d * s.k *
                          static_cast<std::int64_t>(element_bytes));
}

/// Bytes per element of a storage's weight (merge reads and writes the weight once).
template <typename Frozen>
constexpr std::size_t storage_bytes() {
  return std::is_same_v<Frozen, lora::Bf16FrozenWeight> ? 2 : sizeof(float);
}
// (The NF4 merge reads 4-bit codes and writes an fp32 weight: counted as the fp32 write.)

template <typename Frozen>
void merge(benchmark::State& state) {
  auto& f = Fixture<Frozen>::get(shape_of(state));
  timed_loop(state, [&] {
    f.layer.merge();
    state.PauseTiming();
    f.layer.unmerge();
    state.ResumeTiming();
  });
  report_weight_bytes(state, f.shape, storage_bytes<Frozen>());
}

template <typename Frozen>
void unmerge(benchmark::State& state) {
  auto& f = Fixture<Frozen>::get(shape_of(state));
  timed_loop(state, [&] {
    state.PauseTiming();
    f.layer.merge();
    state.ResumeTiming();
    f.layer.unmerge();
  });
  report_weight_bytes(state, f.shape, storage_bytes<Frozen>());
}

/// dst = src for a d x k float weight: the memory-bound yardstick for merge and unmerge.
void weight_copy(benchmark::State& state) {
  const Shape s = shape_of(state);
  if (g_release_fixture) g_release_fixture();
  g_release_fixture = nullptr;
  const Matrix src = Matrix::Random(s.d, s.k);
  Matrix dst(s.d, s.k);
  dst = src;
  timed_loop(state, [&] {
    dst = src;
    benchmark::DoNotOptimize(dst.data());
    benchmark::ClobberMemory();
  });
  report_weight_bytes(state, s, sizeof(float));
}

/// The bf16 base on the strided layout (see Bf16WeightLayout), for comparison with the default.
struct Bf16StridedFrozenWeight : lora::Bf16FrozenWeight {
  explicit Bf16StridedFrozenWeight(const Matrix& W0)
      : lora::Bf16FrozenWeight(W0, lora::MergeMode::ExactRestore, lora::Bf16Backend::Auto,
                               lora::Bf16WeightLayout::Strided) {}
};

/// llama.cpp's block formats as the frozen base, quantized by llama.cpp's own quantizer.
template <lora::io::GgmlType Type>
struct GgmlFrozen : lora::GgmlFrozenWeight {
  explicit GgmlFrozen(const Matrix& W0) : lora::GgmlFrozenWeight(quantize(W0, Type)) {}
};
using GgmlQ4K = GgmlFrozen<lora::io::GgmlType::Q4_K>;
using GgmlQ8_0 = GgmlFrozen<lora::io::GgmlType::Q8_0>;
using GgmlQ6K = GgmlFrozen<lora::io::GgmlType::Q6_K>;
using GgmlQ4_0 = GgmlFrozen<lora::io::GgmlType::Q4_0>;

#if defined(LORA_WITH_ONEDNN)
/// The fp32 oneDNN storage reading its weight through strides (onednn::WeightLayout::Strided),
/// for comparison with the default (prepacked).
struct OneDnnStridedFrozenWeight : lora::onednn::OneDnnFrozenWeight {
  explicit OneDnnStridedFrozenWeight(Matrix W0)
      : lora::onednn::OneDnnFrozenWeight(std::move(W0), lora::MergeMode::InPlace,
                                         lora::onednn::WeightLayout::Strided) {}
};

/// oneDNN's bf16 matmul called directly: dst(n x d, f32) = src(n x k, bf16) * wei(k x d, bf16),
/// the row-major view of H = W X. `prepacked`: the weight in the layout oneDNN picks for this CPU
/// (format_tag::any, reordered once before timing); else plain row-major.
void onednn_matmul_bf16_reference(benchmark::State& state, bool prepacked) {
  const Shape s = shape_of(state);
  if (g_release_fixture) g_release_fixture();
  g_release_fixture = nullptr;
  using dims = dnnl::memory::dims;
  using tag = dnnl::memory::format_tag;
  using dt = dnnl::memory::data_type;
  const dnnl::engine& eng = lora::onednn::engine();
  dnnl::stream& stream = lora::onednn::stream();
  const Matrix W = Matrix::Random(s.d, s.k) * (1.0f / std::sqrt(static_cast<float>(s.k)));
  const Matrix X = Matrix::Random(s.k, s.n);
  lora::detail::Bf16Matrix Wb, Xb;
  lora::detail::to_bf16(W, Wb);  // column-major W (d x k) = row-major W^T (k x d)
  lora::detail::to_bf16(X, Xb);  // column-major X (k x n) = row-major X^T (n x k)
  Matrix H(s.d, s.n);
  const dnnl::memory::desc src_md(dims{s.n, s.k}, dt::bf16, tag::ab);
  const dnnl::memory::desc plain_md(dims{s.k, s.d}, dt::bf16, tag::ab);
  const dnnl::memory::desc wei_md =
      prepacked ? dnnl::memory::desc(dims{s.k, s.d}, dt::bf16, tag::any) : plain_md;
  const dnnl::memory::desc dst_md(dims{s.n, s.d}, dt::f32, tag::ab);
  const dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(src_md, wei_md, dst_md), eng);
  dnnl::memory plain(plain_md, eng, Wb.data());
  dnnl::memory wei = plain;
  if (prepacked) {
    wei = dnnl::memory(pd.weights_desc(), eng);
    dnnl::reorder(plain, wei).execute(stream, plain, wei);
    stream.wait();
  }
  dnnl::memory src(src_md, eng, Xb.data()), dst(dst_md, eng, H.data());
  const dnnl::matmul prim(pd);
  const std::unordered_map<int, dnnl::memory> args{
      {DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, wei}, {DNNL_ARG_DST, dst}};
  prim.execute(stream, args);  // warm up
  stream.wait();
  timed_loop(state, [&] {
    prim.execute(stream, args);
    stream.wait();
    benchmark::DoNotOptimize(H.data());
    benchmark::ClobberMemory();
  });
  report_flops(state, s);
  state.SetLabel(pd.impl_info_str());
}
void onednn_matmul_bf16_reference_packed(benchmark::State& state) {
  onednn_matmul_bf16_reference(state, true);
}
void onednn_matmul_bf16_reference_row_major(benchmark::State& state) {
  onednn_matmul_bf16_reference(state, false);
}
#endif

// ---- registration -------------------------------------------------------------------------------

constexpr std::array<std::array<std::int64_t, 4>, 5> kShapes = {{
    {512, 4096, 4096, 8},
    {512, 4096, 4096, 64},
    {128, 1024, 1024, 8},
    {1, 4096, 4096, 8},
    {2048, 1024, 1024, 16},
}};

benchmark::internal::Benchmark* add(const std::string& name, void (*fn)(benchmark::State&)) {
  auto* b = benchmark::RegisterBenchmark(name.c_str(), fn);
  b->UseRealTime()->Unit(benchmark::kMillisecond);
  for (const auto& s : kShapes) b->Args({s[0], s[1], s[2], s[3]});
  return b;
}

template <typename Frozen>
void add_families(const std::string& suffix, bool with_merge) {
  add("BM_DenseForward" + suffix, dense_forward<Frozen>);
  add("BM_LoRAForward" + suffix, lora_forward<Frozen>);
  add("BM_MergedForward" + suffix, merged_forward<Frozen>);
  add("BM_TrainStep" + suffix, train_step<Frozen>);
  add("BM_TrainStepNoInputGrad" + suffix, train_step_no_input_grad<Frozen>);
  add("BM_DoRAForward" + suffix, lora_forward<Frozen, true>);
  add("BM_DoRATrainStep" + suffix, train_step<Frozen, true>);
  if (with_merge) {
    add("BM_Merge" + suffix, merge<Frozen>);
    // A fixed count: Google Benchmark runs a loop until 0.5 s of *timed* work has passed, and
    // the bf16 unmerge is a flag flip (nanoseconds) behind an untimed 10 ms merge each time.
    add("BM_Unmerge" + suffix, unmerge<Frozen>)->Iterations(40);
  }
}

}  // namespace

int main(int argc, char** argv) {
  add_families<lora::DenseFrozenWeight<float>>("", true);
  add("BM_WeightCopy", weight_copy);
  add("BM_DenseForwardEigen", dense_forward_eigen);
#if defined(LORA_WITH_ONEDNN)
  add_families<lora::onednn::OneDnnFrozenWeight>("OneDnn", false);
#endif
  add_families<lora::Bf16FrozenWeight>("Bf16", true);
  add("BM_DenseForwardBf16Strided", dense_forward<Bf16StridedFrozenWeight>);
  add("BM_TrainStepBf16Strided", train_step<Bf16StridedFrozenWeight>);
#if defined(LORA_WITH_ONEDNN)
  add("BM_DenseForwardOneDnnStrided", dense_forward<OneDnnStridedFrozenWeight>);
  add("BM_TrainStepOneDnnStrided", train_step<OneDnnStridedFrozenWeight>);
  if (lora::Bf16FrozenWeight::onednn_available()) {
    add("BM_OneDnnMatmulBf16Reference", onednn_matmul_bf16_reference_packed);
    add("BM_OneDnnMatmulBf16ReferenceRowMajor", onednn_matmul_bf16_reference_row_major);
  }
#endif
  add_families<lora::Nf4FrozenWeight>("Nf4", true);
  add("BM_DenseForwardGgmlQ4K", dense_forward<GgmlQ4K>);
  add("BM_LoRAForwardGgmlQ4K", lora_forward<GgmlQ4K>);
  add("BM_TrainStepGgmlQ4K", train_step<GgmlQ4K>);
  add("BM_DenseForwardGgmlQ8_0", dense_forward<GgmlQ8_0>);
  add("BM_TrainStepGgmlQ8_0", train_step<GgmlQ8_0>);
  add("BM_DenseForwardGgmlQ6K", dense_forward<GgmlQ6K>);
  add("BM_DenseForwardGgmlQ4_0", dense_forward<GgmlQ4_0>);

  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::AddCustomContext("lora_eigen_threads", std::to_string(Eigen::nbThreads()));
  benchmark::AddCustomContext("lora_bf16_backend", lora::Bf16FrozenWeight::backend_report());
  benchmark::AddCustomContext("lora_nf4_backend", lora::Nf4FrozenWeight::backend_report());
  benchmark::AddCustomContext("lora_ggml_backend", lora::GgmlFrozenWeight::backend_report());
  benchmark::AddCustomContext("lora_ggml_fused_avx512",
                              lora::GgmlFrozenWeight::fused_avx512() ? "yes" : "no");
  benchmark::RunSpecifiedBenchmarks();
  // What the products ran on (oneDNN's implementations, e.g. whether AMX was used): known only
  // once they have run, so printed after them, to stderr.
  std::fprintf(stderr, "lora_bf16_backend after the run: %s\n",
               lora::Bf16FrozenWeight::backend_report().c_str());
  benchmark::Shutdown();
  return 0;
}
