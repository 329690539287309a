// The body of the GGUF fuzz target, shared with the test that replays every regression input
// (tests/test_gguf_container.cpp).
//
// Contract under test: for ANY byte string, GgufFile::parse either accepts it, and then every
// accessor either works or throws lora::io::FormatError, or rejects it with a FormatError. An
// accepted file is written again by GgufWriter::copy_of and read back with the same metadata and
// tensors (reader against writer), and, when a scratch folder is given, the same bytes loaded
// from a file give the same answer as from memory. An accepted file is also read as a LoRA
// adapter (which may refuse it with a FormatError). Any other exception, a crash, a sanitizer
// report, a leak or a hang is a bug.
#pragma once

#include <lora/gguf/adapter_io.hpp>
#include <lora/io/gguf.hpp>
#include <lora/io/gguf_writer.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

namespace lora::fuzz {

/// Runs one accessor that may legitimately refuse; FormatError is the documented refusal.
template <typename F>
void allowing_gguf_format_error(F f) {
  try {
    f();
  } catch (const io::FormatError&) {
  }
}

/// Feeds `bytes` to the GGUF reader and touches everything it exposes; see the top of this file.
/// `scratch`: a file path the harness may write (empty: the file comparison is skipped). Throws
/// io::FormatError when the input is rejected.
inline void exercise_gguf(const std::uint8_t* bytes, std::size_t size,
                          const std::string& scratch = {}) {
  std::vector<std::uint8_t> input(bytes, bytes + size);
  bool from_file_ok = true;
  std::string from_file_error;
  if (!scratch.empty()) {
    if (std::FILE* f = std::fopen(scratch.c_str(), "wb")) {
      if (size) std::fwrite(bytes, 1, size, f);
      std::fclose(f);
      try {
        io::GgufFile::load(scratch);
      } catch (const io::FormatError& e) {
        from_file_ok = false;
        from_file_error = e.what();
      }
    }
  }
  io::GgufFile file;
  try {
    file = io::GgufFile::parse(std::move(input), scratch.empty() ? "fuzz" : scratch);
  } catch (const io::FormatError& e) {
    if (!scratch.empty() && (from_file_ok || from_file_error != e.what())) __builtin_trap();
    throw;
  }
  if (!scratch.empty() && !from_file_ok) __builtin_trap();

  std::size_t sink = file.metadata().size() + file.alignment() + file.data_offset();
  for (const auto& kv : file.metadata()) {
    const std::string& key = kv.first;  // not a structured binding: the lambdas capture it
    const io::GgufValue& value = kv.second;
    sink += value.to_string().size() + value.type_string().size();
    allowing_gguf_format_error([&] { sink += file.get<float>(key) != 0; });
    allowing_gguf_format_error([&] { sink += file.get_array<std::string>(key).size(); });
    allowing_gguf_format_error([&] { sink += file.get_array<std::uint32_t>(key).size(); });
  }
  for (const auto& t : file.tensors()) {
    sink += t.bytes + t.ne.size() + file.raw(t.name).size();
    allowing_gguf_format_error([&] { sink += file.values<float>(t.name).size(); });
    allowing_gguf_format_error(
        [&] { sink += static_cast<std::size_t>(file.matrix<double>(t.name).size()); });
  }
  allowing_gguf_format_error([&] { file.info("no such tensor"); });
  allowing_gguf_format_error([&] { file.value("no such key"); });
  allowing_gguf_format_error([&] { sink += gguf::parse_adapter<float>(file).modules.size(); });

  // Reader against writer: what was read, written again, reads back the same.
  const io::GgufFile again = io::GgufFile::parse(io::GgufWriter::copy_of(file).serialize());
  if (again.metadata().size() != file.metadata().size() ||
      again.tensors().size() != file.tensors().size())
    __builtin_trap();
  for (std::size_t i = 0; i < file.metadata().size(); ++i)
    if (again.metadata()[i].first != file.metadata()[i].first ||
        again.metadata()[i].second != file.metadata()[i].second)
      __builtin_trap();
  for (std::size_t i = 0; i < file.tensors().size(); ++i) {
    const auto& a = file.tensors()[i];
    const auto& b = again.tensors()[i];
    if (a.name != b.name || a.ne != b.ne || a.type != b.type || a.bytes != b.bytes ||
        file.raw(a.name) != again.raw(b.name))
      __builtin_trap();
  }
  if (sink == static_cast<std::size_t>(-1)) __builtin_trap();
}

}  // namespace lora::fuzz
