// Nf4FrozenWeight: the frozen base W0 stored in 4-bit NormalFloat (NF4), as QLoRA (Dettmers et al.
// 2023) stores it, for LoRALinear<float>:
//   lora::LoRALinear<float, lora::Nf4FrozenWeight> layer(lora::Nf4FrozenWeight(W0), {}, cfg);
// W0 (d x k, out x in) is quantized once, at construction, in blocks of 64 weights along each row
// (lora/detail/nf4.hpp has the format and where it follows bitsandbytes). A, B, their gradients and
// the adapter's terms stay fp32.
//
// Memory of W0: 4 bits per weight for the codes, plus the block scales: one fp32 per 64 weights
// (4.5 bits per weight in all) or, with double quantization (the default), one byte per 64 weights
// and one fp32 per 256 blocks (4 + 8/64 + 32/16384 = 4.127 bits per weight). bits_per_parameter()
// reports the figure of a given weight.
//
// Error: every dequantized weight w' of a block with absmax c satisfies
//   |w' - w| <= c * kHalfWidestGap (0.152 c),   plus |c' - c| <= m / 254 with double quantization
// (c' the decoded absmax, m the largest |c - mean(c)| of its group of 256 blocks). The products
// compute with W' = dequant(W0), exactly in what they multiply:
//  - Portable (Eigen): W' in fp32, one panel at a time, times X in fp32: the only error beyond
//    the quantization is fp32 summation.
//  - OneDnn (LORA_WITH_ONEDNN, oneDNN's bf16 matmul): W' rounded to bf16 (relative 2^-9) one panel
//    at a time, times X (or G) rounded to bf16, accumulated in fp32: the bf16 base's error on top
//    of the quantization, at about the bf16 base's speed.
// Neither keeps a full-precision copy of W0: the products are cut into panels of at most 256 rows
// of W (for H = W X) or 256 columns (for dX = W^T G, from the same packed weight), spread over
// Eigen::nbThreads() threads; each thread dequantizes its panel into its own buffer (at most about
// 4 MiB in fp32, 2 MiB in bf16) and multiplies it, so a product forks and joins once.
// lora allocates nothing in a steady-state product.
//
// Merge: the 4-bit W0 cannot absorb s*B*A, so merge() builds the merged weight
//   W = diag(g) (dequant(W0) + s B A)   in fp32, beside the packed W0 (d*k*4 bytes more, 7.8x the
// packed W0 with double quantization), and the products use it while merged; unmerge() drops it,
// and W0, which never changed, is back bit for bit. MergeMode::ExactRestore is therefore the only
// mode (the default); MergeMode::InPlace is refused at construction. merged_weight() computes the
// same fp32 matrix without merging, to export a merged model for serving.
#pragma once

#include "lora/detail/bf16.hpp"
#include "lora/detail/bf16_backend.hpp"
#include "lora/detail/check.hpp"
#include "lora/detail/finite.hpp"
#include "lora/detail/frozen_storage_base.hpp"
#include "lora/detail/gemm.hpp"
#include "lora/detail/nf4.hpp"
#include "lora/frozen_storage.hpp"

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#if defined(LORA_WITH_ONEDNN)
#include "lora/onednn/matmul.hpp"

#include <mutex>
#if defined(_OPENMP)
#include <omp.h>
#endif
#endif

namespace lora {

/// Which kernel runs an Nf4FrozenWeight's products.
enum class Nf4Backend {
  Auto,      ///< OneDnn when compiled in and the CPU runs its bf16 matmul, else Portable.
  Portable,  ///< fp32 panels multiplied by Eigen: runs everywhere.
  OneDnn,    ///< bf16 panels multiplied by oneDNN; throws at construction without oneDNN.
};

/// How an Nf4FrozenWeight stores W0.
struct Nf4Options {
  /// Store the block scales in 8 bits (groups of 256) instead of fp32: 4.127 instead of 4.5 bits
  /// per weight, for a decoded-scale error of at most m / 254 (see the top of this file).
  bool double_quantization = true;
  /// Which kernel runs the products (Auto: oneDNN where it runs, else Portable).
  Nf4Backend backend = Nf4Backend::Auto;
};

/// The frozen weight W0 (d x k) in 4-bit NormalFloat (QLoRA): blocks of 64 weights per row, each
/// scaled by its absmax (optionally double-quantized), two codes per byte. See the top of this
/// file.
class Nf4FrozenWeight : public detail::FrozenStorageBase<Nf4FrozenWeight, float> {
 public:
  /// Quantizes W0 (out x in, fp32). Throws std::invalid_argument for an empty W0, for
  /// MergeMode::InPlace (see the top of this file) or for Nf4Backend::OneDnn without oneDNN, and
  /// std::domain_error for a NaN or infinite element of W0.
  explicit Nf4FrozenWeight(const Eigen::Ref<const Matrix>& W0,
                           MergeMode mode = MergeMode::ExactRestore, Nf4Options options = {})
      : d_(W0.rows()), k_(W0.cols()), double_quant_(options.double_quantization) {
    detail::require(W0.size() > 0, "Nf4FrozenWeight: W0 must not be empty, got ",
                    detail::shape_string(W0.rows(), W0.cols()));
    detail::require(
        mode == MergeMode::ExactRestore,
        "Nf4FrozenWeight: only MergeMode::ExactRestore is supported (merge() builds the "
        "fp32 merged weight beside the 4-bit W0, which never changes), got "
        "MergeMode::InPlace");
    detail::require_finite("Nf4FrozenWeight", "W0", W0);
    backend_ = resolve(options.backend);
    quantize(W0);
#if defined(LORA_WITH_ONEDNN)
    if (backend_ == Nf4Backend::OneDnn) onednn_.create();
#endif
  }

  /// As above with MergeMode::ExactRestore.
  Nf4FrozenWeight(const Eigen::Ref<const Matrix>& W0, Nf4Options options)
      : Nf4FrozenWeight(W0, MergeMode::ExactRestore, options) {}

  /// d, the rows of W0 (output features).
  Index out_features() const {
    return d_;
  }
  /// k, the columns of W0 (input features).
  Index in_features() const {
    return k_;
  }
  /// Always MergeMode::ExactRestore: merge builds the merged weight beside the packed W0.
  MergeMode merge_mode() const {
    return MergeMode::ExactRestore;
  }
  /// True while a merged fp32 weight is in use.
  bool is_merged() const {
    return is_merged_;
  }
  /// The kernel the products run on (resolved at construction).
  Nf4Backend backend() const {
    return backend_;
  }
  /// True when the block scales are double-quantized (8-bit, groups of 256).
  bool double_quantization() const {
    return double_quant_;
  }

  /// True when this build has the oneDNN back end and the CPU runs its bf16 matmul.
  static bool onednn_available() {
    return detail::onednn_bf16_available();
  }

  /// What Nf4Backend::Auto runs on this machine, e.g. "oneDNN 2.6.3, ISA avx512_core_bf16
  /// (vdpbf16ps)" or "portable (built without oneDNN); CPU avx512_bf16: yes".
  static std::string backend_report() {
    return detail::bf16_backend_report();
  }

  // ---- the packed weight ----------------------------------------------------------------------

  /// Bytes of the packed W0: codes and block scales (what replaces the d*k*4 bytes of fp32).
  std::size_t packed_bytes() const {
    return codes_.size() + (double_quant_ ? scales_.bytes() : absmax_.size() * sizeof(float));
  }
  /// Bytes held for the weight: the packed W0 and, while merged, the fp32 merged weight.
  /// The portable kernel allocates nothing in a steady-state product; oneDNN's matmul execution
  /// makes a few small allocations of its own per call (per panel here).
  bool allocation_free() const {
    return backend_ == Nf4Backend::Portable && detail::kGemmAllocationFree;
  }

  /// Bytes held: the packed W0 and, while merged, the fp32 merged weight.
  std::size_t stored_bytes() const {
    return packed_bytes() + static_cast<std::size_t>(merged_.size()) * sizeof(float);
  }
  /// Bits per weight of the packed W0: 8 * packed_bytes() / (d * k); 4.127 with double
  /// quantization and 4.5 without, for rows of whole blocks.
  double bits_per_parameter() const {
    return 8.0 * double(packed_bytes()) / double(d_ * k_);
  }

  /// The absmax c' that block `block` of row `row` dequantizes with (decoded from 8 bits with
  /// double quantization).
  float block_scale(Index row, Index block) const {
    const Index i = row * blocks_ + block;
    return double_quant_ ? scales_.decode(i) : absmax_[std::size_t(i)];
  }

  /// The 4-bit code of W0(row, col).
  std::uint8_t code(Index row, Index col) const {
    const std::uint8_t byte = codes_[std::size_t(row * row_bytes() + col / 2)];
    return col % 2 == 0 ? std::uint8_t(byte >> 4) : std::uint8_t(byte & 0x0f);
  }

  /// out[0, count) = dequant(W0)(row, col0 + j) in fp32; col0 must be a multiple of 64.
  void dequantize_row(Index row, Index col0, Index count, float* out) const {
    row_segment(row, col0, count, out, [](const std::uint8_t* c, float s, float* o) {
      detail::nf4::dequantize_block(c, s, o);
    });
  }
  /// As dequantize_row, rounded to bf16: the weight the oneDNN back end multiplies.
  void dequantize_row_bf16(Index row, Index col0, Index count, detail::bf16* out) const {
    row_segment(row, col0, count, out, [](const std::uint8_t* c, float s, detail::bf16* o) {
      detail::nf4::dequantize_block_bf16(c, s, o);
    });
  }

  /// dequant(W0) as a new fp32 d x k matrix (for inspection and export).
  Matrix dequantized() const {
    Matrix W(d_, k_);
    // Tiles of 16 rows x one block: decoded row by row, written column by column (16 contiguous
    // floats of the column-major W at a time).
    constexpr Index kTileRows = 16;
    detail::parallel_for((d_ + kTileRows - 1) / kTileRows, Eigen::nbThreads(), [&](Index t) {
      const Index i0 = t * kTileRows, rows = std::min(kTileRows, d_ - i0);
      float tile[kTileRows][kBlock];
      for (Index j0 = 0; j0 < k_; j0 += kBlock) {
        const Index cols = std::min(kBlock, k_ - j0);
        for (Index r = 0; r < rows; ++r) dequantize_row(i0 + r, j0, cols, tile[r]);
        for (Index j = 0; j < cols; ++j)
          for (Index r = 0; r < rows; ++r) W(i0 + r, j0 + j) = tile[r][j];
      }
    });
    return W;
  }

  /// diag(g) (dequant(W0) + s B A) as a new fp32 d x k matrix, without merging: the weight of a
  /// merged model, for serving.   B: d x r,  A: r x k,  g: d or empty (all ones).
  /// Throws std::invalid_argument for wrong shapes and std::domain_error when an element is not
  /// finite in fp32.
  Matrix merged_weight(float s, const Eigen::Ref<const Matrix>& B,
                       const Eigen::Ref<const Matrix>& A,
                       const Eigen::Ref<const Vector>& g = Vector()) const {
    return build_merged("Nf4FrozenWeight::merged_weight", s, B, A, g);
  }

  /// The weight in use, as a new fp32 d x k matrix: dequant(W0), or the merged weight.
  Matrix weight() const {
    return is_merged_ ? merged_ : dequantized();
  }

  /// True when the weight in use holds no NaN or infinity (allocates nothing).
  bool all_finite() const {
    if (is_merged_) return merged_.allFinite();
    for (Index i = 0; i < d_ * blocks_; ++i)
      if (!std::isfinite(block_scale(i / blocks_, i % blocks_))) return false;
    return true;
  }

  /// out(i) = || row i of dequant(W0) ||_2 in double, block by block (no d x k temporary).
  /// Throws std::logic_error while merged.
  void row_norms(Eigen::Ref<Eigen::VectorXd> out) const {
    detail::require_state(!is_merged_,
                          "Nf4FrozenWeight::row_norms: the weight is merged; row_norms are those "
                          "of W0, call it before merge()");
    detail::require(out.size() == d_, "Nf4FrozenWeight::row_norms: out must have length ", d_,
                    " (out_features), got ", out.size());
    float block[detail::nf4::kBlock];
    for (Index i = 0; i < d_; ++i) {
      double sum = 0.0;
      for (Index j = 0; j < k_; j += detail::nf4::kBlock) {
        const Index count = std::min(detail::nf4::kBlock, k_ - j);
        dequantize_row(i, j, count, block);
        for (Index t = 0; t < count; ++t) sum += double(block[t]) * double(block[t]);
      }
      out(i) = std::sqrt(sum);
    }
  }

  // ---- products -------------------------------------------------------------------------------

  // ---- merge ----------------------------------------------------------------------------------

  /// W = diag(g) (dequant(W0) + s B A), built in fp32 beside the packed W0 (d*k*4 bytes).
  /// B: d x r,  A: r x k,  g: d or empty. Throws std::logic_error when already merged and
  /// std::domain_error, leaving the weight as it was, when an element is not finite in fp32.
  void merge(float s, const Eigen::Ref<const Matrix>& B, const Eigen::Ref<const Matrix>& A,
             const Eigen::Ref<const Vector>& g = Vector()) {
    check_merge_call("Nf4FrozenWeight::merge", true, g);
    merged_ = build_merged("Nf4FrozenWeight::merge", s, B, A, g);
    is_merged_ = true;
  }

  /// Back to W0, bit for bit: drops the merged weight (the arguments are those of the merge and
  /// are not needed). Throws std::logic_error when nothing is merged.
  void unmerge(float /*s*/, const Eigen::Ref<const Matrix>& /*B*/,
               const Eigen::Ref<const Matrix>& /*A*/,
               const Eigen::Ref<const Vector>& g = Vector()) {
    check_merge_call("Nf4FrozenWeight::unmerge", false, g);
    merged_ = Matrix();
    is_merged_ = false;
  }

  // ---- rebase (PiSSA, OLoRA, LoftQ) -------------------------------------------------------------

  /// W0 = nf4(W) (same shape), quantized with this storage's options: the residual base of PiSSA
  /// and OLoRA ("QPiSSA"), or LoftQ's base. Throws std::logic_error while merged,
  /// std::invalid_argument for another shape, std::domain_error for a non-finite element.
  void rebase(const Eigen::Ref<const Matrix>& W) {
    check_rebase_call("Nf4FrozenWeight::rebase", W);
    detail::require_finite("Nf4FrozenWeight::rebase", "W", W);
    quantize(W);
  }

  /// M = dequant(nf4(M)): what this storage (with its options) makes of a weight M of any shape,
  /// one row at a time (LoftQ's quantization step). Throws std::domain_error for a non-finite M.
  void round_trip(Eigen::Ref<Matrix> M) const {
    Nf4Options options;
    options.double_quantization = double_quant_;
    options.backend = Nf4Backend::Portable;
    const Nf4FrozenWeight q(M, MergeMode::ExactRestore, options);
    Vector row(M.cols());
    for (Index i = 0; i < M.rows(); ++i) {
      q.dequantize_row(i, 0, M.cols(), row.data());
      M.row(i) = row.transpose();
    }
  }

 private:
  friend class detail::FrozenStorageBase<Nf4FrozenWeight, float>;  // calls product()

  static constexpr Index kBlock = detail::nf4::kBlock;
  // Panels: at most 256 rows (columns) and about 2^20 elements (4 MiB in fp32, 2 MiB in bf16).
  static constexpr Index kMaxPanel = 256;
  static constexpr Index kPanelElements = Index(1) << 20;

  Index row_bytes() const {
    return blocks_ * detail::nf4::kBlockBytes;
  }

  /// Rows per panel of H = W X (the panel is rows x k): about `elements`, at most `max_rows`.
  Index row_panel(Index elements = kPanelElements, Index max_rows = kMaxPanel) const {
    const Index p = std::clamp<Index>(elements / k_, 16, max_rows) / 16 * 16;
    return std::min(d_, p);
  }
  /// Columns per panel of dX = W^T G (the panel is d x cols): a multiple of 64.
  Index col_panel(Index elements = kPanelElements, Index max_cols = kMaxPanel) const {
    const Index q = std::clamp<Index>(elements / d_, kBlock, max_cols) / kBlock * kBlock;
    return std::min(blocks_ * kBlock, q);
  }

  template <typename Out, typename Decode>
  void row_segment(Index row, Index col0, Index count, Out* out, Decode&& decode) const {
    eigen_assert(col0 % kBlock == 0 && col0 + count <= k_);
    Index b = col0 / kBlock;
    const std::uint8_t* codes = codes_.data() + row * row_bytes() + b * detail::nf4::kBlockBytes;
    Index done = 0;
    for (; done + kBlock <= count; done += kBlock, ++b, codes += detail::nf4::kBlockBytes)
      decode(codes, block_scale(row, b), out + done);
    if (done < count) {  // a last partial block
      Out tail[kBlock];
      decode(codes, block_scale(row, b), tail);
      std::copy(tail, tail + (count - done), out + done);
    }
  }

  void quantize(const Eigen::Ref<const Matrix>& W0) {
    blocks_ = detail::nf4::blocks_per_row(k_);
    codes_.assign(std::size_t(d_ * row_bytes()), 0);
    std::vector<float> absmax(std::size_t(d_ * blocks_));
    Vector row(k_);
    for (Index i = 0; i < d_; ++i) {
      row = W0.row(i).transpose();
      detail::nf4::quantize_row(row.data(), k_, codes_.data() + i * row_bytes(),
                                absmax.data() + i * blocks_);
    }
    if (!double_quant_) {
      absmax_ = std::move(absmax);
      return;
    }
    scales_ = detail::nf4::quantize_scales(absmax);
    for (Index i = 0; i < d_ * blocks_; ++i)
      if (!std::isfinite(scales_.decode(i)))
        throw std::domain_error(detail::concat(
            "Nf4FrozenWeight: the block scales of W0 (up to ", absmax[std::size_t(i)],
            ") overflow fp32 under double quantization; build it with "
            "Nf4Options::double_quantization = false"));
  }

  Matrix build_merged(const char* where, float s, const Eigen::Ref<const Matrix>& B,
                      const Eigen::Ref<const Matrix>& A, const Eigen::Ref<const Vector>& g) const {
    detail::require(B.rows() == d_ && A.cols() == k_ && B.cols() == A.rows(), where, ": B must be ",
                    d_, " x r and A r x ", k_, ", got B ", detail::shape_string(B.rows(), B.cols()),
                    " and A ", detail::shape_string(A.rows(), A.cols()));
    detail::require(g.size() == 0 || g.size() == d_, where, ": g must be empty or have length ", d_,
                    " (out_features), got ", g.size());
    Matrix W = dequantized();
    detail::gemm_add(W, B, A, s);  // (d x r)(r x k)
    if (g.size() != 0) W.array().colwise() *= g.array();
    if (!W.allFinite()) {
      for (Index j = 0; j < k_; ++j)
        for (Index i = 0; i < d_; ++i)
          if (!std::isfinite(W(i, j)))
            throw std::domain_error(
                detail::concat(where, ": diag(g) (W0 + s*B*A) is not finite in fp32 at (", i, ", ",
                               j, "): it is ", W(i, j), "; the weight was left as it was"));
    }
    return W;
  }

  static Nf4Backend resolve(Nf4Backend wanted) {
    return detail::resolve_bf16_backend(wanted, "Nf4FrozenWeight", "Nf4Backend");
  }

  /// A per-thread, grow-only fp32 panel: const products may run on many threads at once, and a
  /// steady-state call allocates nothing.
  static float* panel_f32(Index count) {
    thread_local Vector buffer;
    if (buffer.size() < count) buffer.resize(count);
    return buffer.data();
  }

  void product(const Eigen::Ref<const Matrix>& X, Eigen::Ref<Matrix> H, bool accumulate) const {
    eigen_assert(X.rows() == k_ && H.rows() == d_ && H.cols() == X.cols());
    if (X.cols() == 0) return;
    if (is_merged_) {
      if (!accumulate) H.setZero();
      detail::gemm_add(H, merged_, X, 1.0f);  // (d x k)(k x n)
      return;
    }
#if defined(LORA_WITH_ONEDNN)
    if (backend_ == Nf4Backend::OneDnn) {
      onednn_product(X, H, accumulate);
      return;
    }
#endif
    if (!accumulate) H.setZero();
    const Index P = row_panel();
    // Panels write disjoint rows of H: one thread each (the product inside then runs serially).
    detail::parallel_for((d_ + P - 1) / P, Eigen::nbThreads(), [&](Index p) {
      const Index i0 = p * P, rows = std::min(P, d_ - i0);
      Eigen::Map<Matrix> Wt(panel_f32(k_ * rows), k_, rows);  // column i = row i0 + i of W'
      for (Index i = 0; i < rows; ++i) dequantize_row(i0 + i, 0, k_, Wt.col(i).data());
      detail::gemm_add(H.middleRows(i0, rows), Wt.transpose(), X, 1.0f);  // (rows x k)(k x n)
    });
  }

  void transposed_product(const Eigen::Ref<const Matrix>& G, Eigen::Ref<Matrix> dX,
                          bool accumulate) const {
    eigen_assert(G.rows() == d_ && dX.rows() == k_ && dX.cols() == G.cols());
    if (G.cols() == 0) return;
    if (is_merged_) {
      if (!accumulate) dX.setZero();
      detail::gemm_add(dX, merged_.transpose(), G, 1.0f);  // (k x d)(d x n)
      return;
    }
#if defined(LORA_WITH_ONEDNN)
    if (backend_ == Nf4Backend::OneDnn) {
      onednn_transposed_product(G, dX, accumulate);
      return;
    }
#endif
    if (!accumulate) dX.setZero();
    const Index Q = col_panel();
    // Column panels of W write disjoint rows of dX: one thread each.
    detail::parallel_for((k_ + Q - 1) / Q, Eigen::nbThreads(), [&](Index p) {
      const Index j0 = p * Q, cols = std::min(Q, k_ - j0);
      Eigen::Map<Matrix> Wt(panel_f32(cols * d_), cols, d_);  // Wt(j, i) = W'(i, j0 + j)
      for (Index i = 0; i < d_; ++i) dequantize_row(i, j0, cols, Wt.col(i).data());
      detail::gemm_add(dX.middleRows(j0, cols), Wt, G, 1.0f);  // (cols x d)(d x n)
    });
  }

  Index d_ = 0, k_ = 0;
  Index blocks_ = 0;  // blocks per row: ceil(k / 64)
  bool double_quant_ = true;
  // Codes, row-major: row i's block b at byte (i * blocks_ + b) * 32; element 2j of a block in the
  // high nibble of byte j, 2j + 1 in the low nibble (bitsandbytes' order).
  std::vector<std::uint8_t> codes_;
  std::vector<float> absmax_;            // per block, row-major (without double quantization)
  detail::nf4::QuantizedScales scales_;  // per block, 8-bit (with double quantization)
  Matrix merged_;                        // diag(g)(W' + s B A) while merged, else empty
  bool is_merged_ = false;
  Nf4Backend backend_ = Nf4Backend::Portable;

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
  detail::FreshOnCopy<OneDnnState> onednn_;  // a copy gets its own primitives

  /// Per-thread, grow-only bf16 buffers (slot 0: the rounded input, slot 1: the weight panel).
  static detail::bf16* buffer_bf16(int slot, Index count) {
    thread_local Eigen::Matrix<detail::bf16, Eigen::Dynamic, 1> buffers[2];
    auto& b = buffers[slot];
    if (b.size() < count) b.resize(count);
    return b.data();
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
                      bool accumulate) const {
    std::lock_guard<std::mutex> lock(onednn_->mutex);
    const Index n = X.cols();
    detail::bf16* xb = buffer_bf16(0, k_ * n);  // X rounded to bf16, packed (k x n)
    for (Index j = 0; j < n; ++j) detail::to_bf16(X.data() + j * X.outerStride(), xb + j * k_, k_);
    const Index P = row_panel();
    for_each_panel((d_ + P - 1) / P, [&](Index p, int thread) {
      const Index i0 = p * P, rows = std::min(P, d_ - i0);
      // The panel row-major (rows x k): row i at panel + i * k.
      detail::bf16* panel = buffer_bf16(1, P * k_);
      for (Index i = 0; i < rows; ++i) dequantize_row_bf16(i0 + i, 0, k_, panel + i * k_);
      // H(i0:i0+rows, :)^T (n x rows) (+)= X^T (n x k) * panel^T (k x rows).
      onednn::MatmulShape s;
      s.M = n;
      s.K = k_;
      s.N = rows;
      s.src_ld = k_;
      s.dst_ld = H.outerStride();
      s.wei_s0 = 1;  // panel^T(kk, i) = panel(i, kk) at i * k + kk
      s.wei_s1 = k_;
      s.src_type = s.wei_type = onednn::dt::bf16;
      s.accumulate = accumulate;
      onednn_->cache(thread).run(s, xb, panel, H.data() + i0);
    });
  }

  void onednn_transposed_product(const Eigen::Ref<const Matrix>& G, Eigen::Ref<Matrix> dX,
                                 bool accumulate) const {
    std::lock_guard<std::mutex> lock(onednn_->mutex);
    const Index n = G.cols();
    detail::bf16* gb = buffer_bf16(0, d_ * n);  // G rounded to bf16, packed (d x n)
    for (Index j = 0; j < n; ++j) detail::to_bf16(G.data() + j * G.outerStride(), gb + j * d_, d_);
    const Index Q = col_panel();
    for_each_panel((k_ + Q - 1) / Q, [&](Index p, int thread) {
      const Index j0 = p * Q, cols = std::min(Q, k_ - j0);
      // The panel row-major (d x cols): W'(i, j0 + j) at panel + i * cols + j.
      detail::bf16* panel = buffer_bf16(1, d_ * Q);
      for (Index i = 0; i < d_; ++i) dequantize_row_bf16(i, j0, cols, panel + i * cols);
      // dX(j0:j0+cols, :)^T (n x cols) (+)= G^T (n x d) * panel (d x cols).
      onednn::MatmulShape s;
      s.M = n;
      s.K = d_;
      s.N = cols;
      s.src_ld = d_;
      s.dst_ld = dX.outerStride();
      s.wei_s0 = cols;
      s.wei_s1 = 1;
      s.src_type = s.wei_type = onednn::dt::bf16;
      s.accumulate = accumulate;
      onednn_->cache(thread).run(s, gb, panel, dX.data() + j0);
    });
  }
#endif
};

}  // namespace lora
