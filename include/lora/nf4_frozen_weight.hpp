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
// Neither keeps a full-precision copy of W0: the products dequantize panels of at most 256 rows
// (or columns) on the fly, tile by tile, into per-thread buffers of at most 2^20 elements (4 MiB
// in fp32, 2 MiB in bf16, whatever the shape: a very tall or wide W is cut along its other
// dimension too; thread_panel_bytes() reports them; lora/detail/panel_storage.hpp, shared with
// GgmlFrozenWeight); lora allocates nothing in a steady-state product.
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
#include "lora/detail/compiled_mode.hpp"
#include "lora/detail/finite.hpp"
#include "lora/detail/nf4.hpp"
#include "lora/detail/panel_storage.hpp"
#include "lora/frozen_storage.hpp"

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

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
class Nf4FrozenWeight : public detail::PanelStorage<Nf4FrozenWeight> {
 public:
  /// Quantizes W0 (out x in, fp32). Throws std::invalid_argument for an empty W0, for
  /// MergeMode::InPlace (see the top of this file) or for Nf4Backend::OneDnn without oneDNN, and
  /// std::domain_error for a NaN or infinite element of W0.
  explicit Nf4FrozenWeight(const Eigen::Ref<const Matrix>& W0,
                           MergeMode mode = MergeMode::ExactRestore, Nf4Options options = {});

  /// As above with MergeMode::ExactRestore.
  Nf4FrozenWeight(const Eigen::Ref<const Matrix>& W0, Nf4Options options)
      : Nf4FrozenWeight(W0, MergeMode::ExactRestore, options) {}

  /// The kernel the products run on (resolved at construction).
  Nf4Backend backend() const { return backend_; }
  /// True when the block scales are double-quantized (8-bit, groups of 256).
  bool double_quantization() const { return double_quant_; }

  /// True when this build has the oneDNN back end and the CPU runs its bf16 matmul.
  static bool onednn_available() { return detail::onednn_bf16_available(); }

  /// What Nf4Backend::Auto runs on this machine, e.g. "oneDNN 2.6.3, ISA avx512_core_bf16
  /// (vdpbf16ps)" or "portable (built without oneDNN); CPU avx512_bf16: yes".
  static std::string backend_report() { return detail::bf16_backend_report(); }

  // ---- the packed weight ----------------------------------------------------------------------

  /// Bytes of the packed W0: codes and block scales (what replaces the d*k*4 bytes of fp32).
  std::size_t packed_bytes() const {
    return codes_.size() + (double_quant_ ? scales_.bytes() : absmax_.size() * sizeof(float));
  }
  /// Bytes held: the packed W0 and, while merged, the fp32 merged weight.
  std::size_t stored_bytes() const { return packed_bytes() + merged_bytes(); }
  /// Bits per weight of the packed W0: 8 * packed_bytes() / (d * k); 4.127 with double
  /// quantization and 4.5 without, for rows of whole blocks.
  double bits_per_parameter() const { return 8.0 * double(packed_bytes()) / double(d_ * k_); }

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

  // ---- rebase (PiSSA, OLoRA, LoftQ) -------------------------------------------------------------

  /// W0 = nf4(W) (same shape), quantized with this storage's options: the residual base of PiSSA
  /// and OLoRA ("QPiSSA"), or LoftQ's base. Throws std::logic_error while merged,
  /// std::invalid_argument for another shape, std::domain_error for a non-finite element.
  void rebase(const Eigen::Ref<const Matrix>& W);

  /// M = dequant(nf4(M)): what this storage (with its options) makes of a weight M of any shape,
  /// one row at a time (LoftQ's quantization step). Throws std::domain_error for a non-finite M.
  void round_trip(Eigen::Ref<Matrix> M) const;

 private:
  friend class detail::PanelStorage<Nf4FrozenWeight>;

  static constexpr const char* kStorageName = "Nf4FrozenWeight";
  static constexpr Index kBlock = detail::nf4::kBlock;

  Index column_alignment() const { return kBlock; }
  bool packed_finite() const {
    for (Index i = 0; i < d_ * blocks_; ++i)
      if (!std::isfinite(block_scale(i / blocks_, i % blocks_))) return false;
    return true;
  }
  bool small_batch_product(const Eigen::Ref<const Matrix>&, Eigen::Ref<Matrix>, bool) const {
    return false;
  }

  Index row_bytes() const { return blocks_ * detail::nf4::kBlockBytes; }

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

  void quantize(const Eigen::Ref<const Matrix>& W0);

  static Nf4Backend resolve(Nf4Backend wanted);

  Index blocks_ = 0;  // blocks per row: ceil(k / 64)
  bool double_quant_ = true;
  // Codes, row-major: row i's block b at byte (i * blocks_ + b) * 32; element 2j of a block in the
  // high nibble of byte j, 2j + 1 in the low nibble (bitsandbytes' order).
  std::vector<std::uint8_t> codes_;
  std::vector<float> absmax_;            // per block, row-major (without double quantization)
  detail::nf4::QuantizedScales scales_;  // per block, 8-bit (with double quantization)
  Nf4Backend backend_ = Nf4Backend::Portable;
};

#if LORA_WITH_BODIES

LORA_FUNC Nf4FrozenWeight::Nf4FrozenWeight(const Eigen::Ref<const Matrix>& W0, MergeMode mode,
                                           Nf4Options options)
    : double_quant_(options.double_quantization) {
  d_ = W0.rows();
  k_ = W0.cols();
  detail::require(W0.size() > 0, "Nf4FrozenWeight: W0 must not be empty, got ",
                  detail::shape_string(W0.rows(), W0.cols()));
  detail::require(mode == MergeMode::ExactRestore,
                  "Nf4FrozenWeight: only MergeMode::ExactRestore is supported (merge() builds the "
                  "fp32 merged weight beside the 4-bit W0, which never changes), got "
                  "MergeMode::InPlace");
  detail::require_finite("Nf4FrozenWeight", "W0", W0);
  backend_ = resolve(options.backend);
  quantize(W0);
  set_onednn(backend_ == Nf4Backend::OneDnn);
}

LORA_FUNC void Nf4FrozenWeight::rebase(const Eigen::Ref<const Matrix>& W) {
  check_rebase_call("Nf4FrozenWeight::rebase", W);
  detail::require_finite("Nf4FrozenWeight::rebase", "W", W);
  quantize(W);
}

LORA_FUNC void Nf4FrozenWeight::round_trip(Eigen::Ref<Matrix> M) const {
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

LORA_FUNC void Nf4FrozenWeight::quantize(const Eigen::Ref<const Matrix>& W0) {
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
      throw std::domain_error(
          detail::concat("Nf4FrozenWeight: the block scales of W0 (up to ", absmax[std::size_t(i)],
                         ") overflow fp32 under double quantization; build it with "
                         "Nf4Options::double_quantization = false"));
}

LORA_FUNC Nf4Backend Nf4FrozenWeight::resolve(Nf4Backend wanted) {
  return detail::resolve_bf16_backend(wanted, "Nf4FrozenWeight", "Nf4Backend");
}

#endif  // LORA_WITH_BODIES

}  // namespace lora
