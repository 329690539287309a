// The fused decoding kernels of GgmlFrozenWeight (lora/ggml_frozen_weight.hpp) with AVX-512: a
// product W X of at most kSmallBatch (8) columns reads each block of W once, decodes it in
// registers into ggml's own fp32 weights and multiplies them with every column as it goes (no
// panel, no memory traffic beyond the blocks and X).
//
// The weights are those of ggml's dequantize_row_* bit for bit (the same products in the same
// order, rounded once each: the *_round_ intrinsics where a multiply and a subtraction follow each
// other, which no compiler contracts into a fused multiply-add):
//   Q8_0  q * d                     (int8 -> fp32 convert, times d)
//   Q4_0  (q - 8) * d               (a 16-entry table of the block's values, looked up by nibble)
//   Q4_K  d*sc * q - dmin*m         (a 16-entry table per sub-block of 32, looked up by nibble)
//   Q6_K  (d * sc) * (q - 32)       (6-bit q assembled bytewise, convert, times d * sc)
// except that n = 1 Q8_0 multiplies q . x first and scales the block's sum by d. The products
// are then plain fp32 dot products: fp32 summation's bound against the product in exact
// arithmetic, the sums in another order than Eigen's.
//
// Rows go R at a time (R independent accumulators per column, x loads shared by the R rows): R =
// 4 up to four columns, 2 beyond. Two or more columns go through x in tiles that stay in L1
// (rows(), below). The blocks ahead are prefetched: the hardware prefetcher alone leaves a
// one-column decode well below the memory bandwidth.
#pragma once

#include "lora/io/ggml_types.hpp"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__F16C__)
#include <immintrin.h>
#define LORA_GGML_AVX512 1
#endif

namespace lora::detail::ggml_decode {

#if defined(LORA_GGML_AVX512)

/// True when `type` has a fused AVX-512 kernel here.
constexpr bool has_kernel(io::GgmlType type) {
  return type == io::GgmlType::Q8_0 || type == io::GgmlType::Q4_0 || type == io::GgmlType::Q4_K ||
         type == io::GgmlType::Q6_K;
}

/// Rows decoded together for NC columns.
constexpr int rows_per_group(int NC) {
  return NC <= 4 ? 4 : 2;
}

/// An fp16 number (little-endian bytes) as float: exact (F16C).
inline float half(const std::uint8_t* p) {
  std::uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

#if defined(__clang__)
#define LORA_GGML_UNROLL _Pragma("unroll")
#else
#define LORA_GGML_UNROLL _Pragma("GCC unroll 16")
#endif

/// A hint to bring the line at p into L1: the blocks ahead of the ones being decoded (the
/// hardware prefetcher alone leaves a decode well below the memory bandwidth). Never faults.
inline void prefetch(const std::uint8_t* p) {
  _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0);
}

constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

template <int R, int NC>
struct Accumulators {
  __m512 v[R][NC];
  Accumulators() {
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < NC; ++j) v[r][j] = _mm512_setzero_ps();
  }
  /// out[r * NC + j] = the sum of v[r][j]'s lanes (through memory: GCC 12's
  /// _mm512_reduce_add_ps trips -Wuninitialized in its own header).
  void reduce(float* out) const {
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < NC; ++j) {
        alignas(64) float lanes[16];
        _mm512_store_ps(lanes, v[r][j]);
        float sum = 0.0f;
        for (float l : lanes) sum += l;
        out[r * NC + j] = sum;
      }
  }
};

/// Q8_0: 34-byte blocks of 32 values, fp16 d then int8 q[32].
template <int NC, int R>
inline void q8_0(const std::uint8_t* w, std::size_t row_bytes, std::ptrdiff_t count, const float* x,
                 std::ptrdiff_t ldx, std::ptrdiff_t pf, float* out) {
  Accumulators<R, NC> acc;
  for (std::ptrdiff_t c = 0; c < count; c += 32) {
    const std::uint8_t* block = w + std::size_t(c / 32) * 34;
    LORA_GGML_UNROLL
    for (int r = 0; r < R; ++r, block += row_bytes) {
      prefetch(block + pf);
      const __m512 d = _mm512_set1_ps(half(block));
      const __m512 q0 = _mm512_cvtepi32_ps(
          _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 2))));
      const __m512 q1 = _mm512_cvtepi32_ps(
          _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 18))));
      if constexpr (NC == 1) {
        const __m512 s = _mm512_fmadd_ps(q1, _mm512_loadu_ps(x + c + 16),
                                         _mm512_mul_ps(q0, _mm512_loadu_ps(x + c)));
        acc.v[r][0] = _mm512_fmadd_ps(d, s, acc.v[r][0]);
      } else {
        const __m512 w0 = _mm512_mul_ps(q0, d), w1 = _mm512_mul_ps(q1, d);
        LORA_GGML_UNROLL
        for (int j = 0; j < NC; ++j) {
          const float* xj = x + j * ldx + c;
          acc.v[r][j] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xj + 16),
                                        _mm512_fmadd_ps(w0, _mm512_loadu_ps(xj), acc.v[r][j]));
        }
      }
    }
  }
  acc.reduce(out);
}

/// Q4_0: 18-byte blocks of 32 values, fp16 d then 16 bytes: value j < 16 in the low nibble of
/// byte j, value 16 + j in its high nibble.
template <int NC, int R>
inline void q4_0(const std::uint8_t* w, std::size_t row_bytes, std::ptrdiff_t count, const float* x,
                 std::ptrdiff_t ldx, std::ptrdiff_t pf, float* out) {
  const __m512 levels = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
  Accumulators<R, NC> acc;
  for (std::ptrdiff_t c = 0; c < count; c += 32) {
    const std::uint8_t* block = w + std::size_t(c / 32) * 18;
    LORA_GGML_UNROLL
    for (int r = 0; r < R; ++r, block += row_bytes) {
      prefetch(block + pf);
      const __m512 table = _mm512_mul_ps(levels, _mm512_set1_ps(half(block)));
      // One byte per 32-bit lane: vpermps reads the low 4 bits of each lane's index.
      const __m512i bytes =
          _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 2)));
      const __m512 w0 = _mm512_permutexvar_ps(bytes, table);
      const __m512 w1 = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table);
      LORA_GGML_UNROLL
      for (int j = 0; j < NC; ++j) {
        const float* xj = x + j * ldx + c;
        acc.v[r][j] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xj + 16),
                                      _mm512_fmadd_ps(w0, _mm512_loadu_ps(xj), acc.v[r][j]));
      }
    }
  }
  acc.reduce(out);
}

/// The 8 scales (sc) and 8 mins (m) of a Q4_K super-block's 12 scale bytes, as ggml's
/// get_scale_min_k4 gives them, one byte each: sc in the low 8 bytes, m in the high 8.
inline __m128i q4_k_scales(const std::uint8_t* s) {
  constexpr std::uint32_t kmask1 = 0x3f3f3f3f, kmask2 = 0x0f0f0f0f, kmask3 = 0x03030303;
  std::uint32_t u[4];
  std::memcpy(u, s, 12);
  u[3] = ((u[2] >> 4) & kmask2) | (((u[1] >> 6) & kmask3) << 4);
  const std::uint32_t mins_low = u[1] & kmask1;
  u[1] = (u[2] & kmask2) | (((u[0] >> 6) & kmask3) << 4);
  u[2] = mins_low;
  u[0] &= kmask1;
  return _mm_loadu_si128(reinterpret_cast<const __m128i*>(u));
}

/// Q4_K: 144-byte super-blocks of 256 values: fp16 d, fp16 dmin, 12 scale bytes, 128 bytes of
/// nibbles (each 64 values: 32 low nibbles, then the same bytes' 32 high nibbles).
template <int NC, int R>
inline void q4_k(const std::uint8_t* w, std::size_t row_bytes, std::ptrdiff_t count, const float* x,
                 std::ptrdiff_t ldx, std::ptrdiff_t pf, float* out) {
  const __m512 levels = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  Accumulators<R, NC> acc;
  for (std::ptrdiff_t c = 0; c < count; c += 256) {
    const std::uint8_t* block = w + std::size_t(c / 256) * 144;
    alignas(64) float scale[R][16];  // d*sc (ggml's d1) of sub-block s at s, dmin*m (m1) at 8 + s
    LORA_GGML_UNROLL
    for (int r = 0; r < R; ++r) {
      const std::uint8_t* b = block + r * row_bytes;
      prefetch(b + pf);
      prefetch(b + pf + 64);
      prefetch(b + pf + 128);
      const __m512 dm = _mm512_castpd_ps(
          _mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(_mm256_set1_ps(half(b)))),
                             _mm256_castps_pd(_mm256_set1_ps(half(b + 2))), 1));
      _mm512_store_ps(
          scale[r],
          _mm512_mul_ps(dm, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(q4_k_scales(b + 4)))));
    }
    // The scales from memory: one broadcast load each (else compilers shuffle them out of the
    // register, and the shuffle unit is the bottleneck).
    __asm__ __volatile__("" : : "r"(&scale[0][0]) : "memory");
    LORA_GGML_UNROLL
    for (int p = 0; p < 4; ++p) {  // 64 values: sub-block 2p (low nibbles), 2p + 1 (high)
      LORA_GGML_UNROLL
      for (int r = 0; r < R; ++r) {
        const std::uint8_t* qs = block + r * row_bytes + 16 + 32 * p;
        const __m512 t_lo =
            _mm512_sub_round_ps(_mm512_mul_ps(levels, _mm512_set1_ps(scale[r][2 * p])),
                                _mm512_set1_ps(scale[r][8 + 2 * p]), kRound);
        const __m512 t_hi =
            _mm512_sub_round_ps(_mm512_mul_ps(levels, _mm512_set1_ps(scale[r][2 * p + 1])),
                                _mm512_set1_ps(scale[r][9 + 2 * p]), kRound);
        const __m512i a =
            _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs)));
        const __m512i b =
            _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + 16)));
        const __m512 w0 = _mm512_permutexvar_ps(a, t_lo);
        const __m512 w1 = _mm512_permutexvar_ps(b, t_lo);
        const __m512 w2 = _mm512_permutexvar_ps(_mm512_srli_epi32(a, 4), t_hi);
        const __m512 w3 = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), t_hi);
        LORA_GGML_UNROLL
        for (int j = 0; j < NC; ++j) {
          const float* xj = x + j * ldx + c + 64 * p;
          __m512 s = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xj), acc.v[r][j]);
          s = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xj + 16), s);
          s = _mm512_fmadd_ps(w2, _mm512_loadu_ps(xj + 32), s);
          acc.v[r][j] = _mm512_fmadd_ps(w3, _mm512_loadu_ps(xj + 48), s);
        }
      }
    }
  }
  acc.reduce(out);
}

/// Q6_K: 210-byte super-blocks of 256 values: 128 bytes ql (low 4 bits), 64 bytes qh (high 2
/// bits), 16 int8 scales (one per 16 values), fp16 d. Each half of 128 values: value l + 32k
/// (l < 32, k < 4) has its low bits in ql[l + 32 (k & 1)] (low nibble for k < 2, high for k >= 2)
/// and its high bits at bits 2k, 2k + 1 of qh[l].
template <int NC, int R>
inline void q6_k(const std::uint8_t* w, std::size_t row_bytes, std::ptrdiff_t count, const float* x,
                 std::ptrdiff_t ldx, std::ptrdiff_t pf, float* out) {
  const __m256i m4 = _mm256_set1_epi8(0x0f), m2 = _mm256_set1_epi8(0x30),
                m32 = _mm256_set1_epi8(32);
  Accumulators<R, NC> acc;
  for (std::ptrdiff_t c = 0; c < count; c += 256) {
    const std::uint8_t* block = w + std::size_t(c / 256) * 210;
    LORA_GGML_UNROLL
    for (int r = 0; r < R; ++r, block += row_bytes) {
      for (int l = 0; l < 4; ++l) prefetch(block + pf + 64 * l);
      alignas(64) float scale[16];  // d * sc of each 16 values
      _mm512_store_ps(scale, _mm512_mul_ps(_mm512_set1_ps(half(block + 208)),
                                           _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                                               reinterpret_cast<const __m128i*>(block + 192))))));
      // Broadcast loads, not shuffles (see q4_k).
      __asm__ __volatile__("" : : "r"(scale) : "memory");
      LORA_GGML_UNROLL
      for (int h = 0; h < 2; ++h) {
        const auto* ql = reinterpret_cast<const __m256i*>(block + 64 * h);
        const __m256i l0 = _mm256_loadu_si256(ql), l1 = _mm256_loadu_si256(ql + 1);
        const __m256i hb =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 128 + 32 * h));
        // q - 32 of values 32k .. 32k + 31 of this half, one int8 each.
        __m256i q[4];
        q[0] = _mm256_or_si256(_mm256_and_si256(l0, m4),
                               _mm256_and_si256(_mm256_slli_epi16(hb, 4), m2));
        q[1] = _mm256_or_si256(_mm256_and_si256(l1, m4),
                               _mm256_and_si256(_mm256_slli_epi16(hb, 2), m2));
        q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4),
                               _mm256_and_si256(hb, m2));
        q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                               _mm256_and_si256(_mm256_srli_epi16(hb, 2), m2));
        LORA_GGML_UNROLL
        for (int k = 0; k < 4; ++k) {
          const __m256i v = _mm256_sub_epi8(q[k], m32);
          const __m512 w0 =
              _mm512_mul_ps(_mm512_set1_ps(scale[8 * h + 2 * k]),
                            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(v))));
          const __m512 w1 = _mm512_mul_ps(
              _mm512_set1_ps(scale[8 * h + 2 * k + 1]),
              _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(v, 1))));
          LORA_GGML_UNROLL
          for (int j = 0; j < NC; ++j) {
            const float* xj = x + j * ldx + c + 128 * h + 32 * k;
            acc.v[r][j] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xj + 16),
                                          _mm512_fmadd_ps(w0, _mm512_loadu_ps(xj), acc.v[r][j]));
          }
        }
      }
    }
  }
  acc.reduce(out);
}

/// out[0, n) = ggml's fp32 values of the blocks at p (n a whole number of blocks of a type with
/// a kernel here), bit for bit those of io::ggml::dequantize: what the panels multiply. pf: the
/// byte offset of the blocks to prefetch (the same columns of the next row: a panel decodes row
/// after row, whole rows or segments of a few blocks).
inline void dequantize(io::GgmlType type, const std::uint8_t* p, std::ptrdiff_t n, float* out,
                       std::ptrdiff_t pf) {
  const auto bytes16 = [](const std::uint8_t* q) {
    return _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
  };
  switch (type) {
    case io::GgmlType::Q8_0:
      for (std::ptrdiff_t c = 0; c < n; c += 32, p += 34) {
        prefetch(p + pf);
        const __m512 d = _mm512_set1_ps(half(p));
        _mm512_storeu_ps(
            out + c, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes16(p + 2))), d));
        _mm512_storeu_ps(
            out + c + 16,
            _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes16(p + 18))), d));
      }
      break;
    case io::GgmlType::Q4_0: {
      const __m512 levels = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
      for (std::ptrdiff_t c = 0; c < n; c += 32, p += 18) {
        prefetch(p + pf);
        const __m512 table = _mm512_mul_ps(levels, _mm512_set1_ps(half(p)));
        const __m512i q = _mm512_cvtepu8_epi32(bytes16(p + 2));
        _mm512_storeu_ps(out + c, _mm512_permutexvar_ps(q, table));
        _mm512_storeu_ps(out + c + 16, _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), table));
      }
      break;
    }
    case io::GgmlType::Q4_K: {
      const __m512 levels = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
      for (std::ptrdiff_t c = 0; c < n; c += 256, p += 144) {
        for (int l = 0; l < 3; ++l) prefetch(p + pf + 64 * l);
        const __m512 dm = _mm512_castpd_ps(
            _mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(_mm256_set1_ps(half(p)))),
                               _mm256_castps_pd(_mm256_set1_ps(half(p + 2))), 1));
        alignas(64) float scale[16];
        _mm512_store_ps(
            scale, _mm512_mul_ps(dm, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(q4_k_scales(p + 4)))));
        for (int q = 0; q < 4; ++q) {
          const __m512 t_lo =
              _mm512_sub_round_ps(_mm512_mul_ps(levels, _mm512_set1_ps(scale[2 * q])),
                                  _mm512_set1_ps(scale[8 + 2 * q]), kRound);
          const __m512 t_hi =
              _mm512_sub_round_ps(_mm512_mul_ps(levels, _mm512_set1_ps(scale[2 * q + 1])),
                                  _mm512_set1_ps(scale[9 + 2 * q]), kRound);
          const __m512i a = _mm512_cvtepu8_epi32(bytes16(p + 16 + 32 * q));
          const __m512i b = _mm512_cvtepu8_epi32(bytes16(p + 32 + 32 * q));
          float* y = out + c + 64 * q;
          _mm512_storeu_ps(y, _mm512_permutexvar_ps(a, t_lo));
          _mm512_storeu_ps(y + 16, _mm512_permutexvar_ps(b, t_lo));
          _mm512_storeu_ps(y + 32, _mm512_permutexvar_ps(_mm512_srli_epi32(a, 4), t_hi));
          _mm512_storeu_ps(y + 48, _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), t_hi));
        }
      }
      break;
    }
    default: {  // Q6_K
      const __m256i m4 = _mm256_set1_epi8(0x0f), m2 = _mm256_set1_epi8(0x30),
                    m32 = _mm256_set1_epi8(32);
      for (std::ptrdiff_t c = 0; c < n; c += 256, p += 210) {
        for (int l = 0; l < 4; ++l) prefetch(p + pf + 64 * l);
        alignas(64) float scale[16];
        _mm512_store_ps(scale,
                        _mm512_mul_ps(_mm512_set1_ps(half(p + 208)),
                                      _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes16(p + 192)))));
        for (int h = 0; h < 2; ++h) {
          const auto* ql = reinterpret_cast<const __m256i*>(p + 64 * h);
          const __m256i l0 = _mm256_loadu_si256(ql), l1 = _mm256_loadu_si256(ql + 1);
          const __m256i hb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 128 + 32 * h));
          __m256i q[4];
          q[0] = _mm256_or_si256(_mm256_and_si256(l0, m4),
                                 _mm256_and_si256(_mm256_slli_epi16(hb, 4), m2));
          q[1] = _mm256_or_si256(_mm256_and_si256(l1, m4),
                                 _mm256_and_si256(_mm256_slli_epi16(hb, 2), m2));
          q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4),
                                 _mm256_and_si256(hb, m2));
          q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                                 _mm256_and_si256(_mm256_srli_epi16(hb, 2), m2));
          for (int k = 0; k < 4; ++k) {
            const __m256i v = _mm256_sub_epi8(q[k], m32);
            float* y = out + c + 128 * h + 32 * k;
            _mm512_storeu_ps(
                y,
                _mm512_mul_ps(_mm512_set1_ps(scale[8 * h + 2 * k]),
                              _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(v)))));
            _mm512_storeu_ps(y + 16, _mm512_mul_ps(_mm512_set1_ps(scale[8 * h + 2 * k + 1]),
                                                   _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                                                       _mm256_extracti128_si256(v, 1)))));
          }
        }
      }
      break;
    }
  }
}

/// out[r * NC + j] = row r of the R rows at `w` (row_bytes apart; `count` values from there) .
/// column j of x (count floats at x + j * ldx); pf: the byte offset of the block to prefetch.
template <int NC, int R>
inline void group(io::GgmlType type, const std::uint8_t* w, std::size_t row_bytes,
                  std::ptrdiff_t count, const float* x, std::ptrdiff_t ldx, std::ptrdiff_t pf,
                  float* out) {
  switch (type) {
    case io::GgmlType::Q8_0:
      q8_0<NC, R>(w, row_bytes, count, x, ldx, pf, out);
      break;
    case io::GgmlType::Q4_0:
      q4_0<NC, R>(w, row_bytes, count, x, ldx, pf, out);
      break;
    case io::GgmlType::Q4_K:
      q4_k<NC, R>(w, row_bytes, count, x, ldx, pf, out);
      break;
    default:  // Q6_K (has_kernel)
      q6_k<NC, R>(w, row_bytes, count, x, ldx, pf, out);
      break;
  }
}

/// Rows [i0, i1) of W (the blocks at `w`, row_bytes per row, kp values) times the NC columns of
/// x (kp floats each, one after another): store(i, acc) with acc[j] = row i . x_j. Two or more
/// columns go through x in tiles of at most 16 KiB (4096 / NC values, a multiple of 256), each
/// tile over every row, so that x is read from L1 (the whole of x, NC * kp * 4 bytes, soon
/// outgrows it); the partial sums wait in `partial` ((i1 - i0) * NC floats).
template <int NC, typename Store>
inline void rows(io::GgmlType type, const std::uint8_t* w, std::size_t row_bytes, std::ptrdiff_t kp,
                 const float* x, std::ptrdiff_t i0, std::ptrdiff_t i1, float* partial,
                 Store&& store) {
  constexpr int R = rows_per_group(NC);
  const io::GgmlTypeTraits& t = io::ggml_type_traits(type);
  const std::ptrdiff_t tile = NC == 1 ? kp : std::ptrdiff_t(4096 / NC / 256 * 256);
  float out[R * NC];
  if (tile >= kp) {  // one tile: straight to store, the next blocks of the row prefetched
    std::ptrdiff_t i = i0;
    for (; i + R <= i1; i += R) {
      group<NC, R>(type, w + std::size_t(i) * row_bytes, row_bytes, kp, x, kp, 512, out);
      for (int r = 0; r < R; ++r) store(i + r, out + r * NC);
    }
    for (; i < i1; ++i) {
      group<NC, 1>(type, w + std::size_t(i) * row_bytes, row_bytes, kp, x, kp, 512, out);
      store(i, out);
    }
    return;
  }
  for (std::ptrdiff_t c0 = 0; c0 < kp; c0 += tile) {
    const std::ptrdiff_t count = std::min(tile, kp - c0);
    const std::uint8_t* wc = w + std::size_t(c0 / t.block_size) * t.type_size;
    const auto add = [&](std::ptrdiff_t i, int rows) {
      float* p = partial + (i - i0) * NC;
      for (int e = 0; e < rows * NC; ++e) p[e] = c0 == 0 ? out[e] : p[e] + out[e];
    };
    // Prefetched: the same tile of the next rows.
    const std::ptrdiff_t ahead = std::ptrdiff_t(R * row_bytes);
    std::ptrdiff_t i = i0;
    for (; i + R <= i1; i += R) {
      group<NC, R>(type, wc + std::size_t(i) * row_bytes, row_bytes, count, x + c0, kp, ahead, out);
      add(i, R);
    }
    for (; i < i1; ++i) {
      group<NC, 1>(type, wc + std::size_t(i) * row_bytes, row_bytes, count, x + c0, kp,
                   std::ptrdiff_t(row_bytes), out);
      add(i, 1);
    }
  }
  for (std::ptrdiff_t i = i0; i < i1; ++i) store(i, partial + (i - i0) * NC);
}

#else

constexpr bool has_kernel(io::GgmlType) {
  return false;
}

#endif

}  // namespace lora::detail::ggml_decode
