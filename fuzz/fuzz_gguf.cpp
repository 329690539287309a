// libFuzzer target for the GGUF reader and writer (lora/io/gguf.hpp, gguf_writer.hpp) and the GGUF
// adapter reader. Build and run with `scripts/fuzz SECONDS fuzz_gguf`; seeds: fuzz/seeds/gguf.
// A rejected input must be a lora::io::FormatError; any other exception escapes and aborts, which
// libFuzzer reports as a crash together with the input that caused it.
#include "gguf_harness.hpp"

#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  // In memory against file: one scratch file per process (TMPDIR, /dev/shm under scripts/fuzz).
  static const std::string scratch = [] {
    const char* dir = std::getenv("TMPDIR");
    return std::string(dir ? dir : "/tmp") + "/lora_fuzz_gguf." + std::to_string(::getpid());
  }();
  try {
    lora::fuzz::exercise_gguf(data, size, scratch);
  } catch (const lora::io::FormatError&) {
    // The documented way to refuse a file.
  }
  return 0;
}
