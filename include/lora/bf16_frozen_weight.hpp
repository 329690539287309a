// Bf16FrozenWeight: the frozen base W0 stored in bfloat16, for LoRALinear<float>:
//   lora::LoRALinear<float, lora::Bf16FrozenWeight> layer(W0, cfg);
// Half the memory of an fp32 weight; the frozen products take X (or G) rounded to bf16 and
// accumulate in fp32, while A, B, their gradients and the adapter's terms stay fp32.
//
// Back ends, chosen at construction (Bf16Backend::Auto picks the first that works here):
//  - OneDnn: oneDNN's bf16 matmul (AMX or AVX-512 bf16 instructions where the CPU has them).
//    Compiled in only when lora::onednn is linked (LORA_WITH_ONEDNN); asking for it otherwise
//    throws at construction.
//    By default (Bf16WeightLayout::Prepacked) oneDNN reads W from a copy in the layout it prefers
//    on the running CPU, made at the first product and again after each merge or unmerge (one
//    copy per orientation used: W X, and W^T G for training); Bf16WeightLayout::Strided reads the
//    stored weight through strides instead (no copy).
//  - Portable: W0 widened to fp32 one depth panel at a time and multiplied by Eigen. Slower than
//    fp32 (a conversion on top of the same product), but it computes the same numbers: a product
//    of two bf16 values is exact in fp32, so both back ends differ only in summation order.
// Small batches (n <= kGemvMaxBatch columns, decoding) run on lora's own bf16 GEMV
// (lora/detail/bf16_gemv.hpp: reads W once, widening it on the fly) with the Portable back end
// and with OneDnn on the strided layout; the prepacked oneDNN product is faster still there.
//
// Merge computes diag(g)(W0 + s*B*A) in fp32 one column panel at a time and rounds it to bf16. With
// MergeMode::ExactRestore (this storage's default) it is built beside the pristine bf16 W0 (the two
// bf16 copies together take the memory of one fp32 weight) and unmerge is a flag, exact and O(1).
// With MergeMode::InPlace it overwrites W0 and unmerge subtracts the factors again and rounds:
// no second copy, but each cycle can move an element by bf16 rounding (about 2^-8 relative).
#pragma once

#include "lora/detail/bf16.hpp"
#include "lora/detail/bf16_backend.hpp"
#include "lora/detail/bf16_gemv.hpp"
#include "lora/detail/check.hpp"
#include "lora/detail/compiled_mode.hpp"
#include "lora/detail/finite.hpp"
#include "lora/detail/frozen_storage_base.hpp"
#include "lora/detail/gemm.hpp"
#include "lora/detail/low_rank.hpp"
#include "lora/frozen_storage.hpp"

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#if defined(LORA_WITH_ONEDNN)
#include "lora/onednn/matmul.hpp"

#include <mutex>
#endif

namespace lora {

/// Which kernel runs a Bf16FrozenWeight's products.
enum class Bf16Backend {
  Auto,      ///< OneDnn when compiled in and the CPU runs its bf16 matmul, else Portable.
  Portable,  ///< Eigen fp32 products on widened bf16 panels: runs everywhere.
  OneDnn,    ///< oneDNN's bf16 matmul; throws at construction when lora was built without it.
};

/// How the OneDnn back end hands the weight to oneDNN (the Portable back end ignores it).
enum class Bf16WeightLayout {
  /// A copy of W in the layout oneDNN prefers on this CPU, made at the first product and after
  /// each merge/unmerge: one copy of W (d*k*2 bytes) per orientation used (W X; W^T G).
  Prepacked,
  /// W read through strides from the stored column-major weight: no copy.
  Strided,
};

/// The frozen weight W0 (d x k) stored in bfloat16, for layers of float: see the top of this file.
class Bf16FrozenWeight : public detail::FrozenStorageBase<Bf16FrozenWeight, float> {
 public:
  /// Rounds W0 (out x in, fp32) to bf16 and stores it. `mode`: ExactRestore (the default) merges
  /// into a second bf16 buffer, InPlace into W0 itself (see the top of this file). Throws
  /// std::invalid_argument for an empty W0 or for Bf16Backend::OneDnn without oneDNN, and
  /// std::domain_error for an element of W0 that is NaN or infinite, or becomes so in bf16.
  explicit Bf16FrozenWeight(const Eigen::Ref<const Matrix>& W0,
                            MergeMode mode = MergeMode::ExactRestore,
                            Bf16Backend backend = Bf16Backend::Auto,
                            Bf16WeightLayout layout = Bf16WeightLayout::Prepacked);

  /// d, the rows of W0 (output features).
  Index out_features() const { return pristine_.rows(); }
  /// k, the columns of W0 (input features).
  Index in_features() const { return pristine_.cols(); }
  /// How unmerge() restores W0, chosen at construction (ExactRestore by default).
  MergeMode merge_mode() const { return mode_; }
  /// True while a delta is merged into the weight.
  bool is_merged() const { return is_merged_; }
  /// The kernel the products run on (resolved at construction).
  Bf16Backend backend() const { return backend_; }
  /// How the OneDnn back end hands the weight to oneDNN (chosen at construction).
  Bf16WeightLayout weight_layout() const { return layout_; }
  /// Batches of at most this many columns run on lora's bf16 GEMV (see the top of this file).
  static constexpr Index kGemvMaxBatch = 4;
  /// The portable kernel allocates nothing in steady state; oneDNN's execute() makes a few small
  /// allocations of its own per call.
  bool allocation_free() const {
    return backend_ == Bf16Backend::Portable && detail::kGemmAllocationFree;
  }
  /// Bytes of bf16 held: W0, the merged copy once an ExactRestore merge has made it, and the
  /// prepacked copies the oneDNN back end has made.
  std::size_t stored_bytes() const {
    std::size_t packed = 0;
#if defined(LORA_WITH_ONEDNN)
    if (onednn_) packed = onednn_->cache.packed_bytes();
#endif
    return static_cast<std::size_t>(pristine_.size() + merged_.size()) * sizeof(detail::bf16) +
           packed;
  }

  /// True when this build has the oneDNN back end and the CPU runs its bf16 matmul.
  static bool onednn_available() {
    return detail::onednn_bf16_available();
  }

  /// What Bf16Backend::Auto runs on this machine and why, e.g. "oneDNN 2.6.3, ISA
  /// avx512_core_bf16 (vdpbf16ps)" or "portable (built without oneDNN); CPU avx512_bf16: yes".
  /// Once products have run, it also lists the oneDNN implementations they use ("...; in use:
  /// brg:avx512_core_amx_bf16" where AMX runs them); product_report() details one weight's.
  static std::string backend_report();

  /// What runs this weight's products: one line per product oneDNN has run for it (shape, layout
  /// and oneDNN's implementation string), and the small-batch GEMV where it is used. Takes the
  /// product lock: for inspection, not for a hot path.
  std::string product_report() const;

  /// The bf16 weight in use: W0, or round(diag(g)(W0 + s*B*A)) while merged.   d x k.
  const detail::Bf16Matrix& bf16_weight() const {
    return is_merged_ && mode_ == MergeMode::ExactRestore ? merged_ : pristine_;
  }
  /// H(:, j) = W(:, ids[j]) widened to fp32, W the weight in use: a column lookup (an
  /// embedding's rows, held as the columns of this d x k weight), O(d n), whatever k is. The ids
  /// must be in [0, k) (the layer checks); allocates nothing.
  void gather_columns(const std::vector<std::int64_t>& ids, Eigen::Ref<Matrix> H) const {
    const detail::Bf16Matrix& w = bf16_weight();
    const Index d = out_features();
    for (std::size_t j = 0; j < ids.size(); ++j)
      detail::from_bf16(w.data() + static_cast<Index>(ids[j]) * d,
                        H.data() + static_cast<Index>(j) * H.outerStride(), d);
  }
  /// The bf16 W0; throws std::logic_error while an InPlace merge has overwritten it.   d x k.
  const detail::Bf16Matrix& pristine_weight() const {
    detail::require_state(!(is_merged_ && mode_ == MergeMode::InPlace),
                          "Bf16FrozenWeight::pristine_weight: an InPlace merge holds the merged "
                          "weight; unmerge() first");
    return pristine_;
  }

  /// The weight in use holds no NaN or infinity (a bf16 exponent of all ones); no allocation.
  bool all_finite() const {
    const detail::Bf16Matrix& w = bf16_weight();
    for (Index i = 0; i < w.size(); ++i)
      if (!bf16_finite(w.data()[i])) return false;
    return true;
  }

  /// out(i) = ||row i of W0||, the bf16 W0 as stored, widened and accumulated in double one column
  /// at a time. Throws std::logic_error while merged.
  void row_norms(Eigen::Ref<Eigen::VectorXd> out) const;

  /// The weight in use widened to fp32 (a new d x k matrix: for inspection and export).
  Matrix weight() const;

  /// W = round_bf16(diag(g) (W0 + s * B * A)) (B: d x r, A: r x k, g: d or empty), computed in
  /// fp32 one column panel at a time: beside W0 (ExactRestore; the second buffer is allocated on
  /// the first merge only) or over it (InPlace). Throws std::domain_error, leaving the weight as it
  /// was, where an element that was finite in W0 is not finite in bf16 (a bf16 rounds anything
  /// above about 3.3962e38 to infinity, although fp32 holds it), and in InPlace mode where a row
  /// scale g_i or its inverse is not finite in fp32 (unmerge() divides by g_i).
  void merge(float s, const Eigen::Ref<const Matrix>& B, const Eigen::Ref<const Matrix>& A,
             const Eigen::Ref<const Vector>& g);

  /// Back to W0: a flag (ExactRestore: exact, O(1)), or W = round_bf16(diag(1/g) W - s B A) with
  /// the factors of the merge (InPlace).
  void unmerge(float s, const Eigen::Ref<const Matrix>& B, const Eigen::Ref<const Matrix>& A,
               const Eigen::Ref<const Vector>& g);

  /// W0 = round_bf16(W) (same shape): the residual base of PiSSA and OLoRA ("QPiSSA" in bf16).
  /// Throws std::logic_error while merged, std::invalid_argument for another shape.
  void rebase(const Eigen::Ref<const Matrix>& W);

 private:
  friend class detail::FrozenStorageBase<Bf16FrozenWeight, float>;  // calls product()

  static bool bf16_finite(detail::bf16 h) {
    return (h & 0x7F80u) != 0x7F80u;
  }

  /// Computes diag(g)(W0 + s B A) panel by panel in fp32 and, where `dst` is given, writes it
  /// rounded to bf16 into *dst. Throws std::domain_error (after the panels, never from inside a
  /// parallel region) at the first element finite in W0 whose bf16 is not finite.
  void for_each_merged_panel(float s, const Eigen::Ref<const Matrix>& B,
                             const Eigen::Ref<const Matrix>& A, const Eigen::Ref<const Vector>& g,
                             detail::Bf16Matrix* dst);

  static Bf16Backend resolve(Bf16Backend wanted);

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

  std::uint64_t weight_version() const {
    return is_merged_ && mode_ == MergeMode::ExactRestore ? merged_version_ : pristine_version_;
  }

  /// Small batches on lora's GEMV, except where the prepacked oneDNN product is faster.
  bool use_gemv(Index n) const {
    return n <= kGemvMaxBatch &&
           (backend_ == Bf16Backend::Portable || layout_ == Bf16WeightLayout::Strided);
  }

  void product(const Eigen::Ref<const Matrix>& X, Eigen::Ref<Matrix> H, bool accumulate) const;

  void transposed_product(const Eigen::Ref<const Matrix>& G, Eigen::Ref<Matrix> dX,
                          bool accumulate) const;

  detail::Bf16Matrix pristine_;  // W0, never modified
  detail::Bf16Matrix merged_;    // round(W0 + s*B*A), valid while is_merged_
  bool is_merged_ = false;
  MergeMode mode_;
  Bf16Backend backend_;
  Bf16WeightLayout layout_;
  // Name the contents of pristine_ and merged_ for the prepacked copies (bumped when they change).
  std::uint64_t pristine_version_ = 0, merged_version_ = 0;

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
  detail::FreshOnCopy<OneDnnState> onednn_;  // a copy gets its own primitives
#endif
};

#if LORA_WITH_BODIES

LORA_FUNC Bf16FrozenWeight::Bf16FrozenWeight(const Eigen::Ref<const Matrix>& W0, MergeMode mode,
                                             Bf16Backend backend, Bf16WeightLayout layout)
    : mode_(mode), backend_(resolve(backend)), layout_(layout) {
  detail::require(W0.size() > 0, "Bf16FrozenWeight: W0 must not be empty, got ",
                  detail::shape_string(W0.rows(), W0.cols()));
  detail::require_finite("Bf16FrozenWeight", "W0", W0);  // as Nf4FrozenWeight: never stored
  detail::to_bf16(W0, pristine_);
  if (!all_finite()) {  // a finite fp32 above bf16's largest (about 3.3962e38) rounds to inf
    const Matrix back = weight();
    for (Index j = 0; j < back.cols(); ++j)
      for (Index i = 0; i < back.rows(); ++i)
        if (!std::isfinite(back(i, j)))
          throw std::domain_error(detail::concat("Bf16FrozenWeight: W0(", i, ", ", j,
                                                 ") = ", W0(i, j), " rounds to ", back(i, j),
                                                 " in bf16 (largest finite: about 3.3962e38)"));
  }
#if defined(LORA_WITH_ONEDNN)
  if (backend_ == Bf16Backend::OneDnn) onednn_.create();
#endif
}

LORA_FUNC std::string Bf16FrozenWeight::backend_report() {
  std::string report = detail::bf16_backend_report();
#if defined(LORA_WITH_ONEDNN)
  if (onednn_available()) {
    const std::vector<std::string> seen = onednn::implementations_seen();
    for (std::size_t i = 0; i < seen.size(); ++i)
      report += (i == 0 ? "; in use: " : ", ") + seen[i];
  }
#endif
  return report;
}

LORA_FUNC std::string Bf16FrozenWeight::product_report() const {
  std::string out;
  if (backend_ == Bf16Backend::Portable || layout_ == Bf16WeightLayout::Strided)
    out += std::string("n <= ") + std::to_string(kGemvMaxBatch) + ": lora bf16 GEMV (" +
           (detail::kBf16GemvAvx512 ? "AVX-512" : "portable loops") + ")\n";
  if (backend_ == Bf16Backend::Portable) out += "larger n: fp32 panels into Eigen\n";
#if defined(LORA_WITH_ONEDNN)
  if (onednn_)
    for (const std::string& line : onednn_->cache.report()) out += line + "\n";
#endif
  return out;
}

LORA_FUNC void Bf16FrozenWeight::row_norms(Eigen::Ref<Eigen::VectorXd> out) const {
  detail::require_state(!is_merged_, "Bf16FrozenWeight::row_norms: the weight is merged");
  detail::require(out.size() == out_features(), "Bf16FrozenWeight::row_norms: out must have ",
                  out_features(), " elements, got ", out.size());
  out.setZero();
  const Index d = out_features();
  for (Index j = 0; j < in_features(); ++j)
    for (Index i = 0; i < d; ++i) {
      const double w = detail::widen_bf16(pristine_(i, j));
      out(i) += w * w;
    }
  out = out.cwiseSqrt();
}

LORA_FUNC Bf16FrozenWeight::Matrix Bf16FrozenWeight::weight() const {
  const detail::Bf16Matrix& w = bf16_weight();
  Matrix out(w.rows(), w.cols());
  detail::from_bf16(w.data(), out.data(), w.size());
  return out;
}

LORA_FUNC void Bf16FrozenWeight::merge(float s, const Eigen::Ref<const Matrix>& B,
                                       const Eigen::Ref<const Matrix>& A,
                                       const Eigen::Ref<const Vector>& g) {
  check_merge_call("Bf16FrozenWeight::merge", true, g);
  if (mode_ == MergeMode::ExactRestore) {
    merged_.resize(out_features(), in_features());
    for_each_merged_panel(s, B, A, g, &merged_);  // a refusal leaves W0 as it was
  } else {
    check_inverse_row_scale("Bf16FrozenWeight::merge", g);
    for_each_merged_panel(s, B, A, g, nullptr);     // check every element first,
    for_each_merged_panel(s, B, A, g, &pristine_);  // then overwrite W0
  }
  is_merged_ = true;
  // Name the new contents: a prepacked copy of the old ones is remade at the next product.
  ++(mode_ == MergeMode::ExactRestore ? merged_version_ : pristine_version_);
}

LORA_FUNC void Bf16FrozenWeight::unmerge(float s, const Eigen::Ref<const Matrix>& B,
                                         const Eigen::Ref<const Matrix>& A,
                                         const Eigen::Ref<const Vector>& g) {
  check_merge_call("Bf16FrozenWeight::unmerge", false, g);
  if (mode_ == MergeMode::InPlace) {
    const Index d = out_features(), k = in_features();
    const Index panel = std::min<Index>(k, detail::panel_columns(d, 4, 8));
    const Index panels = (k + panel - 1) / panel;
    detail::parallel_for(panels, Eigen::nbThreads(), [&](Index p) {
      const Index j = p * panel, w = std::min(panel, k - j);
      Eigen::Map<Matrix> tmp(scratch(0, d * panel), d, w);
      detail::from_bf16(pristine_.data() + j * d, tmp.data(), d * w);
      if (g.size() != 0) tmp = g.cwiseInverse().asDiagonal() * tmp;
      detail::gemm_add(tmp, B, A.middleCols(j, w), -s);  // (d x r)(r x w), in fp32
      detail::to_bf16(tmp.data(), pristine_.data() + j * d, d * w);
    });
    ++pristine_version_;
  }
  is_merged_ = false;  // ExactRestore: W0 and its prepacked copies are as they were
}

LORA_FUNC void Bf16FrozenWeight::rebase(const Eigen::Ref<const Matrix>& W) {
  check_rebase_call("Bf16FrozenWeight::rebase", W);
  detail::to_bf16(W, pristine_);
  ++pristine_version_;  // prepacked copies of the old W0 are remade at the next product
}

LORA_FUNC void Bf16FrozenWeight::for_each_merged_panel(float s, const Eigen::Ref<const Matrix>& B,
                                                       const Eigen::Ref<const Matrix>& A,
                                                       const Eigen::Ref<const Vector>& g,
                                                       detail::Bf16Matrix* dst) {
  const Index d = out_features(), k = in_features();
  const Index panel = std::min<Index>(k, detail::panel_columns(d, 4, 8));
  const Index panels = (k + panel - 1) / panel;
  std::vector<Index> first_bad(static_cast<std::size_t>(panels), -1);  // column-major index
  detail::parallel_for(panels, Eigen::nbThreads(), [&](Index p) {      // independent panels
    const Index j = p * panel, w = std::min(panel, k - j);
    Eigen::Map<Matrix> tmp(scratch(0, d * panel), d, w);
    detail::from_bf16(pristine_.data() + j * d, tmp.data(), d * w);
    detail::gemm_add(tmp, B, A.middleCols(j, w), s);  // (d x r)(r x w), in fp32
    if (g.size() != 0) tmp = g.asDiagonal() * tmp;
    for (Index e = 0; e < d * w; ++e) {
      if (!bf16_finite(detail::round_to_bf16(tmp.data()[e])) &&
          bf16_finite(pristine_.data()[j * d + e])) {
        first_bad[static_cast<std::size_t>(p)] = j * d + e;
        return;
      }
    }
    if (dst != nullptr) detail::to_bf16(tmp.data(), dst->data() + j * d, d * w);
  });
  for (Index p = 0; p < panels; ++p) {
    const Index e = first_bad[static_cast<std::size_t>(p)];
    if (e < 0) continue;
    const Index i = e % d, jj = e / d;
    const double value = static_cast<double>(detail::widen_bf16(pristine_(i, jj))) +
                         static_cast<double>(s) * B.row(i).template cast<double>().dot(
                                                      A.col(jj).template cast<double>());
    throw std::domain_error(
        detail::concat("Bf16FrozenWeight::merge: the merged weight overflows bf16 at (", i, ", ",
                       jj, "): W0 = ", detail::widen_bf16(pristine_(i, jj)), " becomes ",
                       g.size() ? value * static_cast<double>(g(i)) : value,
                       " (bf16 holds at most 3.3895e38); the weight was left as it was"));
  }
}

LORA_FUNC Bf16Backend Bf16FrozenWeight::resolve(Bf16Backend wanted) {
  return detail::resolve_bf16_backend(wanted, "Bf16FrozenWeight", "Bf16Backend");
}

LORA_FUNC void Bf16FrozenWeight::product(const Eigen::Ref<const Matrix>& X, Eigen::Ref<Matrix> H,
                                         bool accumulate) const {
  const Index d = out_features(), k = in_features(), n = X.cols();
  if (n == 0) return;
  const bool gemv = use_gemv(n);
#if defined(LORA_WITH_ONEDNN)
  if (backend_ == Bf16Backend::OneDnn && !gemv) {
    std::lock_guard<std::mutex> lock(onednn_->mutex);
    const detail::bf16* xb = onednn_->rounded(X);
    onednn_->cache.run(onednn::product_shape(d, k, n, k, H.outerStride(), onednn::dt::bf16,
                                             accumulate, layout_ == Bf16WeightLayout::Prepacked),
                       xb, bf16_weight().data(), H.data(), weight_version());
    return;
  }
#endif
  // X as the bf16 product sees it: rounded to bf16, held exactly in fp32.
  Eigen::Map<Matrix> Xr(scratch(1, k * n), k, n);
  for (Index j = 0; j < n; ++j)
    detail::round_through_bf16(X.data() + j * X.outerStride(), Xr.col(j).data(), k);
  if (gemv) {  // H (+)= W Xr, one pass over W
    detail::bf16_gemv(bf16_weight().data(), d, k, Xr.data(), k, n, H.data(), H.outerStride(),
                      accumulate, Eigen::nbThreads());
    return;
  }
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

LORA_FUNC void Bf16FrozenWeight::transposed_product(const Eigen::Ref<const Matrix>& G,
                                                    Eigen::Ref<Matrix> dX, bool accumulate) const {
  const Index d = out_features(), k = in_features(), n = G.cols();
  if (n == 0) return;
  const bool gemv = use_gemv(n);
#if defined(LORA_WITH_ONEDNN)
  if (backend_ == Bf16Backend::OneDnn && !gemv) {
    std::lock_guard<std::mutex> lock(onednn_->mutex);
    const detail::bf16* gb = onednn_->rounded(G);
    onednn_->cache.run(
        onednn::transposed_product_shape(d, k, n, d, dX.outerStride(), onednn::dt::bf16, accumulate,
                                         layout_ == Bf16WeightLayout::Prepacked),
        gb, bf16_weight().data(), dX.data(), weight_version());
    return;
  }
#endif
  Eigen::Map<Matrix> Gr(scratch(1, d * n), d, n);
  for (Index j = 0; j < n; ++j)
    detail::round_through_bf16(G.data() + j * G.outerStride(), Gr.col(j).data(), d);
  if (!accumulate) dX.setZero();
  if (gemv) {  // dX += W^T Gr, a dot product per column of W
    detail::bf16_gemv_transposed_add(bf16_weight().data(), d, k, Gr.data(), d, n, dX.data(),
                                     dX.outerStride(), Eigen::nbThreads());
    return;
  }
  const detail::Bf16Matrix& W = bf16_weight();
  float* panel = scratch(0, kPanelDepth * k);
  for (Index i = 0; i < d; i += kPanelDepth) {  // dX += W(i:i+p, :)^T * Gr(i:i+p, :)
    const Index p = std::min(kPanelDepth, d - i);
    Eigen::Map<Matrix> Wp(panel, p, k);
    for (Index j = 0; j < k; ++j) detail::from_bf16(W.data() + i + j * d, Wp.col(j).data(), p);
    detail::gemm_add(dX, Wp.transpose(), Gr.middleRows(i, p), 1.0f);  // (k x p)(p x n)
  }
}

#endif  // LORA_WITH_BODIES

}  // namespace lora
