// libFuzzer target for the safetensors reader (lora/io/safetensors.hpp). Build and run with
// scripts/fuzz; seeds: tests/fixtures/peft/**/*.safetensors and fuzz/seeds/safetensors.
// A rejected input must be a lora::io::FormatError; any other exception escapes and aborts, which
// libFuzzer reports as a crash together with the input that caused it.
#include "safetensors_harness.hpp"

#include <cstddef>
#include <cstdint>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    lora::fuzz::exercise_safetensors(data, size);
  } catch (const lora::io::FormatError&) {
    // The documented way to refuse a file.
  }
  return 0;
}
