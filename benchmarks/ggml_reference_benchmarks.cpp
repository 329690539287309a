// Decoding (a batch of one token) on llama.cpp's quantized weights: lora's product against
// llama.cpp's own, in one binary. W0·x for a d x k weight in Q4_K, Q6_K, Q8_0 and Q4_0:
//   BM_LoraDecode/<type>/k/d   GgmlFrozenWeight::multiply (lora's fused decoding kernel)
//   BM_GgmlDecode/<type>/k/d   ggml_mul_mat on ggml's CPU back end (the kernel llama.cpp serves
//                              with: it rounds x to 8-bit blocks and runs integer dot products),
//                              one graph compute per iteration, on one thread
//   BM_DenseDecode/k/d         the fp32 product (DenseFrozenWeight<float>): the baseline
// The same blocks (ggml_quantize_chunk's, from one random weight) in both. Run with
// OMP_NUM_THREADS=1 so that every product has one thread.
#include <benchmark/benchmark.h>

#include <cstdint>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml.h"
#include "lora/dense_frozen_weight.hpp"
#include "lora/ggml_frozen_weight.hpp"

namespace {

using lora::io::GgmlType;

Eigen::MatrixXf random_matrix(Eigen::Index rows, Eigen::Index cols, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 0.02f);
  Eigen::MatrixXf m(rows, cols);
  for (Eigen::Index i = 0; i < m.size(); ++i) m.data()[i] = normal(rng);
  return m;
}

// ggml_quantize_chunk's blocks of W (rows as a GGUF tensor stores them).
std::vector<std::uint8_t> ggml_blocks(const Eigen::MatrixXf& W, GgmlType type) {
  const Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> rows = W;
  const auto t = static_cast<ggml_type>(type);
  std::vector<std::uint8_t> out(ggml_row_size(t, W.cols()) * static_cast<std::size_t>(W.rows()));
  ggml_quantize_chunk(t, rows.data(), out.data(), 0, W.rows(), W.cols(), nullptr);
  return out;
}

// ggml's CPU back end (loaded from llama.cpp's prebuilt folder), on one thread.
ggml_backend_t cpu_backend() {
  static ggml_backend_t backend = [] {
    ggml_backend_load_all_from_path(LORA_LLAMA_CPP_LIB_DIR);
    ggml_backend_t b = ggml_backend_init_by_type(GGML_BACKEND_DEVICE_TYPE_CPU, nullptr);
    if (b == nullptr) throw std::runtime_error("ggml: no CPU back end");
    auto set_threads = reinterpret_cast<ggml_backend_set_n_threads_t>(
        ggml_backend_reg_get_proc_address(ggml_backend_dev_backend_reg(ggml_backend_get_device(b)),
                                          "ggml_backend_set_n_threads"));
    if (set_threads != nullptr) set_threads(b, 1);
    return b;
  }();
  return backend;
}

GgmlType type_of(int64_t i) {
  const GgmlType types[] = {GgmlType::Q4_K, GgmlType::Q6_K, GgmlType::Q8_0, GgmlType::Q4_0};
  return types[i];
}

void set_label(benchmark::State& state, GgmlType type) {
  state.SetLabel(lora::io::ggml_type_traits(type).name);
}

void BM_LoraDecode(benchmark::State& state) {
  const GgmlType type = type_of(state.range(0));
  const Eigen::Index k = state.range(1), d = state.range(2);
  const Eigen::MatrixXf W = random_matrix(d, k, 1);
  const lora::GgmlFrozenWeight w0(ggml_blocks(W, type), type, k, d, "W0");
  const Eigen::MatrixXf x = random_matrix(k, 1, 2);
  Eigen::MatrixXf h(d, 1);
  for (auto _ : state) {
    w0.multiply(x, h);
    benchmark::DoNotOptimize(h.data());
  }
  state.counters["w0_bytes"] = static_cast<double>(w0.packed_bytes());
  set_label(state, type);
}

void BM_GgmlDecode(benchmark::State& state) {
  const GgmlType type = type_of(state.range(0));
  const std::int64_t k = state.range(1), d = state.range(2);
  const Eigen::MatrixXf W = random_matrix(d, k, 1);
  const std::vector<std::uint8_t> blocks = ggml_blocks(W, type);
  const Eigen::MatrixXf x = random_matrix(k, 1, 2);

  ggml_init_params params{4 * ggml_tensor_overhead() + ggml_graph_overhead(), nullptr, true};
  ggml_context* ctx = ggml_init(params);
  ggml_tensor* w = ggml_new_tensor_2d(ctx, static_cast<ggml_type>(type), k, d);
  ggml_tensor* v = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, k, 1);
  ggml_tensor* y = ggml_mul_mat(ctx, w, v);
  ggml_cgraph* graph = ggml_new_graph(ctx);
  ggml_build_forward_expand(graph, y);
  ggml_backend_t backend = cpu_backend();
  ggml_backend_buffer_t buffer = ggml_backend_alloc_ctx_tensors(ctx, backend);
  ggml_backend_tensor_set(w, blocks.data(), 0, blocks.size());
  ggml_backend_tensor_set(v, x.data(), 0, static_cast<std::size_t>(k) * sizeof(float));
  for (auto _ : state) {
    if (ggml_backend_graph_compute(backend, graph) != GGML_STATUS_SUCCESS)
      state.SkipWithError("ggml_backend_graph_compute failed");
  }
  // The two products agree (within the rounding of x that ggml's kernel makes).
  Eigen::VectorXf theirs(d);
  ggml_backend_tensor_get(y, theirs.data(), 0, static_cast<std::size_t>(d) * sizeof(float));
  const lora::GgmlFrozenWeight w0(blocks, type, k, d, "W0");
  Eigen::MatrixXf ours(d, 1);
  w0.multiply(x, ours);
  state.counters["max_rel_diff_to_lora"] = static_cast<double>(
      (theirs - ours.col(0)).cwiseAbs().maxCoeff() / ours.cwiseAbs().maxCoeff());
  ggml_backend_buffer_free(buffer);
  ggml_free(ctx);
  set_label(state, type);
}

void BM_DenseDecode(benchmark::State& state) {
  const Eigen::Index k = state.range(0), d = state.range(1);
  const lora::DenseFrozenWeight<float> w0(random_matrix(d, k, 1));
  const Eigen::MatrixXf x = random_matrix(k, 1, 2);
  Eigen::MatrixXf h(d, 1);
  for (auto _ : state) {
    w0.multiply(x, h);
    benchmark::DoNotOptimize(h.data());
  }
}

void shapes(benchmark::internal::Benchmark* b) {
  for (int64_t t = 0; t < 4; ++t) b->Args({t, 4096, 4096});
}

BENCHMARK(BM_LoraDecode)->Apply(shapes)->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK(BM_GgmlDecode)->Apply(shapes)->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK(BM_DenseDecode)->Args({4096, 4096})->Unit(benchmark::kMicrosecond)->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
