// The body of the ggml block fuzz target (fuzz/fuzz_ggml_blocks.cpp): lora's dequantizers
// (lora/io/ggml_quants.hpp) against llama.cpp's own, ggml's to_float from libggml-base, on any
// bytes. Needs ggml.h and libggml-base (lora_llama_cpp::ggml_base, scripts/fetch_llama_cpp).
//
// Input: the first byte picks the type (its value modulo the number of types lora dequantizes:
// f32, f16, bf16, q8_0, q4_0, q5_0, q4_K, q5_K, q6_K); the rest, cut to a whole number of blocks
// (at most kMaxGgmlBlocks), is the blocks, read as one row of n values.
//
// Contract under test:
//  - io::ggml::dequantize gives ggml's to_float bit for bit (memcmp of each float; ggml has no
//    to_float for f32, whose values are the bytes themselves), NaNs included: its first run
//    found that lora kept an f16 signalling NaN signalling where ggml (as the x86 conversion)
//    quiets it; io::f16_to_float now quiets it too.
//  - GgmlFrozenWeight on the same bytes (ne0 = n, ne1 = 1) either refuses them with
//    io::FormatError, and then ggml's values must hold a non-finite one (the refusal is right:
//    a non-finite scale, or value for f16/bf16/f32), or accepts them, and then its weight() is
//    ggml's values bit for bit, which must all be finite (GgmlFrozenWeight::all_finite() takes
//    finite scales to mean finite values).
// A mismatch prints the type, the first differing index and both values, then traps. Any
// exception other than io::FormatError escapes (a bug: the fuzzer reports it as a crash).
#pragma once

#include <lora/ggml_frozen_weight.hpp>
#include <lora/io/format_error.hpp>
#include <lora/io/ggml_quants.hpp>
#include <lora/io/ggml_types.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <utility>
#include <vector>

#include "ggml.h"

namespace lora::fuzz {

/// The types the first input byte chooses among (those io::ggml::can_dequantize accepts).
inline constexpr io::GgmlType kGgmlBlockTypes[] = {
    io::GgmlType::F32,  io::GgmlType::F16,  io::GgmlType::BF16,
    io::GgmlType::Q8_0, io::GgmlType::Q4_0, io::GgmlType::Q5_0,
    io::GgmlType::Q4_K, io::GgmlType::Q5_K, io::GgmlType::Q6_K};
inline constexpr std::size_t kGgmlBlockTypeCount =
    sizeof(kGgmlBlockTypes) / sizeof(kGgmlBlockTypes[0]);
/// The most blocks one input is cut to.
inline constexpr std::size_t kMaxGgmlBlocks = 64;

/// Bit for bit, NaNs included (an f16 signalling NaN comes out quiet in both, with its payload).
inline bool same_value(float ours, float theirs) {
  std::uint32_t a, b;
  std::memcpy(&a, &ours, 4);
  std::memcpy(&b, &theirs, 4);
  return a == b;
}

[[noreturn]] inline void ggml_blocks_mismatch(const char* what, io::GgmlType type, std::size_t i,
                                              float ours, float theirs) {
  std::uint32_t a, b;
  std::memcpy(&a, &ours, 4);
  std::memcpy(&b, &theirs, 4);
  std::fprintf(stderr,
               "fuzz_ggml_blocks: %s differs from ggml's to_float for %s at value %zu (block "
               "%zu): %.9g (0x%08x) against ggml's %.9g (0x%08x)\n",
               what, io::ggml_type_traits(type).name, i, i / io::ggml_type_traits(type).block_size,
               static_cast<double>(ours), a, static_cast<double>(theirs), b);
  __builtin_trap();
}

/// ggml's values of n values of `type` at `blocks` (f32: the bytes themselves).
inline std::vector<float> ggml_to_float(io::GgmlType type, const std::uint8_t* blocks,
                                        std::size_t n) {
  std::vector<float> out(n);
  const ggml_type_traits* t = ggml_get_type_traits(static_cast<ggml_type>(type));
  if (t->to_float != nullptr)
    t->to_float(blocks, out.data(), static_cast<std::int64_t>(n));
  else if (type == io::GgmlType::F32)
    std::memcpy(out.data(), blocks, n * sizeof(float));
  else
    __builtin_trap();  // ggml dequantizes every type lora does
  return out;
}

/// Runs one input through the checks at the top of this file; traps on a mismatch.
inline void exercise_ggml_blocks(const std::uint8_t* data, std::size_t size) {
  if (size < 1) return;
  const io::GgmlType type = kGgmlBlockTypes[data[0] % kGgmlBlockTypeCount];
  const io::GgmlTypeTraits& traits = io::ggml_type_traits(type);
  if (!io::ggml::can_dequantize(type)) __builtin_trap();
  const std::size_t blocks = std::min<std::size_t>((size - 1) / traits.type_size, kMaxGgmlBlocks);
  if (blocks == 0) return;
  const std::size_t n = blocks * traits.block_size;
  std::vector<std::uint8_t> bytes(data + 1, data + 1 + blocks * traits.type_size);

  const std::vector<float> theirs = ggml_to_float(type, bytes.data(), n);
  std::vector<float> ours(n);
  io::ggml::dequantize(type, bytes.data(), ours.data(), n);
  for (std::size_t i = 0; i < n; ++i)
    if (!same_value(ours[i], theirs[i]))
      ggml_blocks_mismatch("io::ggml::dequantize", type, i, ours[i], theirs[i]);

  const bool all_finite =
      std::all_of(theirs.begin(), theirs.end(), [](float v) { return std::isfinite(v); });
  try {
    const GgmlFrozenWeight w(std::move(bytes), type, static_cast<std::int64_t>(n), 1, "fuzz");
    if (!all_finite) {
      std::fprintf(stderr,
                   "fuzz_ggml_blocks: GgmlFrozenWeight accepted %zu %s values of which ggml "
                   "decodes one or more to a NaN or an infinity\n",
                   n, traits.name);
      __builtin_trap();
    }
    const GgmlFrozenWeight::Matrix W = w.weight();
    if (W.rows() != 1 || W.cols() != static_cast<Eigen::Index>(n)) __builtin_trap();
    for (std::size_t i = 0; i < n; ++i) {
      const float v = W(0, static_cast<Eigen::Index>(i));
      if (std::memcmp(&v, &theirs[i], sizeof(float)) != 0)
        ggml_blocks_mismatch("GgmlFrozenWeight::weight()", type, i, v, theirs[i]);
    }
  } catch (const io::FormatError& e) {
    if (all_finite) {
      std::fprintf(stderr,
                   "fuzz_ggml_blocks: GgmlFrozenWeight refused %zu %s values that ggml decodes "
                   "to finite ones: %s\n",
                   n, traits.name, e.what());
      __builtin_trap();
    }
  }
}

}  // namespace lora::fuzz
