// ggml's tensor types as GGUF files name them: the type numbers, block sizes and bytes per block of
// llama.cpp's ggml (ggml/include/ggml.h, the type_traits table of ggml/src/ggml.c), so that a
// reader can size and bounds-check any tensor of a file, also one whose type it cannot convert. The
// numbers are the file format's: they never change once released (removed types stay unused).
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <optional>

namespace lora::io {

/// A ggml tensor type (the `type` field of a GGUF tensor info). Only the values listed are valid;
/// 4, 5 and 31–33, 36–38 were removed from ggml and are refused in files, as llama.cpp does.
enum class GgmlType : std::uint32_t {
  F32 = 0,
  F16 = 1,
  Q4_0 = 2,
  Q4_1 = 3,
  Q5_0 = 6,
  Q5_1 = 7,
  Q8_0 = 8,
  Q8_1 = 9,
  Q2_K = 10,
  Q3_K = 11,
  Q4_K = 12,
  Q5_K = 13,
  Q6_K = 14,
  Q8_K = 15,
  IQ2_XXS = 16,
  IQ2_XS = 17,
  IQ3_XXS = 18,
  IQ1_S = 19,
  IQ4_NL = 20,
  IQ3_S = 21,
  IQ2_S = 22,
  IQ4_XS = 23,
  I8 = 24,
  I16 = 25,
  I32 = 26,
  I64 = 27,
  F64 = 28,
  IQ1_M = 29,
  BF16 = 30,
  TQ1_0 = 34,
  TQ2_0 = 35,
  MXFP4 = 39,
  NVFP4 = 40,
  Q1_0 = 41,
  Q2_0 = 42,
};

/// What ggml knows of a type: its name (as ggml_type_name prints it), the number of values in one
/// block, and the bytes of one block. A row of `ne0` values takes `ne0 / block_size` blocks.
struct GgmlTypeTraits {
  GgmlType type;             ///< the type
  const char* name;          ///< ggml's name ("f32", "q8_0", "q4_K", ...)
  std::uint32_t block_size;  ///< values per block (1 for the plain types)
  std::uint32_t type_size;   ///< bytes per block
};

namespace detail {
inline constexpr GgmlTypeTraits kGgmlTypes[] = {
    {GgmlType::F32, "f32", 1, 4},
    {GgmlType::F16, "f16", 1, 2},
    {GgmlType::Q4_0, "q4_0", 32, 18},
    {GgmlType::Q4_1, "q4_1", 32, 20},
    {GgmlType::Q5_0, "q5_0", 32, 22},
    {GgmlType::Q5_1, "q5_1", 32, 24},
    {GgmlType::Q8_0, "q8_0", 32, 34},
    {GgmlType::Q8_1, "q8_1", 32, 36},
    {GgmlType::Q2_K, "q2_K", 256, 84},
    {GgmlType::Q3_K, "q3_K", 256, 110},
    {GgmlType::Q4_K, "q4_K", 256, 144},
    {GgmlType::Q5_K, "q5_K", 256, 176},
    {GgmlType::Q6_K, "q6_K", 256, 210},
    {GgmlType::Q8_K, "q8_K", 256, 292},
    {GgmlType::IQ2_XXS, "iq2_xxs", 256, 66},
    {GgmlType::IQ2_XS, "iq2_xs", 256, 74},
    {GgmlType::IQ3_XXS, "iq3_xxs", 256, 98},
    {GgmlType::IQ1_S, "iq1_s", 256, 50},
    {GgmlType::IQ4_NL, "iq4_nl", 32, 18},
    {GgmlType::IQ3_S, "iq3_s", 256, 110},
    {GgmlType::IQ2_S, "iq2_s", 256, 82},
    {GgmlType::IQ4_XS, "iq4_xs", 256, 136},
    {GgmlType::I8, "i8", 1, 1},
    {GgmlType::I16, "i16", 1, 2},
    {GgmlType::I32, "i32", 1, 4},
    {GgmlType::I64, "i64", 1, 8},
    {GgmlType::F64, "f64", 1, 8},
    {GgmlType::IQ1_M, "iq1_m", 256, 56},
    {GgmlType::BF16, "bf16", 1, 2},
    {GgmlType::TQ1_0, "tq1_0", 256, 54},
    {GgmlType::TQ2_0, "tq2_0", 256, 66},
    {GgmlType::MXFP4, "mxfp4", 32, 17},
    {GgmlType::NVFP4, "nvfp4", 64, 36},
    {GgmlType::Q1_0, "q1_0", 128, 18},
    {GgmlType::Q2_0, "q2_0", 64, 18},
};
}  // namespace detail

/// The traits of the type numbered `value` in a file, or nullptr when ggml has no such type.
inline const GgmlTypeTraits* ggml_type_traits(std::uint32_t value) {
  for (const auto& t : detail::kGgmlTypes)
    if (static_cast<std::uint32_t>(t.type) == value) return &t;
  return nullptr;
}

/// The traits of a type (every enumerator has them).
inline const GgmlTypeTraits& ggml_type_traits(GgmlType type) {
  return *ggml_type_traits(static_cast<std::uint32_t>(type));
}

/// ggml's name of a type ("q4_K"), or "unknown" for a number ggml does not know.
inline const char* ggml_type_name(std::uint32_t value) {
  const GgmlTypeTraits* t = ggml_type_traits(value);
  return t ? t->name : "unknown";
}

/// The bytes of a row of `ne0` values of `type`, or nothing when `ne0` is negative, not a whole
/// number of blocks, or the byte count does not fit in std::size_t.
inline std::optional<std::size_t> ggml_row_bytes(GgmlType type, std::int64_t ne0) {
  const GgmlTypeTraits& t = ggml_type_traits(type);
  if (ne0 < 0 || ne0 % t.block_size != 0) return std::nullopt;
  const auto blocks = static_cast<std::uint64_t>(ne0 / t.block_size);
  if (blocks > std::numeric_limits<std::size_t>::max() / t.type_size) return std::nullopt;
  return static_cast<std::size_t>(blocks * t.type_size);
}

}  // namespace lora::io
