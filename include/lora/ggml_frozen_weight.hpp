// GgmlFrozenWeight: a frozen base W0 kept in one of llama.cpp's block-quantized formats (Q8_0,
// Q4_0, Q5_0, Q4_K, Q5_K, Q6_K; also F16, BF16, F32), exactly as a GGUF file stores it, for
// LoRALinear<float>: QLoRA on the files people already have, trained against the very weights
// llama.cpp serves.
//   lora::GgmlFrozenWeight w0(bytes, lora::io::GgmlType::Q4_K, ne0, ne1, "blk.0.attn_q.weight");
//   lora::LoRALinear<float, lora::GgmlFrozenWeight> layer(std::move(w0), {}, cfg);
// The type is chosen at run time, from the tensor: one storage class serves a Q4_K_M file's mix of
// Q4_K and Q6_K tensors. ne0 is ggml's fastest axis: in features k (columns of W0); ne1 is the out
// features d (rows). Row i of W0 is ne0 / block_size blocks, rows one after another (ggml's order).
//
// The blocks are dequantized exactly as ggml does (lora/io/ggml_quants.hpp, bit for bit against
// llama.cpp's own library), on the fly, into per-thread panels (lora/detail/panel_storage.hpp,
// shared with Nf4FrozenWeight): fp32 into Eigen (Portable) or bf16 into oneDNN (OneDnn); no
// full-precision copy of W0, no allocation in a steady-state product. Error: the Portable products
// are those of the dequantized weight up to fp32 summation; the OneDnn ones round the panel and X
// (or G) to bf16 (relative 2^-9) and accumulate in fp32.
//
// Decoding: a batch of at most kSmallBatch columns (n = 1 serves one token) skips the panels: each
// row's blocks are decoded and dotted with X in registers, reading each block once (Q8_0, Q4_0,
// Q4_K, Q6_K with AVX-512: ggml's own fp32 weights rebuilt in registers, several rows at a time,
// lora/detail/ggml_decode_kernels.hpp; the other types, and every type without AVX-512, a few
// blocks at a time through a small buffer). Same bound as the Portable product, the sums in another
// order.
//
// Memory: packed_bytes() are the blocks as stored (Q4_K: 4.5 bits per weight, Q6_K: 6.5625, Q8_0:
// 8.5, Q4_0: 4.5), plus, per thread that runs a product, a panel buffer of panel_bytes().
// Merge: as Nf4FrozenWeight, an fp32 merged weight beside the blocks (d*k*4 bytes, stated by
// stored_bytes()); MergeMode::InPlace is refused. merged_weight() gives the merged fp32 matrix and
// ggml_encode() turns it into blocks of a type the user picks (F16, BF16, Q8_0, Q4_0, Q4_K, Q6_K),
// so one merged model can be shipped as GGUF.
//
// quantize() builds one from an fp32 W0 with llama.cpp's own quantizers; a W0 whose width is not a
// whole number of blocks is padded with zero columns up to the next block (in_features() stays
// W0's width; the padding's dequantized values multiply zeros and never reach a result).
#pragma once

#include "lora/detail/bf16.hpp"
#include "lora/detail/bf16_backend.hpp"
#include "lora/detail/check.hpp"
#include "lora/detail/compiled_mode.hpp"
#include "lora/detail/finite.hpp"
#include "lora/detail/gemm.hpp"
#include "lora/detail/ggml_decode_kernels.hpp"
#include "lora/detail/panel_storage.hpp"
#include "lora/frozen_storage.hpp"
#include "lora/io/format_error.hpp"
#include "lora/io/ggml_quants.hpp"
#include "lora/io/ggml_types.hpp"

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace lora {

/// Which kernel runs a GgmlFrozenWeight's products (decoding batches always run the fused kernel).
enum class GgmlBackend {
  Auto,      ///< OneDnn when compiled in and the CPU runs its bf16 matmul, else Portable.
  Portable,  ///< fp32 panels multiplied by Eigen: runs everywhere.
  OneDnn,    ///< bf16 panels multiplied by oneDNN; throws at construction without oneDNN.
};

/// A frozen W0 (d x k) in a ggml block format, as stored in a GGUF file. See the top of this file.
class GgmlFrozenWeight : public detail::PanelStorage<GgmlFrozenWeight> {
 public:
  /// Columns up to which a product runs the fused decoding kernel instead of the panels.
  static constexpr Index kSmallBatch = 8;

  /// Takes a tensor's bytes as stored: `type`, ne0 = in features (a whole number of blocks),
  /// ne1 = out features, `name` for messages (e.g. "blk.0.attn_q.weight"). Throws io::FormatError
  /// naming the tensor for a type lora cannot dequantize, a shape that is not positive or not a
  /// whole number of blocks, a byte count that does not match type and shape, or a non-finite
  /// scale (or value, for F16/BF16/F32); std::invalid_argument for MergeMode::InPlace or
  /// GgmlBackend::OneDnn without oneDNN.
  GgmlFrozenWeight(std::vector<std::uint8_t> data, io::GgmlType type, std::int64_t ne0,
                   std::int64_t ne1, const std::string& name = "the tensor",
                   MergeMode mode = MergeMode::ExactRestore,
                   GgmlBackend backend = GgmlBackend::Auto);

  /// As above, copying `bytes` bytes from `data` (e.g. a tensor of a memory-mapped file).
  GgmlFrozenWeight(const std::uint8_t* data, std::size_t bytes, io::GgmlType type, std::int64_t ne0,
                   std::int64_t ne1, const std::string& name = "the tensor",
                   MergeMode mode = MergeMode::ExactRestore,
                   GgmlBackend backend = GgmlBackend::Auto)
      : GgmlFrozenWeight(std::vector<std::uint8_t>(data, data + bytes), type, ne0, ne1, name, mode,
                         backend) {}

  /// Quantizes an fp32 W0 (out x in) into `type` with llama.cpp's own quantizers (ggml's
  /// quantize_row_*_ref, what llama-quantize runs without an importance matrix), each row padded
  /// with zeros to a whole number of blocks. Throws std::invalid_argument for an empty W0, a type
  /// lora cannot quantize into (see io::ggml::can_quantize) or MergeMode::InPlace, and
  /// std::domain_error for a non-finite element or a block whose scale overflows fp16.
  static GgmlFrozenWeight quantize(const Eigen::Ref<const Matrix>& W0, io::GgmlType type,
                                   MergeMode mode = MergeMode::ExactRestore,
                                   GgmlBackend backend = GgmlBackend::Auto);

  /// The blocks of an fp32 matrix W (out x in) in `type`, rows one after another as a GGUF tensor
  /// of ne = [in, out] stores them, each row padded with zeros to a whole number of blocks: what
  /// a GGUF writer writes for a merged model (merged_weight()). Throws std::invalid_argument for a
  /// type lora cannot quantize into and std::domain_error for a non-finite element.
  static std::vector<std::uint8_t> ggml_encode(const Eigen::Ref<const Matrix>& W,
                                               io::GgmlType type);

  /// W0 = the blocks of W (same shape) in this storage's type, made as quantize() makes them: the
  /// residual base of PiSSA and OLoRA, kept as llama.cpp would store it. Throws std::logic_error
  /// while merged, std::invalid_argument for another shape or a type lora cannot quantize into
  /// (q5_0, q5_K), std::domain_error for a non-finite element or a block scale that overflows
  /// fp16; the weight is then left as it was.
  void rebase(const Eigen::Ref<const Matrix>& W);

  /// The ggml type of the blocks.
  io::GgmlType type() const { return type_; }
  /// The tensor's name (for messages).
  const std::string& name() const { return name_; }
  /// The values one stored row holds: in_features() rounded up to a whole number of blocks.
  Index row_values() const { return row_values_; }
  /// The blocks as stored (ne1 rows of row_values() / block_size blocks).
  const std::vector<std::uint8_t>& blocks() const { return data_; }
  /// The kernel the products run on (resolved at construction).
  GgmlBackend backend() const { return backend_; }
  /// True when this build has the oneDNN back end and the CPU runs its bf16 matmul.
  static bool onednn_available() { return detail::onednn_bf16_available(); }
  /// What GgmlBackend::Auto runs on this machine (as Nf4FrozenWeight::backend_report()).
  static std::string backend_report() { return detail::bf16_backend_report(); }
  /// True when the fused decoding kernels of Q8_0, Q4_0, Q4_K and Q6_K run AVX-512 (else the
  /// portable loops, which dequantize a few blocks at a time).
  static constexpr bool fused_avx512() {
#if defined(LORA_GGML_AVX512)
    return true;
#else
    return false;
#endif
  }

  /// Bytes of W0 as stored: the blocks.
  std::size_t packed_bytes() const {
    return data_.size();
  }
  /// Bytes held: the blocks and, while merged, the fp32 merged weight.
  std::size_t stored_bytes() const {
    return packed_bytes() + merged_bytes();
  }
  /// Bits per weight of the blocks: 8 * packed_bytes() / (d * k) (Q4_K: 4.5; more when the rows
  /// are padded).
  double bits_per_parameter() const {
    return 8.0 * double(packed_bytes()) / double(d_ * k_);
  }
  /// Bytes of the fp32 panel buffer a thread running a panel product holds (grow-only, kept for
  /// the thread's life and shared by every storage of its kind on that thread).
  std::size_t panel_bytes() const {
    const Index P = std::min<Index>(d_, std::clamp<Index>(kPanelElements / k_, 16, kMaxPanel));
    const Index unit = column_alignment();
    const Index Q =
        std::min<Index>((k_ + unit - 1) / unit * unit,
                        std::clamp<Index>(kPanelElements / d_, unit, kMaxPanel) / unit * unit);
    return std::size_t(std::max(P * k_, Q * d_)) * sizeof(float);
  }

  /// out[0, count) = dequant(W0)(row, col0 + j) in fp32, ggml's values bit for bit; col0 must be a
  /// multiple of the block size and col0 + count <= in_features().
  void dequantize_row(Index row, Index col0, Index count, float* out) const {
    const io::GgmlTypeTraits& t = io::ggml_type_traits(type_);
    const Index bs = t.block_size;
    eigen_assert(col0 % bs == 0 && col0 + count <= k_);
    const std::uint8_t* p = block_at(row, col0 / bs);
    const Index full = count / bs * bs;
    dequantize_blocks(p, full, out);
    if (full < count) {  // a last partial block (the padding of a quantize()d W0)
      float tail[kMaxAlignment];
      dequantize_blocks(p + std::size_t(full / bs) * t.type_size, bs, tail);
      std::copy(tail, tail + (count - full), out + full);
    }
  }
  /// As dequantize_row, rounded to bf16: the weight the oneDNN back end multiplies.
  void dequantize_row_bf16(Index row, Index col0, Index count, detail::bf16* out) const {
    const Index bs = io::ggml_type_traits(type_).block_size;
    const Index unit = bs == 1 ? 64 : kMaxAlignment / bs * bs;  // 256 values, whole blocks
    float chunk[kMaxAlignment];
    for (Index done = 0; done < count; done += unit) {
      const Index m = std::min(unit, count - done);
      dequantize_row(row, col0 + done, m, chunk);
      detail::to_bf16(chunk, out + done, m);
    }
  }

 private:
  friend class detail::PanelStorage<GgmlFrozenWeight>;

  static constexpr const char* kStorageName = "GgmlFrozenWeight";
  struct Private {};

  GgmlFrozenWeight(Private, io::GgmlType type, std::vector<std::uint8_t> data, Index d, Index k,
                   Index width)
      : type_(type), data_(std::move(data)), name_("W0") {
    d_ = d;
    k_ = k;
    row_values_ = width;
  }

  /// out[0, n) = the values of the blocks at p (n a whole number of blocks): ggml's dequantizer,
  /// or its AVX-512 form (the same values bit for bit) for the types with a fused kernel.
  void dequantize_blocks(const std::uint8_t* p, Index n, float* out) const {
    if (detail::ggml_decode::has_kernel(type_)) {
#if defined(LORA_GGML_AVX512)
      detail::ggml_decode::dequantize(type_, p, n, out, std::ptrdiff_t(row_bytes_));
      return;
#endif
    }
    io::ggml::dequantize(type_, p, out, std::size_t(n));
  }

  const std::uint8_t* block_at(Index row, Index block) const {
    return data_.data() + std::size_t(row) * row_bytes_ +
           std::size_t(block) * io::ggml_type_traits(type_).type_size;
  }

  void check_mode(MergeMode mode) const;

  void check_tensor(MergeMode mode, std::int64_t ne0, std::int64_t ne1) const;

  /// Every fp16 scale (or, for F16/BF16/F32, every value) finite: io::FormatError otherwise.
  void check_values() const;

  void finish(GgmlBackend backend);

  Index column_alignment() const {
    const Index bs = io::ggml_type_traits(type_).block_size;
    return bs == 1 ? 64 : bs;
  }
  // Finite fp16 scales (checked at construction) decode to finite weights: |d * sc * q| and
  // |dmin * m| stay far below fp32's range.
  bool packed_finite() const {
    return true;
  }

  // ---- the fused decoding kernel --------------------------------------------------------------

  /// H (+)= W X for n <= kSmallBatch: X copied (zero-padded to row_values()) into a per-thread
  /// buffer, then each row's blocks decoded once and dotted with every column.
  bool small_batch_product(const Eigen::Ref<const Matrix>& X, Eigen::Ref<Matrix> H,
                           bool accumulate) const;

  /// Rows [i0, i1) through the fused AVX-512 kernel of the type (detail/ggml_decode_kernels.hpp),
  /// compiled for each column count up to kSmallBatch.
  template <typename Store>
  void fused_rows(Index i0, Index i1, const float* x, Index n, float* partial,
                  const Store& store) const {
#if defined(LORA_GGML_AVX512)
    const std::uint8_t* w = data_.data();
    const std::ptrdiff_t kp = row_values_;
    switch (n) {
      case 1:
        return detail::ggml_decode::rows<1>(type_, w, row_bytes_, kp, x, i0, i1, partial, store);
      case 2:
        return detail::ggml_decode::rows<2>(type_, w, row_bytes_, kp, x, i0, i1, partial, store);
      case 3:
        return detail::ggml_decode::rows<3>(type_, w, row_bytes_, kp, x, i0, i1, partial, store);
      case 4:
        return detail::ggml_decode::rows<4>(type_, w, row_bytes_, kp, x, i0, i1, partial, store);
      case 5:
        return detail::ggml_decode::rows<5>(type_, w, row_bytes_, kp, x, i0, i1, partial, store);
      case 6:
        return detail::ggml_decode::rows<6>(type_, w, row_bytes_, kp, x, i0, i1, partial, store);
      case 7:
        return detail::ggml_decode::rows<7>(type_, w, row_bytes_, kp, x, i0, i1, partial, store);
      default:
        return detail::ggml_decode::rows<8>(type_, w, row_bytes_, kp, x, i0, i1, partial, store);
    }
#else
    (void)i0, (void)i1, (void)x, (void)n, (void)partial, (void)store;
#endif
  }

  /// acc[j] = row i of dequant(W0) . x_j, block by block through a small buffer (any type).
  void dot_rows(Index i, const float* x, Index n, float* acc) const {
    // 256 values per call (8 blocks of Q8_0): the per-call cost of the dequantizer is amortised.
    const Index bs = io::ggml_type_traits(type_).block_size;
    const Index unit = kMaxAlignment / bs * bs;
    float w[kMaxAlignment];
    for (Index j = 0; j < n; ++j) acc[j] = 0.0f;
    for (Index c = 0; c < row_values_; c += unit) {
      const Index m = std::min(unit, row_values_ - c);
      io::ggml::dequantize(type_, block_at(i, c / bs), w, std::size_t(m));
      const Eigen::Map<const Eigen::VectorXf> wv(w, m);
      for (Index j = 0; j < n; ++j)
        acc[j] += wv.dot(Eigen::Map<const Eigen::VectorXf>(x + j * row_values_ + c, m));
    }
  }

  /// acc[j] = row i of a Q4_K W0 . x_j without AVX-512: per sub-block d*sc * (q . x) - dmin*m *
  /// sum(x).
  void dot_q4_k(Index i, const float* x, const float* xsum, Index n, float* acc) const {
    const Index kp = row_values_, sub = kp / 32;
    float mins[kSmallBatch] = {};
    float plain[kSmallBatch] = {};
    for (Index sb = 0; sb < kp / 256; ++sb) {
      const std::uint8_t* block = block_at(i, sb);
      const float d = io::ggml::detail::half(block), dmin = io::ggml::detail::half(block + 2);
      float dsc[8], mm[8];
      for (int s = 0; s < 8; ++s) {
        std::uint8_t sc, m;
        io::ggml::detail::scale_min_k4(s, block + 4, sc, m);
        dsc[s] = d * float(sc);
        mm[s] = dmin * float(m);
      }
      for (Index j = 0; j < n; ++j)
        for (int s = 0; s < 8; ++s) mins[j] += mm[s] * xsum[j * sub + sb * 8 + s];
      const std::uint8_t* qs = block + 16;
      for (int p = 0; p < 4; ++p) {
        for (Index j = 0; j < n; ++j) {
          const float* xv = x + j * kp + sb * 256 + 64 * p;
          float s_lo = 0.0f, s_hi = 0.0f;
          for (int l = 0; l < 32; ++l) {
            s_lo += float(qs[32 * p + l] & 0xF) * xv[l];
            s_hi += float(qs[32 * p + l] >> 4) * xv[32 + l];
          }
          plain[j] += dsc[2 * p] * s_lo + dsc[2 * p + 1] * s_hi;
        }
      }
    }
    for (Index j = 0; j < n; ++j) acc[j] = plain[j] - mins[j];
  }

  io::GgmlType type_;
  std::vector<std::uint8_t> data_;
  std::string name_;
  Index row_values_ = 0;       // values per stored row (k rounded up to whole blocks)
  std::size_t row_bytes_ = 0;  // bytes per stored row
  GgmlBackend backend_ = GgmlBackend::Portable;
};

#if LORA_WITH_BODIES

LORA_FUNC GgmlFrozenWeight::GgmlFrozenWeight(std::vector<std::uint8_t> data, io::GgmlType type,
                                             std::int64_t ne0, std::int64_t ne1,
                                             const std::string& name, MergeMode mode,
                                             GgmlBackend backend)
    : type_(type), data_(std::move(data)), name_(name) {
  check_tensor(mode, ne0, ne1);
  d_ = Index(ne1);
  k_ = row_values_ = Index(ne0);
  finish(backend);
}

LORA_FUNC GgmlFrozenWeight GgmlFrozenWeight::quantize(const Eigen::Ref<const Matrix>& W0,
                                                      io::GgmlType type, MergeMode mode,
                                                      GgmlBackend backend) {
  detail::require(W0.size() > 0, "GgmlFrozenWeight::quantize: W0 must not be empty, got ",
                  detail::shape_string(W0.rows(), W0.cols()));
  detail::require(io::ggml::can_quantize(type),
                  "GgmlFrozenWeight::quantize: lora cannot "
                  "quantize into ",
                  io::ggml_type_traits(type).name,
                  "; it quantizes into f32, f16, bf16, q8_0, q4_0, q4_K and q6_K");
  detail::require_finite("GgmlFrozenWeight::quantize", "W0", W0);
  const Index unit = io::ggml_type_traits(type).block_size;
  const Index width = (W0.cols() + unit - 1) / unit * unit;
  std::vector<std::uint8_t> bytes = ggml_encode(W0, type);
  GgmlFrozenWeight w(Private{}, type, std::move(bytes), W0.rows(), W0.cols(), width);
  w.check_mode(mode);
  try {
    w.check_values();
  } catch (const io::FormatError& e) {
    throw std::domain_error(detail::concat("GgmlFrozenWeight::quantize: W0 does not fit ",
                                           io::ggml_type_traits(type).name,
                                           " (a block scale overflows fp16): ", e.what()));
  }
  w.finish(backend);
  return w;
}

LORA_FUNC std::vector<std::uint8_t> GgmlFrozenWeight::ggml_encode(const Eigen::Ref<const Matrix>& W,
                                                                  io::GgmlType type) {
  detail::require(io::ggml::can_quantize(type),
                  "GgmlFrozenWeight::ggml_encode: lora cannot "
                  "quantize into ",
                  io::ggml_type_traits(type).name,
                  "; it quantizes into f32, f16, bf16, q8_0, q4_0, q4_K and q6_K");
  detail::require_finite("GgmlFrozenWeight::ggml_encode", "W", W);
  const io::GgmlTypeTraits& t = io::ggml_type_traits(type);
  const Index unit = t.block_size;
  const Index width = (W.cols() + unit - 1) / unit * unit;
  const std::size_t row_bytes = std::size_t(width / unit) * t.type_size;
  std::vector<std::uint8_t> bytes(row_bytes * std::size_t(W.rows()));
  std::vector<float> row(std::size_t(width), 0.0f);
  for (Index i = 0; i < W.rows(); ++i) {
    for (Index j = 0; j < W.cols(); ++j) row[std::size_t(j)] = W(i, j);
    io::ggml::quantize(type, row.data(), bytes.data() + std::size_t(i) * row_bytes,
                       std::size_t(width));
  }
  return bytes;
}

LORA_FUNC void GgmlFrozenWeight::rebase(const Eigen::Ref<const Matrix>& W) {
  this->check_rebase_call("GgmlFrozenWeight::rebase", W);
  std::vector<std::uint8_t> bytes = ggml_encode(W, type_);
  std::swap(data_, bytes);
  try {
    check_values();
  } catch (const io::FormatError& e) {
    std::swap(data_, bytes);
    throw std::domain_error(detail::concat("GgmlFrozenWeight::rebase: W does not fit ",
                                           io::ggml_type_traits(type_).name,
                                           " (a block scale overflows fp16): ", e.what()));
  }
}

LORA_FUNC void GgmlFrozenWeight::check_mode(MergeMode mode) const {
  detail::require(mode == MergeMode::ExactRestore,
                  "GgmlFrozenWeight: only MergeMode::ExactRestore is supported (merge() builds "
                  "the fp32 merged weight beside the blocks, which never change), got "
                  "MergeMode::InPlace");
}

LORA_FUNC void GgmlFrozenWeight::check_tensor(MergeMode mode, std::int64_t ne0,
                                              std::int64_t ne1) const {
  const io::GgmlTypeTraits* t = io::ggml_type_traits(static_cast<std::uint32_t>(type_));
  if (t == nullptr)
    throw io::FormatError(detail::concat("GgmlFrozenWeight: tensor '", name_,
                                         "' has an unknown ggml type ",
                                         static_cast<std::uint32_t>(type_)));
  if (!io::ggml::can_dequantize(type_))
    throw io::FormatError(detail::concat(
        "GgmlFrozenWeight: tensor '", name_, "' is ", t->name,
        ", which lora cannot dequantize; supported: f32, f16, bf16, q8_0, q4_0, q5_0, q4_K, "
        "q5_K, q6_K"));
  if (ne0 <= 0 || ne1 <= 0)
    throw io::FormatError(detail::concat("GgmlFrozenWeight: tensor '", name_,
                                         "' must have ne0 (in features) and ne1 (out "
                                         "features) > 0, got ne = [",
                                         ne0, ", ", ne1, "]"));
  if (ne0 % t->block_size != 0)
    throw io::FormatError(detail::concat("GgmlFrozenWeight: tensor '", name_, "' is ", t->name,
                                         ", whose rows are blocks of ", t->block_size,
                                         " values, but ne0 (in features) is ", ne0));
  const auto row = io::ggml_row_bytes(type_, ne0);
  if (!row || std::uint64_t(ne1) > std::numeric_limits<std::size_t>::max() / (*row ? *row : 1) ||
      std::uint64_t(ne0) > std::uint64_t(std::numeric_limits<Index>::max()) / std::uint64_t(ne1))
    throw io::FormatError(detail::concat("GgmlFrozenWeight: tensor '", name_,
                                         "' is too large: ne = [", ne0, ", ", ne1, "]"));
  if (data_.size() != *row * std::size_t(ne1))
    throw io::FormatError(detail::concat("GgmlFrozenWeight: tensor '", name_, "' (", t->name,
                                         ", ne = [", ne0, ", ", ne1, "]) must be ",
                                         *row * std::size_t(ne1), " bytes, got ", data_.size()));
  check_mode(mode);
}

LORA_FUNC void GgmlFrozenWeight::check_values() const {
  const io::GgmlTypeTraits& t = io::ggml_type_traits(type_);
  const auto fail = [&](std::size_t block, const char* what) {
    const std::size_t blocks_per_row = std::size_t(row_values_ / t.block_size);
    throw io::FormatError(detail::concat("GgmlFrozenWeight: tensor '", name_, "' (", t.name,
                                         ") has a non-finite ", what, " in row ",
                                         block / blocks_per_row, ", block ", block % blocks_per_row,
                                         " (byte ", block * t.type_size, ")"));
  };
  const std::size_t blocks = data_.size() / t.type_size;
  std::size_t offsets[2] = {0, 0};
  int n_offsets = 1;
  switch (type_) {
    case io::GgmlType::Q4_K:
    case io::GgmlType::Q5_K:
      offsets[1] = 2;  // d and dmin
      n_offsets = 2;
      break;
    case io::GgmlType::Q6_K:
      offsets[0] = 208;
      break;
    default:
      break;
  }
  for (std::size_t b = 0; b < blocks; ++b) {
    const std::uint8_t* p = data_.data() + b * t.type_size;
    if (type_ == io::GgmlType::F32 || type_ == io::GgmlType::F16 || type_ == io::GgmlType::BF16) {
      float v;
      io::ggml::dequantize(type_, p, &v, 1);
      if (!std::isfinite(v)) fail(b, "value");
      continue;
    }
    for (int o = 0; o < n_offsets; ++o) {
      std::uint16_t h;
      std::memcpy(&h, p + offsets[o], 2);
      if ((h & 0x7c00u) == 0x7c00u) fail(b, o == 0 ? "scale d" : "scale dmin");
    }
  }
}

LORA_FUNC void GgmlFrozenWeight::finish(GgmlBackend backend) {
  row_bytes_ = *io::ggml_row_bytes(type_, row_values_);
  check_values();
  backend_ = detail::resolve_bf16_backend(backend, "GgmlFrozenWeight", "GgmlBackend");
  set_onednn(backend_ == GgmlBackend::OneDnn);
}

LORA_FUNC bool GgmlFrozenWeight::small_batch_product(const Eigen::Ref<const Matrix>& X,
                                                     Eigen::Ref<Matrix> H, bool accumulate) const {
  const Index n = X.cols();
  if (n > kSmallBatch) return false;
  const Index kp = row_values_;
  const bool fused = detail::ggml_decode::has_kernel(type_);
  // Portable Q4_K: the sums of x over each sub-block of 32, per column.
  const bool q4k_sums = !fused && type_ == io::GgmlType::Q4_K;
  const Index sub = kp / 32;
  // After x: the fused kernels' partial sums (d x n), or the portable Q4_K's sums of x.
  float* x = buffer_f32(1, kp * n + (fused ? d_ * n : q4k_sums ? sub * n : 0));
  for (Index j = 0; j < n; ++j) {
    float* xj = x + j * kp;
    std::copy(X.col(j).data(), X.col(j).data() + k_, xj);
    std::fill(xj + k_, xj + kp, 0.0f);
  }
  float* xsum = x + kp * n;  // also the fused kernels' partial sums
  if (q4k_sums)
    for (Index j = 0; j < n; ++j)
      for (Index s = 0; s < sub; ++s) {
        float acc = 0.0f;
        for (Index l = 0; l < 32; ++l) acc += x[j * kp + s * 32 + l];
        xsum[j * sub + s] = acc;
      }
  const int threads = int(std::max<Index>(1, std::min<Index>(Eigen::nbThreads(), d_ / 64)));
  const Index chunk = (d_ + threads - 1) / threads;
  detail::parallel_for(threads, threads, [&](Index t) {
    const Index i0 = t * chunk, i1 = std::min(d_, i0 + chunk);
    const auto store = [&](Index i, const float* acc) {
      for (Index j = 0; j < n; ++j) H(i, j) = accumulate ? H(i, j) + acc[j] : acc[j];
    };
    if (fused) {
      fused_rows(i0, i1, x, n, xsum + i0 * n, store);
      return;
    }
    float acc[kSmallBatch];
    for (Index i = i0; i < i1; ++i) {
      if (q4k_sums)
        dot_q4_k(i, x, xsum, n, acc);
      else
        dot_rows(i, x, n, acc);
      store(i, acc);
    }
  });
  return true;
}

#endif  // LORA_WITH_BODIES

}  // namespace lora
