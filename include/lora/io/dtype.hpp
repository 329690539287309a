// The element types of safetensors files and the conversions between them and float/double.
// bf16 and f16 are converted bit by bit (round to nearest, ties to even), so the results are the
// same on every platform and need no compiler support for half types.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

namespace lora::io {

enum class DType {
  BOOL,
  U8,
  I8,
  I16,
  U16,
  F16,
  BF16,
  I32,
  U32,
  F32,
  F64,
  I64,
  U64,
  F8_E4M3,
  F8_E5M2
};

/// A safetensors dtype with its name in the file header and its size.
struct DTypeInfo {
  DType dtype;       ///< the dtype
  const char* name;  ///< its name in a safetensors header ("F32", "BF16", ...)
  std::size_t size;  ///< bytes per element
};

inline constexpr DTypeInfo kDTypes[] = {
    {DType::BOOL, "BOOL", 1}, {DType::U8, "U8", 1},           {DType::I8, "I8", 1},
    {DType::I16, "I16", 2},   {DType::U16, "U16", 2},         {DType::F16, "F16", 2},
    {DType::BF16, "BF16", 2}, {DType::I32, "I32", 4},         {DType::U32, "U32", 4},
    {DType::F32, "F32", 4},   {DType::F64, "F64", 8},         {DType::I64, "I64", 8},
    {DType::U64, "U64", 8},   {DType::F8_E4M3, "F8_E4M3", 1}, {DType::F8_E5M2, "F8_E5M2", 1},
};

inline const DTypeInfo& dtype_info(DType t) {
  for (const auto& d : kDTypes)
    if (d.dtype == t) return d;
  throw std::invalid_argument("lora::io: unknown dtype");
}

inline std::size_t dtype_size(DType t) {
  return dtype_info(t).size;
}
inline const char* dtype_name(DType t) {
  return dtype_info(t).name;
}

/// The dtype named `name` in a safetensors header; throws for a name the format does not define.
inline DType parse_dtype(const std::string& name) {
  for (const auto& d : kDTypes)
    if (name == d.name) return d.dtype;
  throw std::invalid_argument("safetensors: unknown dtype \"" + name + "\"");
}

inline std::uint32_t float_bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float bits_float(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

/// bfloat16 (the upper half of an IEEE binary32) to float: exact.
inline float bf16_to_float(std::uint16_t h) {
  return bits_float(std::uint32_t(h) << 16);
}

/// float to bfloat16, round to nearest, ties to even; NaN stays a (quiet) NaN.
inline std::uint16_t float_to_bf16(float f) {
  std::uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((u >> 16) | 0x0040u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<std::uint16_t>(u >> 16);
}

/// IEEE binary16 to float: exact (subnormals and infinities included); a NaN keeps its sign and
/// payload and comes out quiet, as the x86 conversion (vcvtph2ps) and ggml give it.
inline float f16_to_float(std::uint16_t h) {
  const std::uint32_t sign = std::uint32_t(h & 0x8000u) << 16;
  const std::uint32_t exp = (h >> 10) & 0x1fu;
  const std::uint32_t mant = h & 0x3ffu;
  if (exp == 0) {  // zero or subnormal: mant * 2^-24
    const float v = std::ldexp(static_cast<float>(mant), -24);
    return sign ? -v : v;
  }
  if (exp == 31)  // inf, or NaN with the quiet bit set
    return bits_float(sign | 0x7f800000u | (mant << 13) | (mant ? 0x00400000u : 0u));
  return bits_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

/// float to IEEE binary16, round to nearest, ties to even; overflow gives infinity.
inline std::uint16_t float_to_f16(float f) {
  const std::uint32_t u = float_bits(f);
  const std::uint16_t sign = static_cast<std::uint16_t>((u >> 16) & 0x8000u);
  const std::uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return static_cast<std::uint16_t>(sign | 0x7e00u);   // NaN
  if (abs >= 0x477ff000u) return static_cast<std::uint16_t>(sign | 0x7c00u);  // >= 65520: inf
  if (abs < 0x38800000u) {  // below 2^-14: subnormal half (or zero); round |f| * 2^24 to even
    const float scaled = bits_float(abs) * 16777216.0f;  // exact: a power-of-two scale
    return static_cast<std::uint16_t>(sign | static_cast<std::uint16_t>(std::nearbyint(scaled)));
  }
  // Normal: rebias the exponent (127 -> 15) and round the 23-bit mantissa to 10 bits.
  std::uint32_t h = abs - 0x38000000u;  // (exp - 112) << 23
  h += 0xfffu + ((h >> 13) & 1u);
  return static_cast<std::uint16_t>(sign | (h >> 13));
}

/// double to float rounded to odd: truncate toward zero, then set the lowest mantissa bit when
/// anything was cut off. Rounding that float again to a format with at least two fewer mantissa
/// bits (bf16: 7, f16: 10, float: 23) gives the correctly rounded result of the double, with no
/// double-rounding error (Boldo & Melquiond, "When double rounding is odd", 2005).
inline float double_to_float_round_to_odd(double d) {
  float f = static_cast<float>(d);  // round to nearest even
  if (std::isnan(d) || static_cast<double>(f) == d) return f;
  if (std::isinf(f)) return f;  // beyond float's range: every narrower format overflows too
  // f is the nearest float; the truncated value is f, or its neighbour toward zero.
  if (std::fabs(static_cast<double>(f)) > std::fabs(d)) f = std::nextafter(f, 0.0f);
  return bits_float(float_bits(f) | 1u);
}

/// double to bfloat16, correctly rounded (nearest, ties to even).
inline std::uint16_t double_to_bf16(double d) {
  return float_to_bf16(double_to_float_round_to_odd(d));
}

/// double to IEEE binary16, correctly rounded (nearest, ties to even).
inline std::uint16_t double_to_f16(double d) {
  return float_to_f16(double_to_float_round_to_odd(d));
}

}  // namespace lora::io
