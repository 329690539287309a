// Bf16FrozenWeight: the frozen base W0 stored in bfloat16, for LoRALinear<float>:
//   lora::LoRALinear<float, lora::Bf16FrozenWeight> layer(W0, cfg);
// Half the memory of an fp32 weight; the frozen products take X (or G) rounded to bf16 and
// accumulate in fp32, while A, B, their gradients and the adapter's terms stay fp32.
//
// Back ends, chosen at construction (Bf16Backend::Auto picks the first that works here):
//  - OneDnn: oneDNN's bf16 matmul (AMX or AVX-512 bf16 instructions where the CPU has them).
//    Compiled in only when lora::onednn is linked (LORA_WITH_ONEDNN); asking for it otherwise
//    throws at construction.
//  - Portable: W0 widened to fp32 one depth panel at a time and multiplied by Eigen. Slower than
//    fp32 (a conversion on top of the same product), but it computes the same numbers: a product
//    of two bf16 values is exact in fp32, so both back ends differ only in summation order.
//
// Merge keeps the pristine bf16 W0 and builds round_bf16(W0 + s*B*A), computed in fp32, beside it
// (the two bf16 copies together take the memory of one fp32 weight): unmerge is a flag, exact and
// O(1), whatever the MergeMode (which this storage accepts and ignores: there is no drift to
// trade for memory).
#pragma once

#include "lora/config.hpp"
#include "lora/detail/bf16.hpp"
#include "lora/detail/check.hpp"
#include "lora/detail/gemm.hpp"
#include "lora/detail/low_rank.hpp"

#include <Eigen/Core>

#include <algorithm>
#include <memory>
#include <string>
#include <utility>

#if defined(LORA_WITH_ONEDNN)
#include "lora/onednn/matmul.hpp"

#include <mutex>
#include <vector>
#endif

namespace lora {

/// Which kernel runs a Bf16FrozenWeight's products.
enum class Bf16Backend {
  Auto,      ///< OneDnn when compiled in and the CPU runs its bf16 matmul, else Portable.
  Portable,  ///< Eigen fp32 products on widened bf16 panels: runs everywhere.
  OneDnn,    ///< oneDNN's bf16 matmul; throws at construction when lora was built without it.
};

class Bf16FrozenWeight {
 public:
  using Scalar = float;
  using Matrix = Eigen::MatrixXf;
  using Index = Eigen::Index;

  /// Rounds W0 (out x in, fp32) to bf16 and stores it. `mode` is accepted for the seam and ignored
  /// (unmerge is always exact here). Throws std::invalid_argument for an empty W0 or for
  /// Bf16Backend::OneDnn without oneDNN.
  explicit Bf16FrozenWeight(const Eigen::Ref<const Matrix>& W0, MergeMode mode = MergeMode::InPlace,
                            Bf16Backend backend = Bf16Backend::Auto)
      : mode_(mode), backend_(resolve(backend)) {
    detail::require(W0.size() > 0, "Bf16FrozenWeight: W0 must not be empty, got ",
                    detail::shape_string(W0.rows(), W0.cols()));
    detail::to_bf16(W0, pristine_);
#if defined(LORA_WITH_ONEDNN)
    if (backend_ == Bf16Backend::OneDnn) onednn_ = std::make_unique<OneDnnState>();
#endif
  }

  Bf16FrozenWeight(const Bf16FrozenWeight& o)
      : pristine_(o.pristine_),
        merged_(o.merged_),
        is_merged_(o.is_merged_),
        mode_(o.mode_),
        backend_(o.backend_) {
#if defined(LORA_WITH_ONEDNN)
    if (backend_ == Bf16Backend::OneDnn) onednn_ = std::make_unique<OneDnnState>();
#endif
  }
  Bf16FrozenWeight& operator=(const Bf16FrozenWeight& o) {
    if (this != &o) *this = Bf16FrozenWeight(o);
    return *this;
  }
  Bf16FrozenWeight(Bf16FrozenWeight&&) noexcept = default;
  Bf16FrozenWeight& operator=(Bf16FrozenWeight&&) noexcept = default;

  Index out_features() const {
    return pristine_.rows();
  }
  Index in_features() const {
    return pristine_.cols();
  }
  MergeMode merge_mode() const {
    return mode_;
  }
  bool is_merged() const {
    return is_merged_;
  }
  Bf16Backend backend() const {
    return backend_;
  }

  /// True when this build has the oneDNN back end and the CPU runs its bf16 matmul.
  static bool onednn_available() {
#if defined(LORA_WITH_ONEDNN)
    return onednn::bf16_matmul_supported();
#else
    return false;
#endif
  }

  /// What Bf16Backend::Auto runs on this machine and why, e.g. "oneDNN 2.6.3, ISA
  /// avx512_core_bf16 (vdpbf16ps)" or "portable (built without oneDNN); CPU avx512_bf16: yes".
  static std::string backend_report() {
#if defined(LORA_WITH_ONEDNN)
    if (onednn_available()) return onednn::runtime_report();
    return "portable (oneDNN cannot run a bf16 matmul on this CPU: " + onednn::runtime_report() +
           ")";
#else
    return std::string("portable (built without oneDNN); CPU avx512_bf16: ") + cpu_bf16_flag();
#endif
  }

  /// The bf16 weight in use: W0, or round(W0 + s*B*A) while merged.   d x k.
  const detail::Bf16Matrix& bf16_weight() const {
    return is_merged_ ? merged_ : pristine_;
  }
  /// The pristine bf16 W0, whatever the merge state.   d x k.
  const detail::Bf16Matrix& pristine_weight() const {
    return pristine_;
  }

  /// The weight in use widened to fp32 (a new d x k matrix: for inspection and export).
  Matrix weight() const {
    const detail::Bf16Matrix& w = bf16_weight();
    Matrix out(w.rows(), w.cols());
    detail::from_bf16(w.data(), out.data(), w.size());
    return out;
  }

  /// H = W * bf16(X), accumulated in fp32.   X: k x n,  H: d x n (must not alias X).
  void multiply(const Eigen::Ref<const Matrix>& X, Eigen::Ref<Matrix> H) const {
    product(X, H, false);
  }
  /// H += W * bf16(X).
  void multiply_add(const Eigen::Ref<const Matrix>& X, Eigen::Ref<Matrix> H) const {
    product(X, H, true);
  }
  /// dX = W^T * bf16(G), accumulated in fp32.   G: d x n,  dX: k x n.
  void multiply_transposed(const Eigen::Ref<const Matrix>& G, Eigen::Ref<Matrix> dX) const {
    transposed_product(G, dX, false);
  }
  /// dX += W^T * bf16(G).
  void multiply_transposed_add(const Eigen::Ref<const Matrix>& G, Eigen::Ref<Matrix> dX) const {
    transposed_product(G, dX, true);
  }

  /// Builds round_bf16(W0 + s * B * A) beside W0, computed in fp32 one column panel at a time
  /// (allocates the second bf16 buffer on the first merge only).   B: d x r,  A: r x k.
  void merge(float s, const Eigen::Ref<const Matrix>& B, const Eigen::Ref<const Matrix>& A) {
    detail::require_state(!is_merged_, "Bf16FrozenWeight::merge: a delta is already merged");
    const Index d = out_features(), k = in_features();
    merged_.resize(d, k);
    const Index panel = std::min<Index>(k, detail::panel_columns(d, 4, 8));
    const Index panels = (k + panel - 1) / panel;
    detail::parallel_for(panels, Eigen::nbThreads(), [&](Index p) {  // independent panels
      const Index j = p * panel;
      const Index w = std::min(panel, k - j);
      Eigen::Map<Matrix> tmp(scratch(0, d * panel), d, w);
      detail::from_bf16(pristine_.data() + j * d, tmp.data(), d * w);
      detail::gemm_add(tmp, B, A.middleCols(j, w), s);  // (d x r)(r x w), in fp32
      detail::to_bf16(tmp.data(), merged_.data() + j * d, d * w);
    });
    is_merged_ = true;
  }

  /// Back to the pristine W0: exact and O(1) (the merged copy is kept for the next merge).
  void unmerge(float /*s*/, const Eigen::Ref<const Matrix>& /*B*/,
               const Eigen::Ref<const Matrix>& /*A*/) {
    detail::require_state(is_merged_, "Bf16FrozenWeight::unmerge: nothing is merged");
    is_merged_ = false;
  }

 private:
  static Bf16Backend resolve(Bf16Backend wanted) {
    if (wanted == Bf16Backend::Portable) return wanted;
#if defined(LORA_WITH_ONEDNN)
    if (onednn_available()) return Bf16Backend::OneDnn;
    detail::require(wanted == Bf16Backend::Auto,
                    "Bf16FrozenWeight: the oneDNN back end was requested, but oneDNN cannot run a "
                    "bf16 matmul on this CPU (",
                    onednn::runtime_report(), "); use Bf16Backend::Auto or Portable");
    return Bf16Backend::Portable;
#else
    detail::require(wanted == Bf16Backend::Auto,
                    "Bf16FrozenWeight: the oneDNN back end was requested, but lora was built "
                    "without oneDNN; link the lora::onednn CMake target (Debian: apt-get install "
                    "libdnnl-dev) or use Bf16Backend::Auto or Portable");
    return Bf16Backend::Portable;
#endif
  }

#if !defined(LORA_WITH_ONEDNN)
  static const char* cpu_bf16_flag() {
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
    return __builtin_cpu_supports("avx512bf16") ? "yes" : "no";
#else
    return "unknown";
#endif
  }
#endif

  /// A per-thread, grow-only fp32 buffer (slot 0..2): const products may run on many threads at
  /// once, and a steady-state call allocates nothing.
  static float* scratch(int slot, Index count) {
    thread_local Eigen::VectorXf buffers[3];
    Eigen::VectorXf& b = buffers[slot];
    if (b.size() < count) b.resize(count);
    return b.data();
  }

  // Depth of a portable panel: W's fp32 panel is depth x (d or k) floats.
  static constexpr Index kPanelDepth = 256;

  void product(const Eigen::Ref<const Matrix>& X, Eigen::Ref<Matrix> H, bool accumulate) const {
    const Index d = out_features(), k = in_features(), n = X.cols();
    if (n == 0) return;
#if defined(LORA_WITH_ONEDNN)
    if (backend_ == Bf16Backend::OneDnn) {
      std::lock_guard<std::mutex> lock(onednn_->mutex);
      const detail::bf16* xb = onednn_->rounded(X);
      onednn_->cache.run(
          onednn::product_shape(d, k, n, k, H.outerStride(), onednn::dt::bf16, accumulate), xb,
          bf16_weight().data(), H.data());
      return;
    }
#endif
    // X as the bf16 product sees it: rounded to bf16, held exactly in fp32.
    Eigen::Map<Matrix> Xr(scratch(1, k * n), k, n);
    for (Index j = 0; j < n; ++j)
      detail::round_through_bf16(X.data() + j * X.outerStride(), Xr.col(j).data(), k);
    if (!accumulate) H.setZero();
    const detail::Bf16Matrix& W = bf16_weight();
    float* panel = scratch(0, d * kPanelDepth);
    for (Index j = 0; j < k; j += kPanelDepth) {  // H += W(:, j:j+w) * Xr(j:j+w, :)
      const Index w = std::min(kPanelDepth, k - j);
      Eigen::Map<Matrix> Wp(panel, d, w);
      detail::from_bf16(W.data() + j * d, Wp.data(), d * w);  // columns are contiguous
      detail::gemm_add(H, Wp, Xr.middleRows(j, w), 1.0f);     // (d x w)(w x n)
    }
  }

  void transposed_product(const Eigen::Ref<const Matrix>& G, Eigen::Ref<Matrix> dX,
                          bool accumulate) const {
    const Index d = out_features(), k = in_features(), n = G.cols();
    if (n == 0) return;
#if defined(LORA_WITH_ONEDNN)
    if (backend_ == Bf16Backend::OneDnn) {
      std::lock_guard<std::mutex> lock(onednn_->mutex);
      const detail::bf16* gb = onednn_->rounded(G);
      onednn_->cache.run(onednn::transposed_product_shape(d, k, n, d, dX.outerStride(),
                                                          onednn::dt::bf16, accumulate),
                         gb, bf16_weight().data(), dX.data());
      return;
    }
#endif
    Eigen::Map<Matrix> Gr(scratch(1, d * n), d, n);
    for (Index j = 0; j < n; ++j)
      detail::round_through_bf16(G.data() + j * G.outerStride(), Gr.col(j).data(), d);
    if (!accumulate) dX.setZero();
    const detail::Bf16Matrix& W = bf16_weight();
    float* panel = scratch(0, kPanelDepth * k);
    for (Index i = 0; i < d; i += kPanelDepth) {  // dX += W(i:i+p, :)^T * Gr(i:i+p, :)
      const Index p = std::min(kPanelDepth, d - i);
      Eigen::Map<Matrix> Wp(panel, p, k);
      for (Index j = 0; j < k; ++j) detail::from_bf16(W.data() + i + j * d, Wp.col(j).data(), p);
      detail::gemm_add(dX, Wp.transpose(), Gr.middleRows(i, p), 1.0f);  // (k x p)(p x n)
    }
  }

  detail::Bf16Matrix pristine_;  // W0, never modified
  detail::Bf16Matrix merged_;    // round(W0 + s*B*A), valid while is_merged_
  bool is_merged_ = false;
  MergeMode mode_;
  Bf16Backend backend_;

#if defined(LORA_WITH_ONEDNN)
  // Cached primitives and the bf16 copy of the product's input, behind one mutex.
  struct OneDnnState {
    std::mutex mutex;
    onednn::MatmulCache cache;
    std::vector<detail::bf16> input;

    /// The input rounded to bf16, packed (leading dimension = rows); grows, never shrinks.
    const detail::bf16* rounded(const Eigen::Ref<const Matrix>& in) {
      const std::size_t need = static_cast<std::size_t>(in.size());
      if (input.size() < need) input.resize(need);
      for (Index j = 0; j < in.cols(); ++j)
        detail::to_bf16(in.data() + j * in.outerStride(), input.data() + j * in.rows(), in.rows());
      return input.data();
    }
  };
  std::unique_ptr<OneDnnState> onednn_;
#endif
};

}  // namespace lora
