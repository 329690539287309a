// ggml's block-quantized tensor formats, block by block, exactly as llama.cpp's reference code
// (ggml/src/ggml-common.h for the layouts, ggml/src/ggml-quants.c for dequantize_row_* and
// quantize_row_*_ref): lora's results are ggml's bit for bit (tests/test_llama_cpp_reference.cpp
// checks that against llama.cpp's own library, on random and on adversarial blocks).
//
// The layouts (all little-endian, fp16 = IEEE binary16):
//   Q8_0  32 values, 34 bytes:  fp16 d, int8 q[32];                value = q * d
//   Q4_0  32 values, 18 bytes:  fp16 d, u8 qs[16];                 value = (q - 8) * d, element j
//         (j < 16) in the low nibble of qs[j], element 16 + j in its high nibble
//   Q5_0  32 values, 22 bytes:  fp16 d, u32 qh, u8 qs[16];         value = (q - 16) * d, q's fifth
//         bit of element j in bit j of qh
//   Q4_K  256 values, 144 bytes: fp16 d, fp16 dmin, u8 scales[12] (6-bit scale sc and min m of
//         each sub-block of 32, packed as get_scale_min_k4), u8 qs[128]; value = d*sc*q - dmin*m;
//         each 64 values: the 32 low nibbles of 32 bytes, then their 32 high nibbles
//   Q5_K  256 values, 176 bytes: as Q4_K with u8 qh[32] (the fifth bits) before qs
//   Q6_K  256 values, 210 bytes: u8 ql[128], u8 qh[64], int8 scales[16], fp16 d;
//         value = d * scales[sub-block of 16] * (q - 32), q 6 bits from ql (4) and qh (2)
//
// Bit-exactness needs the same float operations in the same order, and no fused multiply-add
// where ggml's reference has none: GCC contracts a*b - c into an FMA across statements by
// default (gnu++ modes, -march with FMA), Clang within an expression, so this file turns
// contraction off for its own functions (GCC: an optimize pragma around them; Clang: a pragma at
// the top of each function).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "lora/io/dtype.hpp"
#include "lora/io/ggml_types.hpp"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#endif
#if defined(__clang__)
#define LORA_GGML_NO_CONTRACT _Pragma("clang fp contract(off)")
#else
#define LORA_GGML_NO_CONTRACT
#endif

namespace lora::io::ggml {

inline constexpr std::size_t kQ8_0BlockValues = 32;  ///< values in one Q8_0 block
inline constexpr std::size_t kQ8_0BlockBytes = 34;   ///< bytes of one Q8_0 block
inline constexpr std::size_t kQK = 256;              ///< values in one k-quant super-block

namespace detail {

inline float half(const std::uint8_t* p) {
  std::uint16_t bits;
  std::memcpy(&bits, p, 2);  // little-endian, as the file
  return f16_to_float(bits);
}
inline void put_half(std::uint8_t* p, float v) {
  const std::uint16_t bits = float_to_f16(v);
  std::memcpy(p, &bits, 2);
}

/// ggml's nearest_int: round to nearest (ties to even) through the float 1.5 * 2^23, valid for
/// |v| <= 4194303.
inline int nearest_int(float fval) {
  LORA_GGML_NO_CONTRACT
  const float val = fval + 12582912.f;
  std::int32_t i;
  std::memcpy(&i, &val, sizeof i);
  return (i & 0x007fffff) - 0x00400000;
}

/// The 6-bit scale and min of sub-block j of a Q4_K / Q5_K super-block (ggml's get_scale_min_k4).
inline void scale_min_k4(int j, const std::uint8_t* q, std::uint8_t& d, std::uint8_t& m) {
  if (j < 4) {
    d = q[j] & 63;
    m = q[j + 4] & 63;
  } else {
    d = static_cast<std::uint8_t>((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
    m = static_cast<std::uint8_t>((q[j + 4] >> 4) | ((q[j - 0] >> 6) << 4));
  }
}

constexpr float kGroupMaxEps = 1e-15f;  // ggml's GROUP_MAX_EPS

/// ggml's make_qx_quants with rmse_type 1 and no importance weights (what quantize_row_q6_K_ref
/// calls): a signed scale for n values on the levels -nmax .. nmax-1, L = level + nmax.
inline float make_qx_quants(int n, int nmax, const float* x, std::int8_t* L) {
  LORA_GGML_NO_CONTRACT
  float max = 0, amax = 0;
  for (int i = 0; i < n; ++i) {
    const float ax = std::fabs(x[i]);
    if (ax > amax) {
      amax = ax;
      max = x[i];
    }
  }
  if (amax < kGroupMaxEps) {
    for (int i = 0; i < n; ++i) L[i] = 0;
    return 0.f;
  }
  float iscale = -static_cast<float>(nmax) / max;
  float sumlx = 0, suml2 = 0;
  for (int i = 0; i < n; ++i) {
    int l = nearest_int(iscale * x[i]);
    l = std::max(-nmax, std::min(nmax - 1, l));
    L[i] = static_cast<std::int8_t>(l + nmax);
    const float w = x[i] * x[i];
    sumlx += w * x[i] * static_cast<float>(l);
    suml2 += w * static_cast<float>(l) * static_cast<float>(l);
  }
  float scale = suml2 != 0.0f ? sumlx / suml2 : 0.0f;
  float best = scale * sumlx;
  for (int is = -9; is <= 9; ++is) {
    if (is == 0) continue;
    iscale = -(static_cast<float>(nmax) + 0.1f * static_cast<float>(is)) / max;
    sumlx = suml2 = 0;
    for (int i = 0; i < n; ++i) {
      int l = nearest_int(iscale * x[i]);
      l = std::max(-nmax, std::min(nmax - 1, l));
      const float w = x[i] * x[i];
      sumlx += w * x[i] * static_cast<float>(l);
      suml2 += w * static_cast<float>(l) * static_cast<float>(l);
    }
    if (suml2 > 0 && sumlx * sumlx > best * suml2) {
      for (int i = 0; i < n; ++i) {
        const int l = nearest_int(iscale * x[i]);
        L[i] = static_cast<std::int8_t>(nmax + std::max(-nmax, std::min(nmax - 1, l)));
      }
      scale = sumlx / suml2;
      best = scale * sumlx;
    }
  }
  return scale;
}

/// ggml's make_qkx2_quants (what quantize_row_q4_K_ref calls): an unsigned scale and a min for n
/// values on the levels 0 .. nmax, searched over nstep + 1 candidate scales.
inline float make_qkx2_quants(int n, int nmax, const float* x, const float* weights,
                              std::uint8_t* L, float* the_min, std::uint8_t* Laux, float rmin,
                              float rdelta, int nstep) {
  LORA_GGML_NO_CONTRACT
  float min = x[0], max = x[0];
  float sum_w = weights[0];
  float sum_x = sum_w * x[0];
  for (int i = 1; i < n; ++i) {
    if (x[i] < min) min = x[i];
    if (x[i] > max) max = x[i];
    const float w = weights[i];
    sum_w += w;
    sum_x += w * x[i];
  }
  if (min > 0) min = 0;
  if (max == min) {
    for (int i = 0; i < n; ++i) L[i] = 0;
    *the_min = -min;
    return 0.f;
  }
  float iscale = static_cast<float>(nmax) / (max - min);
  float scale = 1 / iscale;
  float best_error = 0;
  for (int i = 0; i < n; ++i) {
    const int l = nearest_int(iscale * (x[i] - min));
    L[i] = static_cast<std::uint8_t>(std::max(0, std::min(nmax, l)));
    float diff = scale * static_cast<float>(L[i]) + min - x[i];
    diff = diff * diff;
    best_error += weights[i] * diff;
  }
  for (int is = 0; is <= nstep; ++is) {
    iscale = (rmin + rdelta * static_cast<float>(is) + static_cast<float>(nmax)) / (max - min);
    float sum_l = 0, sum_l2 = 0, sum_xl = 0;
    for (int i = 0; i < n; ++i) {
      int l = nearest_int(iscale * (x[i] - min));
      l = std::max(0, std::min(nmax, l));
      Laux[i] = static_cast<std::uint8_t>(l);
      const float w = weights[i];
      const float fl = static_cast<float>(l);
      sum_l += w * fl;
      sum_l2 += w * fl * fl;
      sum_xl += w * fl * x[i];
    }
    const float D = sum_w * sum_l2 - sum_l * sum_l;
    if (D > 0) {
      float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
      float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
      if (this_min > 0) {
        this_min = 0;
        this_scale = sum_xl / sum_l2;
      }
      float cur_error = 0;
      for (int i = 0; i < n; ++i) {
        float diff = this_scale * static_cast<float>(Laux[i]) + this_min - x[i];
        diff = diff * diff;
        cur_error += weights[i] * diff;
      }
      if (cur_error < best_error) {
        for (int i = 0; i < n; ++i) L[i] = Laux[i];
        best_error = cur_error;
        scale = this_scale;
        min = this_min;
      }
    }
  }
  *the_min = -min;
  return scale;
}

}  // namespace detail

// ---- dequantizers (ggml's dequantize_row_*) -----------------------------------------------------
// Each turns n values (a whole number of blocks) from the blocks at `blocks` into `out`.

/// Q8_0: value = q * d.
inline void dequantize_q8_0(const std::uint8_t* blocks, float* out, std::size_t n) {
  LORA_GGML_NO_CONTRACT
  for (std::size_t b = 0; b < n / 32; ++b) {
    const std::uint8_t* block = blocks + b * 34;
    const float d = detail::half(block);
    const auto* q = reinterpret_cast<const std::int8_t*>(block + 2);
    for (std::size_t j = 0; j < 32; ++j) out[b * 32 + j] = static_cast<float>(q[j]) * d;
  }
}

/// Q4_0: value = (q - 8) * d; element j in the low nibble of byte j, element 16 + j in its high.
inline void dequantize_q4_0(const std::uint8_t* blocks, float* out, std::size_t n) {
  LORA_GGML_NO_CONTRACT
  for (std::size_t b = 0; b < n / 32; ++b) {
    const std::uint8_t* block = blocks + b * 18;
    const float d = detail::half(block);
    const std::uint8_t* qs = block + 2;
    float* y = out + b * 32;
    for (int j = 0; j < 16; ++j) {
      y[j] = static_cast<float>((qs[j] & 0x0F) - 8) * d;
      y[j + 16] = static_cast<float>((qs[j] >> 4) - 8) * d;
    }
  }
}

/// Q5_0: value = (q - 16) * d, the fifth bit of element j in bit j of qh.
inline void dequantize_q5_0(const std::uint8_t* blocks, float* out, std::size_t n) {
  LORA_GGML_NO_CONTRACT
  for (std::size_t b = 0; b < n / 32; ++b) {
    const std::uint8_t* block = blocks + b * 22;
    const float d = detail::half(block);
    std::uint32_t qh;
    std::memcpy(&qh, block + 2, 4);
    const std::uint8_t* qs = block + 6;
    float* y = out + b * 32;
    for (int j = 0; j < 16; ++j) {
      const int h0 = static_cast<int>(((qh >> (j + 0)) << 4) & 0x10);
      const int h1 = static_cast<int>((qh >> (j + 12)) & 0x10);
      y[j] = static_cast<float>(((qs[j] & 0x0F) | h0) - 16) * d;
      y[j + 16] = static_cast<float>(((qs[j] >> 4) | h1) - 16) * d;
    }
  }
}

/// Q4_K: value = d * sc * q - dmin * m per sub-block of 32 (sc, m: 6-bit, get_scale_min_k4).
inline void dequantize_q4_k(const std::uint8_t* blocks, float* out, std::size_t n) {
  LORA_GGML_NO_CONTRACT
  for (std::size_t b = 0; b < n / kQK; ++b) {
    const std::uint8_t* block = blocks + b * 144;
    const float d = detail::half(block), min = detail::half(block + 2);
    const std::uint8_t* scales = block + 4;
    const std::uint8_t* q = block + 16;
    float* y = out + b * kQK;
    std::uint8_t sc, m;
    for (int j = 0, is = 0; j < 256; j += 64, is += 2, q += 32) {
      detail::scale_min_k4(is + 0, scales, sc, m);
      const float d1 = d * static_cast<float>(sc), m1 = min * static_cast<float>(m);
      detail::scale_min_k4(is + 1, scales, sc, m);
      const float d2 = d * static_cast<float>(sc), m2 = min * static_cast<float>(m);
      for (int l = 0; l < 32; ++l) *y++ = d1 * static_cast<float>(q[l] & 0xF) - m1;
      for (int l = 0; l < 32; ++l) *y++ = d2 * static_cast<float>(q[l] >> 4) - m2;
    }
  }
}

/// Q5_K: as Q4_K with a fifth bit per value from qh.
inline void dequantize_q5_k(const std::uint8_t* blocks, float* out, std::size_t n) {
  LORA_GGML_NO_CONTRACT
  for (std::size_t b = 0; b < n / kQK; ++b) {
    const std::uint8_t* block = blocks + b * 176;
    const float d = detail::half(block), min = detail::half(block + 2);
    const std::uint8_t* scales = block + 4;
    const std::uint8_t* qh = block + 16;
    const std::uint8_t* ql = block + 48;
    float* y = out + b * kQK;
    std::uint8_t sc, m;
    unsigned u1 = 1, u2 = 2;
    for (int j = 0, is = 0; j < 256; j += 64, is += 2, ql += 32, u1 <<= 2, u2 <<= 2) {
      detail::scale_min_k4(is + 0, scales, sc, m);
      const float d1 = d * static_cast<float>(sc), m1 = min * static_cast<float>(m);
      detail::scale_min_k4(is + 1, scales, sc, m);
      const float d2 = d * static_cast<float>(sc), m2 = min * static_cast<float>(m);
      for (int l = 0; l < 32; ++l)
        *y++ = d1 * static_cast<float>((ql[l] & 0xF) + (qh[l] & u1 ? 16 : 0)) - m1;
      for (int l = 0; l < 32; ++l)
        *y++ = d2 * static_cast<float>((ql[l] >> 4) + (qh[l] & u2 ? 16 : 0)) - m2;
    }
  }
}

/// Q6_K: value = d * scale * (q - 32), scale int8 per sub-block of 16, q 6 bits.
inline void dequantize_q6_k(const std::uint8_t* blocks, float* out, std::size_t n) {
  LORA_GGML_NO_CONTRACT
  for (std::size_t b = 0; b < n / kQK; ++b) {
    const std::uint8_t* block = blocks + b * 210;
    const std::uint8_t* ql = block;
    const std::uint8_t* qh = block + 128;
    const auto* sc = reinterpret_cast<const std::int8_t*>(block + 192);
    const float d = detail::half(block + 208);
    float* y = out + b * kQK;
    for (int n128 = 0; n128 < 256; n128 += 128, y += 128, ql += 64, qh += 32, sc += 8) {
      for (int l = 0; l < 32; ++l) {
        const int is = l / 16;
        const int q1 = ((ql[l + 0] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
        const int q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
        const int q3 = ((ql[l + 0] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
        const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
        y[l + 0] = d * static_cast<float>(sc[is + 0]) * static_cast<float>(q1);
        y[l + 32] = d * static_cast<float>(sc[is + 2]) * static_cast<float>(q2);
        y[l + 64] = d * static_cast<float>(sc[is + 4]) * static_cast<float>(q3);
        y[l + 96] = d * static_cast<float>(sc[is + 6]) * static_cast<float>(q4);
      }
    }
  }
}

// ---- quantizers (ggml's quantize_row_*_ref, what llama-quantize runs without an imatrix) ------
// Each turns n values (a whole number of blocks, finite) into blocks at `blocks`.

/// Quantizes into Q8_0 as quantize_row_q8_0_ref: d = absmax / 127 (stored as fp16), q =
/// round(x / d) computed as roundf(x * (1 / d)) in float, halves away from zero.
inline void quantize_q8_0(const float* x, std::uint8_t* blocks, std::size_t n) {
  LORA_GGML_NO_CONTRACT
  for (std::size_t b = 0; b < n / 32; ++b) {
    const float* v = x + b * 32;
    float amax = 0.0f;
    for (std::size_t j = 0; j < 32; ++j) amax = std::fmax(amax, std::fabs(v[j]));
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    std::uint8_t* block = blocks + b * 34;
    detail::put_half(block, d);
    for (std::size_t j = 0; j < 32; ++j) {
      const auto q = static_cast<std::int8_t>(std::round(v[j] * id));
      std::memcpy(block + 2 + j, &q, 1);
    }
  }
}

/// Quantizes into Q4_0 as quantize_row_q4_0_ref: d = (the value of largest magnitude) / -8,
/// q = min(15, trunc(x / d + 8.5)).
inline void quantize_q4_0(const float* x, std::uint8_t* blocks, std::size_t n) {
  LORA_GGML_NO_CONTRACT
  for (std::size_t b = 0; b < n / 32; ++b) {
    const float* v = x + b * 32;
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < 32; ++j)
      if (amax < std::fabs(v[j])) {
        amax = std::fabs(v[j]);
        max = v[j];
      }
    const float d = max / -8;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    std::uint8_t* block = blocks + b * 18;
    detail::put_half(block, d);
    for (int j = 0; j < 16; ++j) {
      const float x0 = v[j] * id, x1 = v[16 + j] * id;
      const auto q0 =
          static_cast<std::uint8_t>(std::min(15, int(static_cast<std::int8_t>(x0 + 8.5f))));
      const auto q1 =
          static_cast<std::uint8_t>(std::min(15, int(static_cast<std::int8_t>(x1 + 8.5f))));
      block[2 + j] = static_cast<std::uint8_t>(q0 | (q1 << 4));
    }
  }
}

/// Quantizes into Q4_K as quantize_row_q4_K_ref: per sub-block of 32 a scale and a min searched
/// by make_qkx2_quants (weights av_x + |x|), both quantized to 6 bits against the super-block's
/// largest (d, dmin in fp16), then each value re-rounded to its level with the stored scales.
inline void quantize_q4_k(const float* x, std::uint8_t* blocks, std::size_t n) {
  LORA_GGML_NO_CONTRACT
  std::uint8_t L[kQK], Laux[32];
  float weights[32], mins[8], scales[8];
  for (std::size_t b = 0; b < n / kQK; ++b, x += kQK) {
    std::uint8_t* block = blocks + b * 144;
    std::uint8_t* sc_bytes = block + 4;
    std::memset(block, 0, 144);
    float max_scale = 0, max_min = 0;
    for (int j = 0; j < 8; ++j) {
      float sum_x2 = 0;
      for (int l = 0; l < 32; ++l) sum_x2 += x[32 * j + l] * x[32 * j + l];
      const float av_x = std::sqrt(sum_x2 / 32);
      for (int l = 0; l < 32; ++l) weights[l] = av_x + std::fabs(x[32 * j + l]);
      scales[j] = detail::make_qkx2_quants(32, 15, x + 32 * j, weights, L + 32 * j, &mins[j], Laux,
                                           -1.f, 0.1f, 20);
      if (scales[j] > max_scale) max_scale = scales[j];
      if (mins[j] > max_min) max_min = mins[j];
    }
    const float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
    const float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
    for (int j = 0; j < 8; ++j) {
      auto ls = static_cast<std::uint8_t>(detail::nearest_int(inv_scale * scales[j]));
      auto lm = static_cast<std::uint8_t>(detail::nearest_int(inv_min * mins[j]));
      ls = std::min<std::uint8_t>(63, ls);
      lm = std::min<std::uint8_t>(63, lm);
      if (j < 4) {
        sc_bytes[j] = ls;
        sc_bytes[j + 4] = lm;
      } else {
        sc_bytes[j + 4] = static_cast<std::uint8_t>((ls & 0xF) | ((lm & 0xF) << 4));
        sc_bytes[j - 4] |= static_cast<std::uint8_t>((ls >> 4) << 6);
        sc_bytes[j - 0] |= static_cast<std::uint8_t>((lm >> 4) << 6);
      }
    }
    detail::put_half(block, max_scale / 63.f);
    detail::put_half(block + 2, max_min / 63.f);
    const float d_all = detail::half(block), dmin_all = detail::half(block + 2);
    std::uint8_t sc, m;
    for (int j = 0; j < 8; ++j) {
      detail::scale_min_k4(j, sc_bytes, sc, m);
      const float d = d_all * static_cast<float>(sc);
      if (d == 0.0f) continue;
      const float dm = dmin_all * static_cast<float>(m);
      for (int ii = 0; ii < 32; ++ii) {
        const int l = detail::nearest_int((x[32 * j + ii] + dm) / d);
        L[32 * j + ii] = static_cast<std::uint8_t>(std::max(0, std::min(15, l)));
      }
    }
    std::uint8_t* q = block + 16;
    for (int j = 0; j < 256; j += 64, q += 32)
      for (int l = 0; l < 32; ++l)
        q[l] = static_cast<std::uint8_t>(L[j + l] | (L[j + l + 32] << 4));
  }
}

/// Quantizes into Q6_K as quantize_row_q6_K_ref: per sub-block of 16 a signed scale from
/// make_qx_quants, the scales quantized to int8 against the largest (d in fp16), then each value
/// re-rounded to its level with the stored scale.
inline void quantize_q6_k(const float* x, std::uint8_t* blocks, std::size_t n) {
  LORA_GGML_NO_CONTRACT
  std::int8_t L[kQK];
  float scales[16];
  for (std::size_t b = 0; b < n / kQK; ++b, x += kQK) {
    std::uint8_t* block = blocks + b * 210;
    std::memset(block, 0, 210);
    float max_scale = 0, max_abs_scale = 0;
    for (int ib = 0; ib < 16; ++ib) {
      const float scale = detail::make_qx_quants(16, 32, x + 16 * ib, L + 16 * ib);
      scales[ib] = scale;
      const float abs_scale = std::fabs(scale);
      if (abs_scale > max_abs_scale) {
        max_abs_scale = abs_scale;
        max_scale = scale;
      }
    }
    if (max_abs_scale < detail::kGroupMaxEps) continue;  // all zero, d = +0
    auto* sc = reinterpret_cast<std::int8_t*>(block + 192);
    const float iscale = -128.f / max_scale;
    detail::put_half(block + 208, 1 / iscale);
    for (int ib = 0; ib < 16; ++ib)
      sc[ib] = static_cast<std::int8_t>(std::min(127, detail::nearest_int(iscale * scales[ib])));
    const float d_all = detail::half(block + 208);
    for (int j = 0; j < 16; ++j) {
      const float d = d_all * static_cast<float>(sc[j]);
      if (d == 0.0f) continue;
      for (int ii = 0; ii < 16; ++ii) {
        int l = detail::nearest_int(x[16 * j + ii] / d);
        l = std::max(-32, std::min(31, l));
        L[16 * j + ii] = static_cast<std::int8_t>(l + 32);
      }
    }
    std::uint8_t* ql = block;
    std::uint8_t* qh = block + 128;
    for (int j = 0; j < 256; j += 128, ql += 64, qh += 32) {
      for (int l = 0; l < 32; ++l) {
        const auto Lq = [&](int i) { return static_cast<std::uint8_t>(L[j + l + i]); };
        ql[l + 0] = static_cast<std::uint8_t>((Lq(0) & 0xF) | ((Lq(64) & 0xF) << 4));
        ql[l + 32] = static_cast<std::uint8_t>((Lq(32) & 0xF) | ((Lq(96) & 0xF) << 4));
        qh[l] = static_cast<std::uint8_t>((Lq(0) >> 4) | ((Lq(32) >> 4) << 2) |
                                          ((Lq(64) >> 4) << 4) | ((Lq(96) >> 4) << 6));
      }
    }
  }
}

// ---- by type --------------------------------------------------------------------------------

/// True when lora dequantizes `type` (F32, F16, BF16, Q8_0, Q4_0, Q5_0, Q4_K, Q5_K, Q6_K).
inline bool can_dequantize(GgmlType type) {
  switch (type) {
    case GgmlType::F32:
    case GgmlType::F16:
    case GgmlType::BF16:
    case GgmlType::Q8_0:
    case GgmlType::Q4_0:
    case GgmlType::Q5_0:
    case GgmlType::Q4_K:
    case GgmlType::Q5_K:
    case GgmlType::Q6_K:
      return true;
    default:
      return false;
  }
}

/// True when lora quantizes into `type` as llama.cpp does (F32, F16, BF16, Q8_0, Q4_0, Q4_K,
/// Q6_K).
inline bool can_quantize(GgmlType type) {
  switch (type) {
    case GgmlType::F32:
    case GgmlType::F16:
    case GgmlType::BF16:
    case GgmlType::Q8_0:
    case GgmlType::Q4_0:
    case GgmlType::Q4_K:
    case GgmlType::Q6_K:
      return true;
    default:
      return false;
  }
}

/// Dequantizes n values of `type` (a whole number of blocks; can_dequantize(type)) into out.
inline void dequantize(GgmlType type, const std::uint8_t* data, float* out, std::size_t n) {
  switch (type) {
    case GgmlType::F32:
      std::memcpy(out, data, n * sizeof(float));
      return;
    case GgmlType::F16:
      for (std::size_t i = 0; i < n; ++i) out[i] = detail::half(data + 2 * i);
      return;
    case GgmlType::BF16:
      for (std::size_t i = 0; i < n; ++i) {
        std::uint16_t bits;
        std::memcpy(&bits, data + 2 * i, 2);
        out[i] = bf16_to_float(bits);
      }
      return;
    case GgmlType::Q8_0:
      return dequantize_q8_0(data, out, n);
    case GgmlType::Q4_0:
      return dequantize_q4_0(data, out, n);
    case GgmlType::Q5_0:
      return dequantize_q5_0(data, out, n);
    case GgmlType::Q4_K:
      return dequantize_q4_k(data, out, n);
    case GgmlType::Q5_K:
      return dequantize_q5_k(data, out, n);
    case GgmlType::Q6_K:
      return dequantize_q6_k(data, out, n);
    default:
      return;
  }
}

/// Quantizes n finite values (a whole number of blocks; can_quantize(type)) into `type`, as
/// ggml_quantize_chunk does without an importance matrix (F16 and BF16: nearest, ties to even).
inline void quantize(GgmlType type, const float* x, std::uint8_t* data, std::size_t n) {
  switch (type) {
    case GgmlType::F32:
      std::memcpy(data, x, n * sizeof(float));
      return;
    case GgmlType::F16:
      for (std::size_t i = 0; i < n; ++i) detail::put_half(data + 2 * i, x[i]);
      return;
    case GgmlType::BF16:
      for (std::size_t i = 0; i < n; ++i) {
        const std::uint16_t bits = float_to_bf16(x[i]);
        std::memcpy(data + 2 * i, &bits, 2);
      }
      return;
    case GgmlType::Q8_0:
      return quantize_q8_0(x, data, n);
    case GgmlType::Q4_0:
      return quantize_q4_0(x, data, n);
    case GgmlType::Q4_K:
      return quantize_q4_k(x, data, n);
    case GgmlType::Q6_K:
      return quantize_q6_k(x, data, n);
    default:
      return;
  }
}

}  // namespace lora::io::ggml

#undef LORA_GGML_NO_CONTRACT
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif
