// The body of the PEFT adapter fuzz target, shared with tests/test_fuzz_regressions.cpp.
//
// Input layout: a 4-byte little-endian length n, then n bytes of adapter_config.json, then the
// bytes of adapter_model.safetensors (n is clamped to what is there). fuzz/seeds/make_seeds.py
// writes seeds in this layout from the PEFT fixture directories.
//
// Contract under test: lora::peft::read_adapter and load_adapter either accept the directory or
// refuse it with lora::io::FormatError; parse_adapter (the same two files from memory) gives the
// same verdict; the patterns resolve every module as std::regex with PEFT's rule does; an accepted
// adapter then works in a layer (forward, merge, unmerge), where merge() may refuse non-finite
// values with std::domain_error; and saving it, with a write failure injected at every step of
// each of its two files, throws io::WriteError and leaves the directory as it was (no new file or
// folder, or the previous pair byte for byte), while a save that succeeds reads back exactly.
// Anything else (another exception, a crash, a sanitizer report, a leak, a hang) is a bug.
#pragma once

#include <lora/lora.hpp>
#include <lora/peft/adapter_io.hpp>

#include <dirent.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <regex>
#include <stdexcept>
#include <string>
#include <vector>

namespace lora::fuzz {

/// Writes `bytes` to `path`, replacing it.
inline void write_file(const std::string& path, const std::uint8_t* bytes, std::size_t size) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes), static_cast<std::streamsize>(size));
  if (!out) throw std::runtime_error("fuzz harness: cannot write " + path);
}

/// Loads `file`'s adapters into freshly built layers (only when the weights are small enough to
/// build cheaply) and runs them: forward, merge, forward, unmerge.
template <typename T>
void exercise_layers(const std::string& dir, const peft::AdapterFile<T>& file) {
  using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;
  Eigen::Index total = 0;
  for (const auto& [path, a] : file.modules) total += a.out_features() * a.in_features();
  if (total > (1 << 16)) return;
  std::vector<std::unique_ptr<LoRALinear<T>>> owned;
  std::map<std::string, LoRALinear<T>*> layers;
  for (const auto& [path, a] : file.modules) {
    LoRAConfig cfg;
    cfg.rank = 1;
    owned.push_back(
        std::make_unique<LoRALinear<T>>(Matrix::Ones(a.out_features(), a.in_features()), cfg));
    layers[path] = owned.back().get();
  }
  peft::load_adapter(dir, layers);
  for (auto& layer : owned) {
    const Matrix X = Matrix::Ones(layer->in_features(), 2);
    const Matrix H = layer->forward(X);
    try {
      layer->merge();
    } catch (const std::domain_error&) {
      continue;  // documented: a non-finite adapter or an overflowing sum is refused
    }
    const Matrix merged = layer->forward(X);
    layer->unmerge();
    if (merged.rows() != H.rows() || layer->is_merged()) __builtin_trap();
  }
}

/// The first key of `patterns` that PEFT's rule picks for `module`, by std::regex alone (the
/// reference for the library's faster matcher).
template <typename V>
std::optional<std::string> reference_key(const std::vector<std::pair<std::string, V>>& patterns,
                                         const std::string& module) {
  for (const auto& [key, value] : patterns)
    if (std::regex_match(module, std::regex("(.*\\.)?(" + key + ")", std::regex::ECMAScript)))
      return key;
  return std::nullopt;
}

/// Traps unless the compiled rules pick, for every module, the key that std::regex picks (only
/// for small inputs: the reference compiles keys x modules regexes).
template <typename T>
void check_rules_against_regex(const peft::AdapterFile<T>& file) {
  const auto& c = file.config;
  if ((c.rank_pattern.size() + c.alpha_pattern.size()) * file.modules.size() > 256) return;
  const peft::ModuleRules rules = c.rules();
  for (const auto& [m, adapter] : file.modules) {
    if (rules.rank_key(m) != reference_key(c.rank_pattern, m)) __builtin_trap();
    if (rules.alpha_key(m) != reference_key(c.alpha_pattern, m)) __builtin_trap();
  }
}

/// The regular files in `dir` with their bytes (nothing for a missing directory).
inline std::map<std::string, std::string> snapshot(const std::string& dir) {
  std::map<std::string, std::string> out;
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return out;
  while (const dirent* e = ::readdir(d)) {
    const std::string name = e->d_name;
    if (name == "." || name == "..") continue;
    std::ifstream in(dir + "/" + name, std::ios::binary);
    out[name] = std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  ::closedir(d);
  return out;
}

inline void remove_tree(const std::string& dir) {
  for (const auto& [name, bytes] : snapshot(dir)) std::remove((dir + "/" + name).c_str());
  ::rmdir(dir.c_str());
}

/// Saves `file` into `out` with a failure injected into each step of each of the two writes; every
/// failure must be an io::WriteError that leaves `out` exactly as it was.
template <typename T>
void save_under_failures(const std::map<std::string, const LoRAAdapter<T>*>& adapters,
                         const peft::SaveOptions& options, const std::string& out) {
  using io::detail::WriteStep;
  const auto before = snapshot(out);
  const bool existed = ::access(out.c_str(), F_OK) == 0;
  for (int skip = 0; skip < 2; ++skip)
    for (const WriteStep step :
         {WriteStep::Open, WriteStep::Write, WriteStep::Sync, WriteStep::Rename}) {
      io::detail::injected_write_failure = step;
      io::detail::injected_write_failure_skip = skip;
      bool failed = false;
      try {
        peft::write_adapter<T>(out, adapters, options);
      } catch (const io::WriteError&) {
        failed = true;
      }
      io::detail::injected_write_failure = WriteStep::None;
      io::detail::injected_write_failure_skip = 0;
      if (!failed || snapshot(out) != before || (::access(out.c_str(), F_OK) == 0) != existed)
        __builtin_trap();
    }
}

/// Saves the adapters of `file` (a fresh directory, then over the saved pair) under injected
/// failures, then for real, and reads the result back: it must hold exactly the same weights.
template <typename T>
void exercise_save(const std::string& dir, const peft::AdapterFile<T>& file, bool keep_config) {
  Eigen::Index total = 0;
  std::map<std::string, const LoRAAdapter<T>*> adapters;
  for (const auto& [path, a] : file.modules) {
    total += a.parameter_count();
    adapters[path] = &a;
  }
  if (total > (1 << 16)) return;
  peft::SaveOptions options;
  if (keep_config) options.base = file.config;
  const std::string out = dir + "/saved";
  remove_tree(out);
  try {
    peft::write_adapter<T>(out, adapters, options);
  } catch (const std::invalid_argument&) {
    return;  // documented: a base config that cannot express these adapters
  }
  remove_tree(out);
  save_under_failures(adapters, options, out);  // into a fresh directory
  peft::write_adapter<T>(out, adapters, options);
  save_under_failures(adapters, options, out);  // over a complete pair
  const peft::AdapterFile<T> back = peft::read_adapter<T>(out);
  if (back.modules.size() != file.modules.size()) __builtin_trap();
  for (const auto& [path, a] : file.modules) {
    const auto& b = back.modules.at(path);
    if (b.A() != a.A() || b.B() != a.B() || b.scaling() != a.scaling()) __builtin_trap();
  }
  remove_tree(out);
}

/// Feeds one input (layout above) through read_adapter<float>, read_adapter<double>,
/// parse_adapter<float> and load_adapter, using `dir` (an existing, writable directory) for the two
/// files, then saves what loaded. Throws io::FormatError when the input is refused; lets anything
/// else escape.
inline void exercise_peft_adapter(const std::uint8_t* data, std::size_t size,
                                  const std::string& dir) {
  std::size_t n = 0;
  for (std::size_t i = 0; i < 4 && i < size; ++i) n |= std::size_t(data[i]) << (8 * i);
  const std::size_t head = size < 4 ? size : 4;
  if (n > size - head) n = size - head;
  write_file(dir + "/" + peft::kConfigFileName, data + head, n);
  write_file(dir + "/" + peft::kWeightsFileName, data + head + n, size - head - n);

  // The in-memory loader applies the file loader's limits: the same verdict on the same bytes.
  std::optional<peft::AdapterFile<float>> in_memory;
  try {
    in_memory =
        peft::parse_adapter<float>(std::string(reinterpret_cast<const char*>(data + head), n),
                                   std::vector<std::uint8_t>(data + head + n, data + size), dir);
  } catch (const io::FormatError&) {
  }
  std::optional<peft::AdapterFile<float>> from_files;
  try {
    from_files = peft::read_adapter<float>(dir);
  } catch (const io::FormatError&) {
    if (in_memory) __builtin_trap();
    throw;
  }
  if (!in_memory || in_memory->modules.size() != from_files->modules.size()) __builtin_trap();
  const peft::AdapterFile<float>& f = *from_files;

  std::optional<peft::AdapterFile<double>> d;
  try {
    d = peft::read_adapter<double>(dir);
  } catch (const io::FormatError&) {
    // Only a float overflow may separate the two: a double reads whatever a float reads.
    __builtin_trap();
  }
  if (f.modules.size() != d->modules.size()) __builtin_trap();
  for (const auto& [path, a] : f.modules)
    if (a.rank() < 1 || a.rank() > a.out_features() || a.rank() > a.in_features()) __builtin_trap();
  check_rules_against_regex(f);
  exercise_layers(dir, f);
  exercise_save(dir, f, (size & 1) != 0);
}

}  // namespace lora::fuzz
