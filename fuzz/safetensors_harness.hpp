// The body of the safetensors fuzz target, shared with the regression test that replays every
// input the fuzzer ever crashed on (tests/test_fuzz_regressions.cpp).
//
// Contract under test: for ANY byte string, SafeTensors::parse either accepts it, and then every
// accessor either works or throws lora::io::FormatError, or rejects it with a FormatError. Any
// other exception, a crash, a sanitizer report, a leak or a hang is a bug.
#pragma once

#include <lora/io/safetensors.hpp>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace lora::fuzz {

/// Runs one accessor that may legitimately refuse (a 3-D tensor asked for as a matrix, an integer
/// dtype asked for as floats): FormatError is the documented refusal; anything else propagates.
template <typename F>
void allowing_format_error(F f) {
  try {
    f();
  } catch (const io::FormatError&) {
  }
}

/// Feeds `bytes` to the reader and touches everything it exposes. Throws io::FormatError when the
/// input is rejected; lets any other exception escape (the fuzzer then reports it as a crash).
inline void exercise_safetensors(const std::uint8_t* bytes, std::size_t size) {
  const auto st = io::SafeTensors::parse(std::vector<std::uint8_t>(bytes, bytes + size), "fuzz");
  std::size_t sink = st.metadata().size();
  for (const std::string& name : st.names()) {
    const io::TensorInfo& info = st.info(name);
    sink += info.shape.size() + (info.end - info.begin);
    allowing_format_error([&] { sink += st.values<float>(name).size(); });
    allowing_format_error([&] { sink += st.values<double>(name).size(); });
    allowing_format_error([&] { sink += static_cast<std::size_t>(st.matrix<float>(name).size()); });
    allowing_format_error(
        [&] { sink += static_cast<std::size_t>(st.vector<double>(name).size()); });
  }
  allowing_format_error([&] { st.info("no such tensor"); });
  if (st.size() != st.names().size() || sink == static_cast<std::size_t>(-1)) __builtin_trap();
}

}  // namespace lora::fuzz
