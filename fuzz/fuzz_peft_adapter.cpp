// libFuzzer target for the PEFT adapter loader (lora/peft/adapter_io.hpp): adapter_config.json and
// adapter_model.safetensors from one input (layout in peft_adapter_harness.hpp). Build and run with
// scripts/fuzz; seeds: fuzz/seeds/peft_adapter. A refused input must be a lora::io::FormatError;
// anything else escapes and aborts, which libFuzzer reports with the input.
#include "peft_adapter_harness.hpp"

#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

namespace {

/// A private scratch directory for the two files, removed when the fuzzer exits normally. Its name
/// is a plain array: the exit handler may run after static destructors.
const char* scratch_dir() {
  static char dir[4096] = "";
  if (dir[0] == '\0') {
    const char* tmp = std::getenv("TMPDIR");
    std::snprintf(dir, sizeof dir, "%s/lora-fuzz-peft-XXXXXX", tmp && *tmp ? tmp : "/tmp");
    if (mkdtemp(dir) == nullptr) std::abort();
    std::atexit([] {
      for (const char* f : {lora::peft::kConfigFileName, lora::peft::kWeightsFileName})
        std::remove((std::string(dir) + "/" + f).c_str());
      rmdir(dir);
    });
  }
  return dir;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    lora::fuzz::exercise_peft_adapter(data, size, scratch_dir());
  } catch (const lora::io::FormatError&) {
    // The documented way to refuse an adapter.
  }
  return 0;
}
