// The reference the GGUF tests compare with is llama.cpp's own prebuilt CPU build (fetched by
// scripts/fetch_llama_cpp): this checks that it loads here and runs ggml's own quantizer and
// dequantizer, so a broken fetch fails one clear test first.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "ggml-backend.h"
#include "ggml.h"
#include "ggml_blocks_harness.hpp"  // fuzz/: the fuzz_ggml_blocks target's checks
#include "llama.h"
#include "lora/io/ggml_quants.hpp"
#include "lora/io/ggml_types.hpp"

namespace test_llama_cpp_reference {

TEST(LlamaCppReference, LoadsTheCpuBackEnd) {
  ggml_backend_load_all_from_path(LORA_LLAMA_CPP_LIB_DIR);
  llama_backend_init();
  EXPECT_GE(ggml_backend_dev_count(), 1u);
  EXPECT_NE(ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU), nullptr);
  llama_backend_free();
}

TEST(LlamaCppReference, Q8_0RoundTripThroughGgml) {
  // 32 values quantized by ggml's own Q8_0 quantizer, then dequantized by its own to_float.
  std::vector<float> x(32);
  for (int i = 0; i < 32; ++i) x[i] = std::sin(0.3f * static_cast<float>(i));
  std::vector<std::uint8_t> blocks(ggml_row_size(GGML_TYPE_Q8_0, 32));
  ASSERT_EQ(blocks.size(), 34u);
  ggml_quantize_chunk(GGML_TYPE_Q8_0, x.data(), blocks.data(), 0, 1, 32, nullptr);
  std::vector<float> y(32);
  ggml_get_type_traits(GGML_TYPE_Q8_0)->to_float(blocks.data(), y.data(), 32);
  for (int i = 0; i < 32; ++i) EXPECT_NEAR(y[i], x[i], 1.0f / 127.0f) << i;
}

TEST(LlamaCppReference, GgmlTypeTableIsGgmls) {
  // lora's table of block sizes and bytes per block against ggml's own, for every type number.
  for (int value = 0; value < GGML_TYPE_COUNT; ++value) {
    const ggml_type_traits* theirs = ggml_get_type_traits(static_cast<ggml_type>(value));
    const lora::io::GgmlTypeTraits* ours =
        lora::io::ggml_type_traits(static_cast<std::uint32_t>(value));
    if (theirs->blck_size == 0) {
      EXPECT_EQ(ours, nullptr) << value;
      continue;
    }
    ASSERT_NE(ours, nullptr) << value;
    EXPECT_STREQ(ours->name, theirs->type_name) << value;
    EXPECT_EQ(ours->block_size, static_cast<std::uint32_t>(theirs->blck_size)) << value;
    EXPECT_EQ(ours->type_size, theirs->type_size) << value;
  }
  EXPECT_EQ(lora::io::ggml_type_traits(static_cast<std::uint32_t>(GGML_TYPE_COUNT)), nullptr);
}

TEST(LlamaCppReference, Q8_0IsGgmlsBitForBit) {
  // Blocks from ggml's quantizer and from lora's are the same bytes, and dequantize to the same
  // floats; adversarial blocks included: all zero, all equal, one outlier, halves, tiny and huge.
  std::vector<float> x;
  std::uint32_t state = 12345;
  auto uniform = [&state] {
    state = state * 1664525u + 1013904223u;
    return static_cast<float>(state >> 8) / 16777216.0f * 2.0f - 1.0f;
  };
  for (int i = 0; i < 32 * 64; ++i) x.push_back(uniform() * 3.0f);
  for (int i = 0; i < 32; ++i) x.push_back(0.0f);
  for (int i = 0; i < 32; ++i) x.push_back(-0.75f);
  for (int i = 0; i < 32; ++i) x.push_back(i == 7 ? 1e4f : 1e-3f * static_cast<float>(i));
  for (int i = 0; i < 32; ++i) x.push_back(127.0f * (static_cast<float>(i) + 0.5f) / 32.0f);
  for (int i = 0; i < 32; ++i) x.push_back(1e-30f * uniform());
  for (int i = 0; i < 32; ++i) x.push_back(6e4f * uniform());
  const std::size_t n = x.size();
  std::vector<std::uint8_t> theirs(ggml_row_size(GGML_TYPE_Q8_0, static_cast<std::int64_t>(n)));
  std::vector<std::uint8_t> ours(theirs.size());
  ggml_quantize_chunk(GGML_TYPE_Q8_0, x.data(), theirs.data(), 0, 1, static_cast<std::int64_t>(n),
                      nullptr);
  lora::io::ggml::quantize_q8_0(x.data(), ours.data(), n);
  EXPECT_EQ(ours, theirs);
  std::vector<float> y_theirs(n), y_ours(n);
  ggml_get_type_traits(GGML_TYPE_Q8_0)
      ->to_float(theirs.data(), y_theirs.data(), static_cast<std::int64_t>(n));
  lora::io::ggml::dequantize_q8_0(theirs.data(), y_ours.data(), n);
  EXPECT_EQ(0, std::memcmp(y_ours.data(), y_theirs.data(), n * sizeof(float)));
}

// ---- every supported block type, against ggml's own quantizers and dequantizers ---------------

/// Random weights, then adversarial blocks of 256 (a whole super-block, so each k-quant block sees
/// the case alone): zeros, all equal (both signs), one outlier among small values, exact halves,
/// tiny (fp16 scales underflow), huge (near fp16's limit), and a super-block mixing huge and tiny
/// sub-blocks.
std::vector<float> adversarial_weights() {
  std::vector<float> x;
  std::uint32_t state = 2024;
  auto uniform = [&state] {
    state = state * 1664525u + 1013904223u;
    return static_cast<float>(state >> 8) / 16777216.0f * 2.0f - 1.0f;
  };
  for (int i = 0; i < 256 * 24; ++i) x.push_back(uniform() * 0.05f);
  for (int i = 0; i < 256 * 4; ++i) x.push_back(uniform() * 3.0f + 0.5f);
  auto block = [&](auto f) {
    for (int i = 0; i < 256; ++i) x.push_back(f(i));
  };
  block([](int) { return 0.0f; });
  block([](int) { return -0.75f; });
  block([](int) { return 0.3f; });
  block([&](int i) { return i == 77 ? 1e4f : 1e-3f * uniform(); });
  block([&](int i) { return i == 3 ? -50.0f : uniform(); });
  block([](int i) { return static_cast<float>(i % 16) - 7.5f; });
  block([&](int) { return 1e-30f * uniform(); });
  block([&](int) { return 1e-6f * uniform(); });
  block([&](int) { return 6e4f * uniform(); });
  block([&](int i) { return (i / 32) % 2 ? 3e3f * uniform() : 1e-5f * uniform(); });
  block([&](int i) { return i % 32 == 0 ? 0.0f : uniform() + 2.0f; });  // positive: min > 0
  block([&](int i) { return i < 128 ? 0.0f : -uniform() * uniform(); });
  return x;
}

const ggml_type kBlockTypes[] = {GGML_TYPE_Q8_0, GGML_TYPE_Q4_0, GGML_TYPE_Q5_0,
                                 GGML_TYPE_Q4_K, GGML_TYPE_Q5_K, GGML_TYPE_Q6_K};

TEST(LlamaCppReference, BlocksFromGgmlsQuantizerDequantizeBitForBit) {
  const std::vector<float> x = adversarial_weights();
  const auto n = static_cast<std::int64_t>(x.size());
  for (ggml_type type : kBlockTypes) {
    SCOPED_TRACE(ggml_type_name(type));
    const auto ours_type = static_cast<lora::io::GgmlType>(type);
    ASSERT_TRUE(lora::io::ggml::can_dequantize(ours_type));
    std::vector<std::uint8_t> blocks(ggml_row_size(type, n));
    ggml_quantize_chunk(type, x.data(), blocks.data(), 0, 1, n, nullptr);
    std::vector<float> theirs(x.size()), ours(x.size());
    ggml_get_type_traits(type)->to_float(blocks.data(), theirs.data(), n);
    lora::io::ggml::dequantize(ours_type, blocks.data(), ours.data(), x.size());
    for (std::size_t i = 0; i < x.size(); ++i)
      ASSERT_EQ(0, std::memcmp(&ours[i], &theirs[i], sizeof(float)))
          << "element " << i << ": " << ours[i] << " vs ggml's " << theirs[i];
  }
}

TEST(LlamaCppReference, AnyBlockBytesDequantizeBitForBit) {
  // Blocks of random bytes (every scale, level and sign pattern, fp16 infinities and NaN in the
  // scales included): the dequantizers are ggml's on blocks no quantizer would write too.
  std::uint32_t state = 99;
  for (ggml_type type : kBlockTypes) {
    SCOPED_TRACE(ggml_type_name(type));
    const std::int64_t n = 256 * 64;
    std::vector<std::uint8_t> blocks(ggml_row_size(type, n));
    for (auto& byte : blocks) {
      state = state * 1664525u + 1013904223u;
      byte = static_cast<std::uint8_t>(state >> 24);
    }
    std::vector<float> theirs(static_cast<std::size_t>(n)), ours(theirs.size());
    ggml_get_type_traits(type)->to_float(blocks.data(), theirs.data(), n);
    lora::io::ggml::dequantize(static_cast<lora::io::GgmlType>(type), blocks.data(), ours.data(),
                               ours.size());
    for (std::size_t i = 0; i < ours.size(); ++i) {
      if (std::isnan(theirs[i])) {
        EXPECT_TRUE(std::isnan(ours[i])) << i;
        continue;
      }
      ASSERT_EQ(0, std::memcmp(&ours[i], &theirs[i], sizeof(float)))
          << "element " << i << ": " << ours[i] << " vs ggml's " << theirs[i];
    }
  }
}

TEST(LlamaCppReference, QuantizersWriteGgmlsBytes) {
  // lora's quantizers against ggml_quantize_chunk without an importance matrix (what
  // llama-quantize runs then): the same bytes, block for block.
  const std::vector<float> x = adversarial_weights();
  const auto n = static_cast<std::int64_t>(x.size());
  for (ggml_type type : {GGML_TYPE_Q8_0, GGML_TYPE_Q4_0, GGML_TYPE_Q4_K, GGML_TYPE_Q6_K,
                         GGML_TYPE_F16, GGML_TYPE_BF16}) {
    SCOPED_TRACE(ggml_type_name(type));
    const auto ours_type = static_cast<lora::io::GgmlType>(type);
    ASSERT_TRUE(lora::io::ggml::can_quantize(ours_type));
    std::vector<std::uint8_t> theirs(ggml_row_size(type, n)), ours(theirs.size());
    ggml_quantize_chunk(type, x.data(), theirs.data(), 0, 1, n, nullptr);
    lora::io::ggml::quantize(ours_type, x.data(), ours.data(), x.size());
    const std::size_t block_bytes = ggml_type_size(type);
    for (std::size_t b = 0; b < ours.size() / block_bytes; ++b)
      ASSERT_EQ(0, std::memcmp(ours.data() + b * block_bytes, theirs.data() + b * block_bytes,
                               block_bytes))
          << "block " << b << " of " << ours.size() / block_bytes;
  }
}

// The fuzz target fuzz_ggml_blocks's seeds (fuzz/seeds/ggml_blocks: every type, zero, huge and
// tiny scales, inf and NaN scales and values) through its own checks, on every ctest run:
// io::ggml::dequantize is ggml's to_float bit for bit, and GgmlFrozenWeight refuses exactly the
// blocks ggml decodes to a non-finite value (a mismatch traps: this binary then fails).
TEST(LlamaCppReference, FuzzSeedsOfTheBlockDequantizers) {
  const std::filesystem::path dir = std::filesystem::path(LORA_FUZZ_DIR) / "seeds" / "ggml_blocks";
  int inputs = 0;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    std::ifstream in(entry.path(), std::ios::binary);
    const std::vector<std::uint8_t> bytes((std::istreambuf_iterator<char>(in)),
                                          std::istreambuf_iterator<char>());
    SCOPED_TRACE(entry.path().string());
    lora::fuzz::exercise_ggml_blocks(bytes.data(), bytes.size());
    ++inputs;
  }
  EXPECT_GE(inputs, 18);  // two per type: finite blocks, and non-finite ones
}

}  // namespace test_llama_cpp_reference
