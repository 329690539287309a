// ggml's block-quantized tensor formats, block by block, exactly as llama.cpp's reference code
// (ggml/src/ggml-common.h for the layouts, ggml/src/ggml-quants.c for dequantize_row_* and
// quantize_row_*_ref): lora's results are ggml's bit for bit (tests/test_llama_cpp_reference.cpp
// checks that against llama.cpp's own library).
//
// Q8_0: 32 values per 34-byte block: an fp16 scale d, then 32 int8 q; value = q * d.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "lora/io/dtype.hpp"

namespace lora::io::ggml {

inline constexpr std::size_t kQ8_0BlockValues = 32;  ///< values in one Q8_0 block
inline constexpr std::size_t kQ8_0BlockBytes = 34;   ///< bytes of one Q8_0 block

/// Dequantizes `n` values (a multiple of 32) from Q8_0 blocks at `blocks` into `out`.
inline void dequantize_q8_0(const std::uint8_t* blocks, float* out, std::size_t n) {
  for (std::size_t b = 0; b < n / kQ8_0BlockValues; ++b) {
    const std::uint8_t* block = blocks + b * kQ8_0BlockBytes;
    std::uint16_t d_bits;
    std::memcpy(&d_bits, block, 2);  // little-endian, as the file
    const float d = f16_to_float(d_bits);
    const auto* q = reinterpret_cast<const std::int8_t*>(block + 2);
    for (std::size_t j = 0; j < kQ8_0BlockValues; ++j)
      out[b * kQ8_0BlockValues + j] = static_cast<float>(q[j]) * d;
  }
}

/// Quantizes `n` values (a multiple of 32) into Q8_0 blocks at `blocks` (n / 32 * 34 bytes), as
/// ggml's quantize_row_q8_0_ref: d = absmax / 127 (stored as fp16), q = round(x / d) computed as
/// roundf(x * (1 / d)) in float, halves away from zero.
inline void quantize_q8_0(const float* x, std::uint8_t* blocks, std::size_t n) {
  for (std::size_t b = 0; b < n / kQ8_0BlockValues; ++b) {
    const float* v = x + b * kQ8_0BlockValues;
    float amax = 0.0f;
    for (std::size_t j = 0; j < kQ8_0BlockValues; ++j) amax = std::fmax(amax, std::fabs(v[j]));
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    std::uint8_t* block = blocks + b * kQ8_0BlockBytes;
    const std::uint16_t d_bits = float_to_f16(d);
    std::memcpy(block, &d_bits, 2);
    for (std::size_t j = 0; j < kQ8_0BlockValues; ++j) {
      const auto q = static_cast<std::int8_t>(std::round(v[j] * id));
      std::memcpy(block + 2 + j, &q, 1);
    }
  }
}

}  // namespace lora::io::ggml
