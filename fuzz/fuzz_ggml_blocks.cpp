// libFuzzer target for lora's ggml block dequantizers (lora/io/ggml_quants.hpp) and
// GgmlFrozenWeight's refusal of non-finite blocks, against llama.cpp's own dequantizers (ggml's
// to_float, from the prebuilt libggml-base that scripts/fetch_llama_cpp fetches). Build and run
// with `scripts/fuzz SECONDS fuzz_ggml_blocks`; seeds: fuzz/seeds/ggml_blocks. The input format
// and the checks are at the top of ggml_blocks_harness.hpp: a mismatch traps, a refusal must be
// a lora::io::FormatError (any other exception escapes and aborts, a crash to libFuzzer).
#include "ggml_blocks_harness.hpp"

#include <cstddef>
#include <cstdint>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  lora::fuzz::exercise_ggml_blocks(data, size);
  return 0;
}
