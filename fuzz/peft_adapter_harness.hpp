// The body of the PEFT adapter fuzz target, shared with tests/test_fuzz_regressions.cpp.
//
// Input layout: a 4-byte little-endian length n, then n bytes of adapter_config.json, then the
// bytes of adapter_model.safetensors (n is clamped to what is there). fuzz/seeds/make_seeds.py
// writes seeds in this layout from the PEFT fixture directories.
//
// Contract under test: lora::peft::read_adapter and load_adapter either accept the directory or
// refuse it with lora::io::FormatError; an accepted adapter then works in a layer (forward,
// merge, unmerge), where merge() may refuse non-finite values with std::domain_error. Anything
// else (another exception, a crash, a sanitizer report, a leak, a hang) is a bug.
#pragma once

#include <lora/lora.hpp>
#include <lora/peft/adapter_io.hpp>

#include <cstddef>
#include <cstdint>
#include <fstream>
#include <map>
#include <memory>
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

/// Feeds one input (layout above) through read_adapter<float>, read_adapter<double> and
/// load_adapter, using `dir` (an existing, writable directory) for the two files. Throws
/// io::FormatError when the input is refused; lets anything else escape.
inline void exercise_peft_adapter(const std::uint8_t* data, std::size_t size,
                                  const std::string& dir) {
  std::size_t n = 0;
  for (std::size_t i = 0; i < 4 && i < size; ++i) n |= std::size_t(data[i]) << (8 * i);
  const std::size_t head = size < 4 ? size : 4;
  if (n > size - head) n = size - head;
  write_file(dir + "/" + peft::kConfigFileName, data + head, n);
  write_file(dir + "/" + peft::kWeightsFileName, data + head + n, size - head - n);

  const peft::AdapterFile<float> f = peft::read_adapter<float>(dir);
  const peft::AdapterFile<double> d = peft::read_adapter<double>(dir);
  if (f.modules.size() != d.modules.size()) __builtin_trap();
  for (const auto& [path, a] : f.modules)
    if (a.rank() < 1 || a.rank() > a.out_features() || a.rank() > a.in_features()) __builtin_trap();
  exercise_layers(dir, f);
}

}  // namespace lora::fuzz
