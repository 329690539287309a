// What the storages of a block-quantized frozen weight share (Nf4FrozenWeight, GgmlFrozenWeight):
// W0 (d x k) stays packed, and every product dequantizes it on the fly, one panel at a time, into
// a per-thread buffer, then multiplies the panel:
//  - Portable (Eigen): fp32 panels times X (or G) in fp32: the only error beyond the quantization
//    is fp32 summation.
//  - OneDnn (LORA_WITH_ONEDNN, oneDNN's bf16 matmul): panels rounded to bf16 (relative 2^-9)
//    times X (or G) rounded to bf16, accumulated in fp32.
// The products are cut into panels of at most 256 rows of W (for H = W X) or 256 columns (for
// dX = W^T G, from the same packed weight), spread over Eigen::nbThreads() threads; each thread
// dequantizes its panel into its own grow-only buffer (at most about 4 MiB in fp32, 2 MiB in
// bf16), so a product forks and joins once and a steady-state product allocates nothing.
//
// Merge: packed W0 cannot absorb s*B*A, so merge() builds W = diag(g) (dequant(W0) + s B A) in
// fp32 beside it (d*k*4 bytes), the products use it while merged, and unmerge() drops it: W0,
// which never changed, is back bit for bit. MergeMode::ExactRestore is the only mode.
//
// A storage derives from PanelStorage<Itself> (CRTP), befriends it, and provides
//   static constexpr const char* kStorageName;        "Nf4FrozenWeight", for messages
//   Index column_alignment() const;                   a row segment starts at a multiple of it
//   void dequantize_row(row, col0, count, float*) const;          W0(row, col0 : col0+count)
//   void dequantize_row_bf16(row, col0, count, bf16*) const;      the same rounded to bf16
//   bool packed_finite() const;                       the packed W0 decodes to finite values
//   bool small_batch_product(X, H, accumulate) const; optional fast path (true: it ran)
#pragma once

#include "lora/detail/bf16.hpp"
#include "lora/detail/check.hpp"
#include "lora/detail/frozen_storage_base.hpp"
#include "lora/detail/gemm.hpp"
#include "lora/frozen_storage.hpp"

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(LORA_WITH_ONEDNN)
#include "lora/onednn/matmul.hpp"

#include <mutex>
#if defined(_OPENMP)
#include <omp.h>
#endif
#endif

namespace lora::detail {

/// The panel products, the merge and the inspection of a block-quantized fp32 storage (see the
/// top of this file).
template <typename Derived>
class PanelStorage : public FrozenStorageBase<Derived, float> {
  using Base = FrozenStorageBase<Derived, float>;

 public:
  using typename Base::Index;
  using typename Base::Matrix;
  using typename Base::Vector;

  /// d, the rows of W0 (output features).
  Index out_features() const { return d_; }
  /// k, the columns of W0 (input features).
  Index in_features() const { return k_; }
  /// Always MergeMode::ExactRestore: merge builds the merged weight beside the packed W0.
  MergeMode merge_mode() const { return MergeMode::ExactRestore; }
  /// True while a merged fp32 weight is in use.
  bool is_merged() const { return is_merged_; }
  /// True when the three products allocate nothing in steady state: the portable kernel (oneDNN's
  /// matmul execution makes a few small allocations of its own per call).
  bool allocation_free() const { return !use_onednn_ && kGemmAllocationFree; }

  /// dequant(W0) as a new fp32 d x k matrix (for inspection and export).
  Matrix dequantized() const;

  /// diag(g) (dequant(W0) + s B A) as a new fp32 d x k matrix, without merging: the weight of a
  /// merged model, for serving.   B: d x r,  A: r x k,  g: d or empty (all ones).
  /// Throws std::invalid_argument for wrong shapes and std::domain_error when an element is not
  /// finite in fp32.
  Matrix merged_weight(float s, const Eigen::Ref<const Matrix>& B,
                       const Eigen::Ref<const Matrix>& A,
                       const Eigen::Ref<const Vector>& g = Vector()) const {
    return build_merged(concat(Derived::kStorageName, "::merged_weight").c_str(), s, B, A, g);
  }

  /// The weight in use, as a new fp32 d x k matrix: dequant(W0), or the merged weight.
  Matrix weight() const { return is_merged_ ? merged_ : dequantized(); }

  /// True when the weight in use holds no NaN or infinity (allocates nothing).
  bool all_finite() const { return is_merged_ ? merged_.allFinite() : self().packed_finite(); }

  /// out(i) = || row i of dequant(W0) ||_2 in double, segment by segment (no d x k temporary).
  /// Throws std::logic_error while merged.
  void row_norms(Eigen::Ref<Eigen::VectorXd> out) const;

  /// W = diag(g) (dequant(W0) + s B A), built in fp32 beside the packed W0 (d*k*4 bytes).
  /// B: d x r,  A: r x k,  g: d or empty. Throws std::logic_error when already merged and
  /// std::domain_error, leaving the weight as it was, when an element is not finite in fp32.
  void merge(float s, const Eigen::Ref<const Matrix>& B, const Eigen::Ref<const Matrix>& A,
             const Eigen::Ref<const Vector>& g = Vector());

  /// Back to W0, bit for bit: drops the merged weight (the arguments are those of the merge and
  /// are not needed). Throws std::logic_error when nothing is merged.
  void unmerge(float /*s*/, const Eigen::Ref<const Matrix>& /*B*/,
               const Eigen::Ref<const Matrix>& /*A*/, const Eigen::Ref<const Vector>& g = Vector());

 protected:
  friend class FrozenStorageBase<Derived, float>;  // calls product()

  /// The widest column alignment a storage may ask for (a k-quant super-block).
  static constexpr Index kMaxAlignment = 256;
  // Panels: at most 256 rows (columns) and at most 2^20 elements (4 MiB in fp32, 2 MiB in bf16),
  // whatever the shape: a tall W (an LM head, d = 131072) or a wide one is also cut along its
  // other dimension, so the per-thread buffer is bounded by bytes, not by a number of rows.
  static constexpr Index kMaxPanel = 256;
  static constexpr Index kPanelElements = Index(1) << 20;

  /// Chooses the kernel once, at construction (after d_ and k_ are set).
  void set_onednn(bool use) {
    use_onednn_ = use;
#if defined(LORA_WITH_ONEDNN)
    if (use) onednn_.create();
#endif
  }
  bool uses_onednn() const {
    return use_onednn_;
  }
  /// The bytes of the merged weight (0 unless merged).
  std::size_t merged_bytes() const {
    return static_cast<std::size_t>(merged_.size()) * sizeof(float);
  }

  /// A per-thread, grow-only fp32 buffer (slot 0: panels, slot 1: a storage's own use): const
  /// products may run on many threads at once, and a steady-state call allocates nothing.
  static float* buffer_f32(int slot, Index count) {
    Vector& b = f32_buffers()[slot];
    if (b.size() < count) b.resize(count);
    return b.data();
  }
  static Vector* f32_buffers() {
    thread_local Vector buffers[2];
    return buffers;
  }

 public:
  /// Bytes of the calling thread's panel buffers (fp32, and bf16 for the oneDNN back end), which
  /// every product of these storages on this thread shares and grows: at most 4 MiB (fp32) and
  /// 2 MiB plus the bf16 copy of the product's input (oneDNN), whatever the weight's shape.
  static std::size_t thread_panel_bytes() {
    std::size_t bytes = std::size_t(f32_buffers()[0].size()) * sizeof(float);
#if defined(LORA_WITH_ONEDNN)
    bytes += std::size_t(bf16_buffers()[1].size()) * sizeof(bf16);
#endif
    return bytes;
  }

 protected:
  Index d_ = 0, k_ = 0;

 private:
  const Derived& self() const {
    return static_cast<const Derived&>(*this);
  }

  /// Rows per panel of H = W X (the panel is rows x k): about 2^20 elements, at most 256 rows.
  Index row_panel() const {
    const Index p = std::clamp<Index>(kPanelElements / k_, 16, kMaxPanel) / 16 * 16;
    return std::min(d_, p);
  }
  /// Columns of W per tile of a row panel of P rows: all of k when P x k fits the panel's
  /// elements, else a multiple of the alignment (whole blocks) with P x chunk <= elements.
  Index row_panel_chunk(Index P) const {
    if (P * k_ <= kPanelElements) return k_;
    const Index unit = self().column_alignment();
    return std::max<Index>(unit, kPanelElements / P / unit * unit);
  }
  /// Columns per panel of dX = W^T G: a multiple of the alignment, about elements / d.
  Index col_panel() const {
    const Index unit = self().column_alignment();
    const Index q = std::clamp<Index>(kPanelElements / d_, unit, kMaxPanel) / unit * unit;
    return std::min((k_ + unit - 1) / unit * unit, q);
  }
  /// Rows of W per tile of a column panel of Q columns: all of d when d x Q fits the elements.
  Index col_panel_chunk(Index Q) const {
    return std::min(d_, std::max<Index>(1, kPanelElements / Q));
  }

  Matrix build_merged(const char* where, float s, const Eigen::Ref<const Matrix>& B,
                      const Eigen::Ref<const Matrix>& A, const Eigen::Ref<const Vector>& g) const;

  void product(const Eigen::Ref<const Matrix>& X, Eigen::Ref<Matrix> H, bool accumulate) const;

  void transposed_product(const Eigen::Ref<const Matrix>& G, Eigen::Ref<Matrix> dX,
                          bool accumulate) const;

  Matrix merged_;  // diag(g)(W' + s B A) while merged, else empty
  bool is_merged_ = false;
  bool use_onednn_ = false;

#if defined(LORA_WITH_ONEDNN)
  // The panels of one product are spread over the threads, each dequantizing its own panel into
  // its own buffer and running oneDNN on it (oneDNN runs on one thread inside a parallel region):
  // one fork and join per product instead of one per panel. Each thread has its own primitives
  // (a primitive's scratchpad serves one execution at a time); the mutex keeps two products of
  // the same storage from sharing them.
  struct OneDnnState {
    std::mutex mutex;
    std::vector<std::unique_ptr<onednn::MatmulCache>> caches;  // one per thread of a product

    onednn::MatmulCache& cache(int thread) { return *caches[std::size_t(thread)]; }
    void reserve(int threads) {
      while (caches.size() < std::size_t(threads))
        caches.push_back(std::make_unique<onednn::MatmulCache>());
    }
  };
  FreshOnCopy<OneDnnState> onednn_;  // a copy gets its own primitives

  /// Per-thread, grow-only bf16 buffers (slot 0: the rounded input, slot 1: the weight panel).
  static bf16* buffer_bf16(int slot, Index count) {
    auto& b = bf16_buffers()[slot];
    if (b.size() < count) b.resize(count);
    return b.data();
  }
  static Eigen::Matrix<bf16, Eigen::Dynamic, 1>* bf16_buffers() {
    thread_local Eigen::Matrix<bf16, Eigen::Dynamic, 1> buffers[2];
    return buffers;
  }

  /// Runs panel(p, thread) for p < panels, spread over up to Eigen::nbThreads() threads with
  /// thread = 0, 1, ... (0 alone when it runs on the calling thread).
  template <typename Panel>
  void for_each_panel(Index panels, Panel&& panel) const {
    int threads = 1;  // without OpenMP, or inside the caller's parallel region: this thread
#if defined(_OPENMP)
    if (!omp_in_parallel()) threads = int(std::min<Index>(Eigen::nbThreads(), panels));
#endif
    onednn_->reserve(threads);
    if (threads <= 1) {
      for (Index p = 0; p < panels; ++p) panel(p, 0);
      return;
    }
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) num_threads(threads)
    for (Index p = 0; p < panels; ++p) panel(p, omp_get_thread_num());
#endif
  }

  void onednn_product(const Eigen::Ref<const Matrix>& X, Eigen::Ref<Matrix> H,
                      bool accumulate) const;

  void onednn_transposed_product(const Eigen::Ref<const Matrix>& G, Eigen::Ref<Matrix> dX,
                                 bool accumulate) const;
#endif
};

// The members with bodies, out of the class and not inline, so that an `extern template` of a
// PanelStorage<S> keeps a file from instantiating them (see lora/extern_templates.hpp).

template <typename Derived>
auto PanelStorage<Derived>::dequantized() const -> Matrix {
  Matrix W(d_, k_);
  // Tiles of 16 rows x one alignment unit: decoded row by row, written column by column.
  constexpr Index kTileRows = 16;
  const Index unit = self().column_alignment();
  parallel_for((d_ + kTileRows - 1) / kTileRows, Eigen::nbThreads(), [&](Index t) {
    const Index i0 = t * kTileRows, rows = std::min(kTileRows, d_ - i0);
    float tile[kTileRows][kMaxAlignment];
    for (Index j0 = 0; j0 < k_; j0 += unit) {
      const Index cols = std::min(unit, k_ - j0);
      for (Index r = 0; r < rows; ++r) self().dequantize_row(i0 + r, j0, cols, tile[r]);
      for (Index j = 0; j < cols; ++j)
        for (Index r = 0; r < rows; ++r) W(i0 + r, j0 + j) = tile[r][j];
    }
  });
  return W;
}

template <typename Derived>
void PanelStorage<Derived>::row_norms(Eigen::Ref<Eigen::VectorXd> out) const {
  require_state(!is_merged_, Derived::kStorageName,
                "::row_norms: the weight is merged; row_norms are those of W0, call it before "
                "merge()");
  require(out.size() == d_, Derived::kStorageName, "::row_norms: out must have length ", d_,
          " (out_features), got ", out.size());
  const Index unit = self().column_alignment();
  float block[kMaxAlignment];
  for (Index i = 0; i < d_; ++i) {
    double sum = 0.0;
    for (Index j = 0; j < k_; j += unit) {
      const Index count = std::min(unit, k_ - j);
      self().dequantize_row(i, j, count, block);
      for (Index t = 0; t < count; ++t) sum += double(block[t]) * double(block[t]);
    }
    out(i) = std::sqrt(sum);
  }
}

template <typename Derived>
void PanelStorage<Derived>::merge(float s, const Eigen::Ref<const Matrix>& B,
                                  const Eigen::Ref<const Matrix>& A,
                                  const Eigen::Ref<const Vector>& g) {
  const std::string who = concat(Derived::kStorageName, "::merge");
  this->check_merge_call(who.c_str(), true, g);
  merged_ = build_merged(who.c_str(), s, B, A, g);
  is_merged_ = true;
}

template <typename Derived>
void PanelStorage<Derived>::unmerge(float /*s*/, const Eigen::Ref<const Matrix>& /*B*/,
                                    const Eigen::Ref<const Matrix>& /*A*/,
                                    const Eigen::Ref<const Vector>& g) {
  this->check_merge_call(concat(Derived::kStorageName, "::unmerge").c_str(), false, g);
  merged_ = Matrix();
  is_merged_ = false;
}

template <typename Derived>
auto PanelStorage<Derived>::build_merged(const char* where, float s,
                                         const Eigen::Ref<const Matrix>& B,
                                         const Eigen::Ref<const Matrix>& A,
                                         const Eigen::Ref<const Vector>& g) const -> Matrix {
  require(B.rows() == d_ && A.cols() == k_ && B.cols() == A.rows(), where, ": B must be ", d_,
          " x r and A r x ", k_, ", got B ", shape_string(B.rows(), B.cols()), " and A ",
          shape_string(A.rows(), A.cols()));
  require(g.size() == 0 || g.size() == d_, where, ": g must be empty or have length ", d_,
          " (out_features), got ", g.size());
  Matrix W = dequantized();
  gemm_add(W, B, A, s);  // (d x r)(r x k)
  if (g.size() != 0) W.array().colwise() *= g.array();
  if (!W.allFinite()) {
    for (Index j = 0; j < k_; ++j)
      for (Index i = 0; i < d_; ++i)
        if (!std::isfinite(W(i, j)))
          throw std::domain_error(concat(where, ": diag(g) (W0 + s*B*A) is not finite in fp32 at (",
                                         i, ", ", j, "): it is ", W(i, j),
                                         "; the weight was left as it was"));
  }
  return W;
}

template <typename Derived>
void PanelStorage<Derived>::product(const Eigen::Ref<const Matrix>& X, Eigen::Ref<Matrix> H,
                                    bool accumulate) const {
  eigen_assert(X.rows() == k_ && H.rows() == d_ && H.cols() == X.cols());
  if (X.cols() == 0) return;
  if (is_merged_) {
    if (!accumulate) H.setZero();
    gemm_add(H, merged_, X, 1.0f);  // (d x k)(k x n)
    return;
  }
  if (self().small_batch_product(X, H, accumulate)) return;
#if defined(LORA_WITH_ONEDNN)
  if (use_onednn_) {
    onednn_product(X, H, accumulate);
    return;
  }
#endif
  if (!accumulate) H.setZero();
  const Index P = row_panel(), C = row_panel_chunk(P);
  // Panels write disjoint rows of H: one thread each (the product inside then runs serially),
  // each in tiles of C columns of W (all of k unless P x k exceeds the panel's bytes).
  parallel_for((d_ + P - 1) / P, Eigen::nbThreads(), [&](Index p) {
    const Index i0 = p * P, rows = std::min(P, d_ - i0);
    for (Index j0 = 0; j0 < k_; j0 += C) {
      const Index cols = std::min(C, k_ - j0);
      Eigen::Map<Matrix> Wt(buffer_f32(0, cols * rows), cols, rows);  // Wt(j, i) = W'(i0+i, j0+j)
      for (Index i = 0; i < rows; ++i) self().dequantize_row(i0 + i, j0, cols, Wt.col(i).data());
      // (rows x cols)(cols x n)
      gemm_add(H.middleRows(i0, rows), Wt.transpose(), X.middleRows(j0, cols), 1.0f);
    }
  });
}

template <typename Derived>
void PanelStorage<Derived>::transposed_product(const Eigen::Ref<const Matrix>& G,
                                               Eigen::Ref<Matrix> dX, bool accumulate) const {
  eigen_assert(G.rows() == d_ && dX.rows() == k_ && dX.cols() == G.cols());
  if (G.cols() == 0) return;
  if (is_merged_) {
    if (!accumulate) dX.setZero();
    gemm_add(dX, merged_.transpose(), G, 1.0f);  // (k x d)(d x n)
    return;
  }
#if defined(LORA_WITH_ONEDNN)
  if (use_onednn_) {
    onednn_transposed_product(G, dX, accumulate);
    return;
  }
#endif
  if (!accumulate) dX.setZero();
  const Index Q = col_panel(), R = col_panel_chunk(Q);
  // Column panels of W write disjoint rows of dX: one thread each, in tiles of R rows of W.
  parallel_for((k_ + Q - 1) / Q, Eigen::nbThreads(), [&](Index p) {
    const Index j0 = p * Q, cols = std::min(Q, k_ - j0);
    for (Index i0 = 0; i0 < d_; i0 += R) {
      const Index rows = std::min(R, d_ - i0);
      Eigen::Map<Matrix> Wt(buffer_f32(0, cols * rows), cols, rows);  // Wt(j, i) = W'(i0+i, j0+j)
      for (Index i = 0; i < rows; ++i) self().dequantize_row(i0 + i, j0, cols, Wt.col(i).data());
      // (cols x rows)(rows x n)
      gemm_add(dX.middleRows(j0, cols), Wt, G.middleRows(i0, rows), 1.0f);
    }
  });
}

#if defined(LORA_WITH_ONEDNN)
template <typename Derived>
void PanelStorage<Derived>::onednn_product(const Eigen::Ref<const Matrix>& X, Eigen::Ref<Matrix> H,
                                           bool accumulate) const {
  std::lock_guard<std::mutex> lock(onednn_->mutex);
  const Index n = X.cols();
  bf16* xb = buffer_bf16(0, k_ * n);  // X rounded to bf16, packed (k x n)
  for (Index j = 0; j < n; ++j) to_bf16(X.data() + j * X.outerStride(), xb + j * k_, k_);
  const Index P = row_panel(), C = row_panel_chunk(P);
  for_each_panel((d_ + P - 1) / P, [&](Index p, int thread) {
    const Index i0 = p * P, rows = std::min(P, d_ - i0);
    for (Index j0 = 0; j0 < k_; j0 += C) {  // tiles of C columns of W (all of k unless wide)
      const Index cols = std::min(C, k_ - j0);
      // The tile row-major (rows x cols): row i at panel + i * cols.
      bf16* panel = buffer_bf16(1, rows * cols);
      for (Index i = 0; i < rows; ++i)
        self().dequantize_row_bf16(i0 + i, j0, cols, panel + i * cols);
      // H(i0:i0+rows, :)^T (n x rows) (+)= X(j0:j0+cols, :)^T (n x cols) * tile^T.
      onednn::MatmulShape s;
      s.M = n;
      s.K = cols;
      s.N = rows;
      s.src_ld = k_;
      s.dst_ld = H.outerStride();
      s.wei_s0 = 1;  // tile^T(kk, i) = tile(i, kk) at i * cols + kk
      s.wei_s1 = cols;
      s.src_type = s.wei_type = onednn::dt::bf16;
      s.accumulate = accumulate || j0 > 0;
      onednn_->cache(thread).run(s, xb + j0, panel, H.data() + i0);
    }
  });
}

template <typename Derived>
void PanelStorage<Derived>::onednn_transposed_product(const Eigen::Ref<const Matrix>& G,
                                                      Eigen::Ref<Matrix> dX,
                                                      bool accumulate) const {
  std::lock_guard<std::mutex> lock(onednn_->mutex);
  const Index n = G.cols();
  bf16* gb = buffer_bf16(0, d_ * n);  // G rounded to bf16, packed (d x n)
  for (Index j = 0; j < n; ++j) to_bf16(G.data() + j * G.outerStride(), gb + j * d_, d_);
  const Index Q = col_panel(), R = col_panel_chunk(Q);
  for_each_panel((k_ + Q - 1) / Q, [&](Index p, int thread) {
    const Index j0 = p * Q, cols = std::min(Q, k_ - j0);
    for (Index i0 = 0; i0 < d_; i0 += R) {  // tiles of R rows of W (all of d unless tall)
      const Index rows = std::min(R, d_ - i0);
      // The tile row-major (rows x cols): W'(i0 + i, j0 + j) at panel + i * cols + j.
      bf16* panel = buffer_bf16(1, rows * cols);
      for (Index i = 0; i < rows; ++i)
        self().dequantize_row_bf16(i0 + i, j0, cols, panel + i * cols);
      // dX(j0:j0+cols, :)^T (n x cols) (+)= G(i0:i0+rows, :)^T (n x rows) * tile.
      onednn::MatmulShape s;
      s.M = n;
      s.K = rows;
      s.N = cols;
      s.src_ld = d_;
      s.dst_ld = dX.outerStride();
      s.wei_s0 = cols;
      s.wei_s1 = 1;
      s.src_type = s.wei_type = onednn::dt::bf16;
      s.accumulate = accumulate || i0 > 0;
      onednn_->cache(thread).run(s, gb + i0, panel, dX.data() + j0);
    }
  });
}
#endif

}  // namespace lora::detail
