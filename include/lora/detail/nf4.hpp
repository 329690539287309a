// 4-bit NormalFloat (NF4) quantization of a frozen weight, as QLoRA (Dettmers et al. 2023, arXiv
// 2305.14314) and bitsandbytes store it:
//   - each output row of W0 (d x k, out x in) is cut into blocks of kBlock = 64 consecutive weights
//     along the input dimension (the last block of a row may be partial);
//   - a block is scaled by its absmax c = max |w|, and each w / c is mapped to the nearest of the
//     16 NF4 code values (kCodes) and stored as a 4-bit index, two per byte;
//   - optionally (double quantization, QLoRA section 3) the absmax values themselves are stored in
//     8 bits, in groups of kScaleGroup = 256 blocks.
//
// Code table and rounding: bitsandbytes csrc/kernels.cu (github.com/bitsandbytes-foundation/
// bitsandbytes): `nf4_dequantization_lut` gives the 16 values, and `dQuantizeNF4(float x)` maps a
// normalised weight x = w * (1.0f / c) to a code with a tree of strict comparisons `x > t` against
// the 15 midpoints between neighbouring codes (float literals, kThresholds below). A weight exactly
// halfway between two codes therefore goes to the LOWER code (the one nearer -1), on both sides of
// zero. The tree is equivalent to code = #{t in kThresholds : x > t}, which is what quantize_code
// computes. kQuantizeBlockwise packs element 2j into the high nibble and 2j+1 into the low nibble
// of byte j, and dequantizes w' = code_value * c in fp32; both are followed here.
//
// Where this differs from bitsandbytes, on purpose:
//   - a block of zeros (c = 0): bitsandbytes computes 0 * (1/0) = NaN and stores code 0 (-1.0),
//     whose value times c = 0 is -0; here the block stores the code of 0.0 and dequantizes to +0;
//   - a block whose absmax is below 1/FLT_MAX (subnormal): 1/c is inf, so bitsandbytes' w * (1/c)
//     is NaN or inf; here such a block divides w / c (the codes then keep the error bound);
//   - blocks never straddle rows (bitsandbytes blocks the flattened tensor); a row's last block may
//     be partial and its padding stores the code of 0.0;
//   - double quantization subtracts the mean of all absmax values, as bitsandbytes does, but stores
//     the centred values with a symmetric linear 8-bit code per group of 256 (q = round(127 (c -
//     mean) / m), m = the group's max |c - mean|) instead of bitsandbytes' dynamic 8-bit map. The
//     memory is the same (8 bits per block plus one fp32 per group: 4.127 bits per weight) and the
//     error of a decoded absmax is at most m / 254.
#pragma once

#include "lora/detail/bf16.hpp"

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define LORA_NF4_AVX512 1
#endif

namespace lora::detail::nf4 {

using Index = Eigen::Index;

/// Weights per quantization block (along the input dimension, within one output row).
inline constexpr Index kBlock = 64;
/// Bytes of one full block's codes (two 4-bit codes per byte).
inline constexpr Index kBlockBytes = kBlock / 2;
/// Blocks per group of double quantization (one fp32 scale per group).
inline constexpr Index kScaleGroup = 256;

/// The 16 NF4 values, index = the 4-bit code (bitsandbytes' nf4_dequantization_lut).
inline constexpr float kCodes[16] = {-1.0f,
                                     -0.6961928009986877f,
                                     -0.5250730514526367f,
                                     -0.39491748809814453f,
                                     -0.28444138169288635f,
                                     -0.18477343022823334f,
                                     -0.09105003625154495f,
                                     0.0f,
                                     0.07958029955625534f,
                                     0.16093020141124725f,
                                     0.24611230194568634f,
                                     0.33791524171829224f,
                                     0.44070982933044434f,
                                     0.5626170039176941f,
                                     0.7229568362236023f,
                                     1.0f};

/// The code of 0.0 (padding and all-zero blocks).
inline constexpr std::uint8_t kZeroCode = 7;

/// dQuantizeNF4's decision thresholds, ascending: kThresholds[i] separates code i from code i+1.
/// They are the float literals bitsandbytes compares with: the midpoints of the table's
/// double-precision values, rounded to float (for four of them one float step away from the
/// midpoint of the float codes; a weight is "halfway" when it equals the threshold).
inline constexpr float kThresholds[15] = {
    -0.8480964004993439f,  -0.6106329262256622f,  -0.4599952697753906f,   -0.33967943489551544f,
    -0.23460740596055984f, -0.13791173323988914f, -0.045525018125772476f, 0.03979014977812767f,
    0.1202552504837513f,   0.2035212516784668f,   0.2920137718319893f,    0.3893125355243683f,
    0.5016634166240692f,   0.6427869200706482f,   0.8614784181118011f};

/// Half the widest gap between neighbouring codes (between -1 and -0.696...): the per-block error
/// bound |w' - w| <= c * kHalfWidestGap (before double quantization).
inline constexpr float kHalfWidestGap = (kCodes[1] - kCodes[0]) / 2;

/// The NF4 code of a normalised weight x (|x| <= 1): bitsandbytes' dQuantizeNF4, ties to the lower
/// code (see the top of this file).
inline std::uint8_t quantize_code(float x) {
  std::uint8_t code = 0;
  for (float t : kThresholds) code = static_cast<std::uint8_t>(code + (x > t ? 1 : 0));
  return code;
}

/// Blocks of one row of k weights: ceil(k / 64).
inline Index blocks_per_row(Index k) {
  return (k + kBlock - 1) / kBlock;
}

/// Quantizes one row of k weights (src, stride 1) into blocks_per_row(k) * 32 bytes of codes and
/// blocks_per_row(k) absmax values. src must be finite.
inline void quantize_row(const float* src, Index k, std::uint8_t* codes, float* absmax) {
  const Index blocks = blocks_per_row(k);
  for (Index b = 0; b < blocks; ++b) {
    const Index begin = b * kBlock;
    const Index count = std::min(kBlock, k - begin);
    float c = 0.0f;
    for (Index j = 0; j < count; ++j) c = std::max(c, std::abs(src[begin + j]));
    absmax[b] = c;
    const float inv = c > 0.0f ? 1.0f / c : 0.0f;  // bitsandbytes multiplies by 1.0f / absmax
    // Below 1/FLT_MAX (about 2.9e-39, a subnormal absmax) 1/c is inf, and w * inf would be NaN
    // for w = 0 (code 0: -1.0) and inf otherwise: such a block divides by c instead, exact to
    // the rounding of one division (|w / c| <= 1 always).
    const bool divide = !std::isfinite(inv);
    const auto normalised = [&](Index j) { return divide ? src[j] / c : src[j] * inv; };
    std::uint8_t* out = codes + b * kBlockBytes;
    for (Index j = 0; j < kBlock; j += 2) {
      const std::uint8_t hi =
          (j < count && c > 0.0f) ? quantize_code(normalised(begin + j)) : kZeroCode;
      const std::uint8_t lo =
          (j + 1 < count && c > 0.0f) ? quantize_code(normalised(begin + j + 1)) : kZeroCode;
      out[j / 2] = static_cast<std::uint8_t>((hi << 4) | lo);
    }
  }
}

/// Absmax values stored in 8 bits (double quantization): value i is
///   q[i] * scale[i / kScaleGroup] + offset.
struct QuantizedScales {
  std::vector<std::int8_t> q;
  std::vector<float> scale;  // one per group of kScaleGroup values: m / 127
  float offset = 0.0f;       // the mean of all absmax values

  float decode(Index i) const {
    return static_cast<float>(q[std::size_t(i)]) * scale[std::size_t(i / kScaleGroup)] + offset;
  }
  std::size_t bytes() const { return q.size() + scale.size() * sizeof(float) + sizeof(float); }
};

/// Double quantization of absmax values c (blocks of 256, the mean subtracted first).
inline QuantizedScales quantize_scales(const std::vector<float>& c) {
  QuantizedScales s;
  const std::size_t n = c.size();
  double sum = 0.0;
  for (float v : c) sum += v;
  s.offset = n ? static_cast<float>(sum / double(n)) : 0.0f;
  s.q.resize(n);
  s.scale.resize((n + kScaleGroup - 1) / kScaleGroup);
  for (std::size_t g = 0; g < s.scale.size(); ++g) {
    const std::size_t begin = g * kScaleGroup, end = std::min(n, begin + kScaleGroup);
    float m = 0.0f;
    for (std::size_t i = begin; i < end; ++i) m = std::max(m, std::abs(c[i] - s.offset));
    s.scale[g] = m / 127.0f;
    const float inv = m > 0.0f ? 127.0f / m : 0.0f;
    for (std::size_t i = begin; i < end; ++i) {
      const float q = std::nearbyint((c[i] - s.offset) * inv);  // ties to even
      s.q[i] = static_cast<std::int8_t>(std::clamp(q, -127.0f, 127.0f));
    }
  }
  return s;
}

// ---- dequantization
// -------------------------------------------------------------------------------

/// Scalar reference: the 64 weights of one full block, code value times c, in fp32.
inline void dequantize_block_scalar(const std::uint8_t* codes, float c, float* out) {
  for (Index j = 0; j < kBlockBytes; ++j) {
    out[2 * j] = kCodes[codes[j] >> 4] * c;
    out[2 * j + 1] = kCodes[codes[j] & 0x0f] * c;
  }
}

/// As dequantize_block_scalar, rounded to bf16 (nearest, ties to even).
inline void dequantize_block_bf16_scalar(const std::uint8_t* codes, float c, bf16* out) {
  for (Index j = 0; j < kBlockBytes; ++j) {
    out[2 * j] = round_to_bf16(kCodes[codes[j] >> 4] * c);
    out[2 * j + 1] = round_to_bf16(kCodes[codes[j] & 0x0f] * c);
  }
}

#if defined(LORA_NF4_AVX512)
inline constexpr __mmask16 kAll = 0xffff;

/// The 64 codes of a block as four vectors of 16 indices, in element order.
inline void block_indices(const std::uint8_t* codes, __m512i idx[4]) {
  const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes));
  const __m256i low_mask = _mm256_set1_epi8(0x0f);
  const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low_mask);
  const __m256i lo = _mm256_and_si256(bytes, low_mask);
  // Element 2j is byte j's high nibble, 2j+1 its low nibble: interleave hi and lo per byte.
  const __m256i even = _mm256_unpacklo_epi8(hi, lo);  // bytes 0-7 | 16-23 -> elements 0-15 | 32-47
  const __m256i odd = _mm256_unpackhi_epi8(hi, lo);   // bytes 8-15 | 24-31 -> 16-31 | 48-63
  // The zero-masked forms: GCC 12 warns that the unmasked ones read an undefined vector.
  idx[0] = _mm512_maskz_cvtepu8_epi32(kAll, _mm256_castsi256_si128(even));
  idx[1] = _mm512_maskz_cvtepu8_epi32(kAll, _mm256_castsi256_si128(odd));
  idx[2] = _mm512_maskz_cvtepu8_epi32(kAll, _mm256_extracti128_si256(even, 1));
  idx[3] = _mm512_maskz_cvtepu8_epi32(kAll, _mm256_extracti128_si256(odd, 1));
}

/// 16 code values for 16 indices.
inline __m512 lookup(__m512i idx, __m512 table) {
  return _mm512_maskz_permutexvar_ps(kAll, idx, table);
}

inline __m512 code_table() {
  return _mm512_loadu_ps(kCodes);
}

/// float -> bf16 bits, nearest even (finite inputs), 16 at a time.
inline __m256i to_bf16_16(__m512 v) {
#if defined(__AVX512BF16__)
  const __m256bh h = _mm512_cvtneps_pbh(v);
  __m256i bits;
  std::memcpy(&bits, &h, sizeof bits);
  return bits;
#else
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb);
  return _mm512_maskz_cvtepi32_epi16(kAll, _mm512_srli_epi32(r, 16));
#endif
}
#endif

/// The 64 weights of one full block in fp32 (bit-identical to dequantize_block_scalar).
inline void dequantize_block(const std::uint8_t* codes, float c, float* out) {
#if defined(LORA_NF4_AVX512)
  __m512i idx[4];
  block_indices(codes, idx);
  const __m512 table = code_table(), scale = _mm512_set1_ps(c);
  for (int q = 0; q < 4; ++q)
    _mm512_storeu_ps(out + 16 * q, _mm512_mul_ps(lookup(idx[q], table), scale));
#else
  dequantize_block_scalar(codes, c, out);
#endif
}

/// The 64 weights of one full block rounded to bf16 (bit-identical to the scalar version).
inline void dequantize_block_bf16(const std::uint8_t* codes, float c, bf16* out) {
#if defined(LORA_NF4_AVX512)
  __m512i idx[4];
  block_indices(codes, idx);
  const __m512 table = code_table(), scale = _mm512_set1_ps(c);
  for (int q = 0; q < 4; ++q)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16 * q),
                        to_bf16_16(_mm512_mul_ps(lookup(idx[q], table), scale)));
#else
  dequantize_block_bf16_scalar(codes, c, out);
#endif
}

}  // namespace lora::detail::nf4
