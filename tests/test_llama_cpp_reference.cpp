// The reference the GGUF tests compare with is llama.cpp's own prebuilt CPU build (fetched by
// scripts/fetch_llama_cpp): this checks that it loads here and runs ggml's own quantizer and
// dequantizer, so a broken fetch fails one clear test first.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "ggml-backend.h"
#include "ggml.h"
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

}  // namespace test_llama_cpp_reference
