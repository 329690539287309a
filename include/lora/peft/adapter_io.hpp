// Loading and saving a whole PEFT LoRA adapter directory: `adapter_config.json` plus
// `adapter_model.safetensors` with PEFT's key names
//   base_model.model.<module path>.lora_A.weight   r x in
//   base_model.model.<module path>.lora_B.weight   out x r
//   base_model.model.<module path>.lora_B.bias     out        (lora_bias only)
//   base_model.model.<module path>.lora_magnitude_vector  out  (use_dora only: DoRA's m, PEFT's
//                                                               key has no ".weight" suffix)
// The caller maps module paths ("model.layers.0.self_attn.q_proj") to its layers. Everything is
// checked before any layer is touched: a module without a layer, a layer without a module, a shape
// that does not fit, a rank that disagrees with the config, each throws a FormatError naming it.
//
// fan_in_fan_out (GPT-2's Conv1D stores W0 as in x out): PEFT still saves lora_A as r x in and
// lora_B as out x r, so nothing changes here; the caller builds its layer from W0 transposed
// (this library always holds W0 as out x in).
#pragma once

#include "lora/adapter.hpp"
#include "lora/config.hpp"
#include "lora/io/atomic_file.hpp"
#include "lora/io/safetensors.hpp"
#include "lora/io/safetensors_writer.hpp"
#include "lora/lora_linear.hpp"
#include "lora/multi_lora_linear.hpp"
#include "lora/peft/adapter_config.hpp"

#include <Eigen/Core>

#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <fstream>
#include <map>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace lora::peft {

inline constexpr const char* kConfigFileName = "adapter_config.json";
inline constexpr const char* kWeightsFileName = "adapter_model.safetensors";
/// PEFT's prefix of every key: PeftModel.base_model (LoraModel) .model (the user's model).
inline constexpr const char* kKeyPrefix = "base_model.model.";

/// The longest module path read_adapter accepts.
inline constexpr std::size_t kMaxModulePathLength = 1024;
/// PEFT's key of a module's tensor: key_of("model.layers.0.self_attn.q_proj", "lora_A.weight").
inline std::string key_of(const std::string& module, const char* tensor) {
  return std::string(kKeyPrefix) + module + "." + tensor;
}

/// An adapter read from a directory: its config and one LoRAAdapter per module path.
template <typename T>
struct AdapterFile {
  AdapterConfig config;                           ///< adapter_config.json
  std::map<std::string, LoRAAdapter<T>> modules;  ///< module path -> its adapter
};

namespace detail {

inline std::string join_path(const std::string& dir, const char* file) {
  if (dir.empty()) return file;
  return dir.back() == '/' ? dir + file : dir + "/" + file;
}

inline bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

/// Splits a PEFT key into (module path, tensor suffix); nothing for a key of another shape.
inline std::optional<std::pair<std::string, std::string>> split_key(const std::string& key) {
  const std::string prefix = kKeyPrefix;
  if (key.compare(0, prefix.size(), prefix) != 0) return std::nullopt;
  for (const char* suffix :
       {".lora_A.weight", ".lora_B.weight", ".lora_B.bias", ".lora_magnitude_vector"}) {
    if (ends_with(key, suffix) && key.size() > prefix.size() + std::string(suffix).size())
      return std::make_pair(
          key.substr(prefix.size(), key.size() - prefix.size() - std::string(suffix).size()),
          std::string(suffix + 1));
  }
  return std::nullopt;
}

template <typename T>
LoRAAdapter<T> make_adapter(const io::SafeTensors& st, const AdapterConfig& config,
                            const std::string& module, const std::string& source) {
  auto fail = [&](const std::string& what) {
    return FormatError("PEFT adapter \"" + source + "\": module \"" + module + "\": " + what);
  };
  const std::string a_key = key_of(module, "lora_A.weight");
  const std::string b_key = key_of(module, "lora_B.weight");
  const std::string bias_key = key_of(module, "lora_B.bias");
  const std::string m_key = key_of(module, "lora_magnitude_vector");
  if (!st.contains(a_key)) throw fail("\"" + a_key + "\" is missing (lora_B is there)");
  if (!st.contains(b_key)) throw fail("\"" + b_key + "\" is missing (lora_A is there)");
  const auto& a = st.info(a_key).shape;
  const auto& b = st.info(b_key).shape;
  if (a.size() != 2 || b.size() != 2)
    throw fail("lora_A and lora_B must be 2-D, got " + io::shape_to_string(a) + " and " +
               io::shape_to_string(b));
  if (a[0] != b[1])
    throw fail("lora_A is " + io::shape_to_string(a) + " (r x in) but lora_B is " +
               io::shape_to_string(b) + " (out x r): their ranks differ");
  if (a[0] < 1 || a[1] < 1 || b[0] < 1) throw fail("empty lora_A or lora_B");
  const LoRAConfig cfg = config.lora_config_for(module);
  if (cfg.rank != a[0]) {
    const auto key = AdapterConfig::pattern_key(config.rank_pattern, module);
    throw fail("the config gives rank " + std::to_string(cfg.rank) +
               (key ? " (rank_pattern key \"" + *key + "\")" : std::string(" (r)")) +
               " but lora_A is " + io::shape_to_string(a));
  }
  if (config.use_dora != st.contains(m_key))
    throw fail(config.use_dora ? "use_dora is true (DoRA) but \"" + m_key + "\" is missing"
                               : "\"" + m_key + "\" is present but use_dora (DoRA) is false");
  if (config.lora_bias != st.contains(bias_key))
    throw fail(config.lora_bias ? "lora_bias is true but \"" + bias_key + "\" is missing"
                                : "\"" + bias_key + "\" is present but lora_bias is false");
  if (cfg.rank > std::min(a[1], b[0]))
    throw fail("rank " + std::to_string(cfg.rank) + " exceeds min(out, in) of a " +
               std::to_string(b[0]) + " x " + std::to_string(a[1]) +
               " weight, which this library does not support");

  LoRAAdapter<T> adapter(b[0], a[1], cfg);
  adapter.set_weights(st.matrix<T>(a_key), st.matrix<T>(b_key));
  if (config.lora_bias) {
    const auto& bias = st.info(bias_key).shape;
    if (bias.size() != 1 || bias[0] != b[0])
      throw fail("lora_B.bias must have shape [" + std::to_string(b[0]) + "], got " +
                 io::shape_to_string(bias));
    adapter.set_lora_bias(st.vector<T>(bias_key));
  }
  if (config.use_dora) {
    const auto& m = st.info(m_key).shape;
    if (m.size() != 1 || m[0] != b[0])
      throw fail("lora_magnitude_vector must have shape [" + std::to_string(b[0]) + "], got " +
                 io::shape_to_string(m));
    adapter.set_magnitude(st.vector<T>(m_key));
  }
  return adapter;
}

}  // namespace detail

// ---- reading ------------------------------------------------------------------------------------

/// Checks and converts an adapter held in memory: `config` (an AdapterConfig already parsed) and
/// the safetensors file `weights`; `source` names it in messages. See read_adapter.
template <typename T>
AdapterFile<T> parse_adapter(AdapterConfig config, const io::SafeTensors& weights,
                             const std::string& source = "<memory>") {
  AdapterFile<T> out;
  out.config = std::move(config);
  out.config.require_supported(source);
  std::set<std::string> modules;
  for (const auto& key : weights.names()) {
    const auto split = detail::split_key(key);
    if (!split)
      throw FormatError("PEFT adapter \"" + source + "\": unexpected key \"" + key +
                        "\"; expected " + kKeyPrefix +
                        "<module>.lora_A.weight, .lora_B.weight, .lora_B.bias or "
                        ".lora_magnitude_vector");
    if (split->first.size() > kMaxModulePathLength)
      throw FormatError("PEFT adapter \"" + source + "\": a module path of " +
                        std::to_string(split->first.size()) + " characters exceeds the limit of " +
                        std::to_string(kMaxModulePathLength));
    modules.insert(split->first);
  }
  if (modules.empty()) throw FormatError("PEFT adapter \"" + source + "\" holds no LoRA tensors");
  out.config.check_modules({modules.begin(), modules.end()}, source);
  for (const auto& m : modules)
    out.modules.emplace(m, detail::make_adapter<T>(weights, out.config, m, source));
  return out;
}

/// As parse_adapter, from the text of adapter_config.json and the bytes of
/// adapter_model.safetensors (for example to check data that never touches the disk).
template <typename T>
AdapterFile<T> parse_adapter(const std::string& config_json, std::vector<std::uint8_t> weights,
                             const std::string& source = "<memory>") {
  nlohmann::ordered_json j;
  try {
    j = nlohmann::ordered_json::parse(config_json);
  } catch (const nlohmann::json::exception& e) {
    throw FormatError("adapter config \"" + source + "\" is not valid JSON: " + e.what());
  }
  AdapterConfig config = AdapterConfig::from_json(j, source);
  return parse_adapter<T>(std::move(config), io::SafeTensors::parse(std::move(weights), source),
                          source);
}

/// Reads and checks a PEFT adapter directory without any layer: the config (refusing what cannot
/// be applied: modules_to_save, ...), then one LoRAAdapter<T> per module, with the rank and
/// scaling PEFT gives it (r / lora_alpha, rank_pattern / alpha_pattern, use_rslora). Tensors of
/// any float dtype (F32, F16, BF16, F64) are converted to T. Throws FormatError.
template <typename T>
AdapterFile<T> read_adapter(const std::string& dir) {
  const std::string config_path = detail::join_path(dir, kConfigFileName);
  const std::string weights_path = detail::join_path(dir, kWeightsFileName);
  AdapterConfig config = AdapterConfig::load(config_path);
  config.require_supported(config_path);
  return parse_adapter<T>(std::move(config), io::SafeTensors::load(weights_path), dir);
}

namespace detail {

/// Checks that `file` and `layers` name the same modules with the same shapes.
template <typename T, typename Layer>
void match_modules(const AdapterFile<T>& file, const std::map<std::string, Layer*>& layers,
                   const std::string& dir) {
  for (const auto& [path, layer] : layers) {
    if (layer == nullptr)
      throw std::invalid_argument("load_adapter: the layer given for \"" + path + "\" is null");
    const auto it = file.modules.find(path);
    if (it == file.modules.end())
      throw FormatError("PEFT adapter \"" + dir + "\" has no weights for module \"" + path +
                        "\" (missing " + key_of(path, "lora_A.weight") + ")");
    const auto& a = it->second;
    if (a.out_features() != layer->out_features() || a.in_features() != layer->in_features())
      throw FormatError("PEFT adapter \"" + dir + "\": module \"" + path + "\" is for a " +
                        lora::detail::shape_string(a.out_features(), a.in_features()) +
                        " (out x in) weight, but its layer's W0 is " +
                        lora::detail::shape_string(layer->out_features(), layer->in_features()));
  }
  for (const auto& [path, adapter] : file.modules)
    if (layers.count(path) == 0)
      throw FormatError("PEFT adapter \"" + dir + "\" has weights for module \"" + path +
                        "\" but no layer was given for it");
}

}  // namespace detail

/// Loads a PEFT adapter directory into LoRALinear layers, one per module path: each layer's
/// adapter is replaced (rank and scaling as the file says). Nothing is changed unless everything
/// fits: a module without a layer, a layer without a module or a shape mismatch throws
/// FormatError, a merged layer std::logic_error. Returns the config read.
template <typename T, typename F>
AdapterConfig load_adapter(const std::string& dir,
                           const std::map<std::string, LoRALinear<T, F>*>& layers) {
  AdapterFile<T> file = read_adapter<T>(dir);
  detail::match_modules(file, layers, dir);
  for (const auto& [path, layer] : layers)
    lora::detail::require_state(!layer->is_merged(), "load_adapter: the layer of \"", path,
                                "\" is merged; unmerge it first");
  for (auto& [path, adapter] : file.modules) layers.at(path)->replace_adapter(adapter);
  return file.config;
}

/// Loads a PEFT adapter directory into MultiLoRALinear layers as the adapter named `name` (the
/// other adapters and the active one are unchanged). All-or-nothing as above; a layer that already
/// has an adapter `name` throws std::invalid_argument before anything is added.
template <typename T, typename F>
AdapterConfig load_adapter(const std::string& dir,
                           const std::map<std::string, MultiLoRALinear<T, F>*>& layers,
                           const std::string& name) {
  AdapterFile<T> file = read_adapter<T>(dir);
  detail::match_modules(file, layers, dir);
  for (const auto& [path, layer] : layers)
    lora::detail::require(!layer->has_adapter(name), "load_adapter: the layer of \"", path,
                          "\" already has an adapter named \"", name, "\"");
  for (auto& [path, adapter] : file.modules) layers.at(path)->add_adapter(name, std::move(adapter));
  return file.config;
}

// ---- writing ------------------------------------------------------------------------------------

/// How save_adapter writes.
struct SaveOptions {
  /// The dtype of the tensors (PEFT saves the parameters' dtype: F32 for a float32 model).
  /// Nothing: F32 for float adapters, F64 for double ones.
  std::optional<io::DType> dtype;
  /// A config to start from (e.g. the one load_adapter returned): its target_modules,
  /// fan_in_fan_out, patterns and other fields are kept where they still describe the adapters.
  std::optional<AdapterConfig> base;
};

namespace detail {

/// An escaped regular expression for a literal module path (PEFT's keys are regexes).
inline std::string regex_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (std::string("\\^$.|?*+()[]{}").find(c) != std::string::npos) out += '\\';
    out += c;
  }
  return out;
}

/// The config that makes PEFT rebuild exactly these adapters (ranks, alphas, rsLoRA, lora_bias).
template <typename T>
AdapterConfig config_for(const std::map<std::string, const LoRAAdapter<T>*>& adapters,
                         const SaveOptions& options) {
  AdapterConfig c = options.base ? *options.base : AdapterConfig{};
  std::vector<std::string> modules;
  bool any_bias = false;
  const bool rslora = adapters.begin()->second->config().use_rslora;
  const bool dora = adapters.begin()->second->uses_dora();
  std::map<std::pair<int, double>, int> votes;  // the most common (rank, alpha) becomes r, alpha
  for (const auto& [path, a] : adapters) {
    modules.push_back(path);
    any_bias = any_bias || a->has_lora_bias();
    if (a->config().use_rslora != rslora)
      throw std::invalid_argument(
          "save_adapter: PEFT has one use_rslora per adapter, but module \"" + path +
          "\" differs from \"" + adapters.begin()->first + "\"");
    if (a->uses_dora() != dora)
      throw std::invalid_argument("save_adapter: PEFT has one use_dora per adapter, but module \"" +
                                  path + "\" differs from \"" + adapters.begin()->first + "\"");
    ++votes[{static_cast<int>(a->rank()), a->config().alpha}];
  }
  c.use_rslora = rslora;
  c.use_dora = dora;
  c.lora_bias = any_bias;
  if (!options.base) {
    const auto best =
        std::max_element(votes.begin(), votes.end(),
                         [](const auto& x, const auto& y) { return x.second < y.second; });
    c.r = best->first.first;
    c.lora_alpha = best->first.second;
    c.target_modules = modules;  // full paths: PEFT adapts exactly these modules
    c.target_modules_regex.reset();
  }
  // Modules whose rank or alpha the rules get wrong receive an explicit (escaped) entry, placed
  // first because PEFT takes the first matching key.
  std::vector<std::pair<std::string, int>> rp;
  std::vector<std::pair<std::string, double>> ap;
  for (const auto& [path, a] : adapters) {
    if (c.rank_for(path) != a->rank()) rp.emplace_back(regex_escape(path), int(a->rank()));
    if (c.alpha_for(path) != a->config().alpha)
      ap.emplace_back(regex_escape(path), a->config().alpha);
  }
  rp.insert(rp.end(), c.rank_pattern.begin(), c.rank_pattern.end());
  ap.insert(ap.end(), c.alpha_pattern.begin(), c.alpha_pattern.end());
  c.rank_pattern = rp;
  c.alpha_pattern = ap;
  // PEFT reads the keys back in the sorted order the file has: check the rules once more in
  // that order, and drop pattern keys that no longer match anything.
  std::sort(c.rank_pattern.begin(), c.rank_pattern.end());
  std::sort(c.alpha_pattern.begin(), c.alpha_pattern.end());
  auto prune = [&modules](auto& patterns) {
    patterns.erase(std::remove_if(patterns.begin(), patterns.end(),
                                  [&](const auto& p) {
                                    for (const auto& m : modules)
                                      if (AdapterConfig::pattern_key(
                                              std::vector<std::decay_t<decltype(p)>>{p}, m))
                                        return false;
                                    return true;
                                  }),
                   patterns.end());
  };
  prune(c.rank_pattern);
  prune(c.alpha_pattern);
  for (const auto& [path, a] : adapters) {
    if (c.rank_for(path) != a->rank() || c.alpha_for(path) != a->config().alpha)
      throw std::invalid_argument(
          "save_adapter: cannot express the rank/alpha of module \"" + path +
          "\" with PEFT's rank_pattern/alpha_pattern (another module's key matches it first)");
    if (!c.targets(path))
      throw std::invalid_argument("save_adapter: module \"" + path +
                                  "\" is not selected by the base config's target_modules");
  }
  return c;
}

inline void make_directory(const std::string& dir) {
  if (::mkdir(dir.c_str(), 0777) != 0 && errno != EEXIST)
    throw io::WriteError("save_adapter: cannot create the folder \"" + dir +
                         "\": " + io::detail::errno_string(errno));
}

}  // namespace detail

/// Writes `adapters` (module path -> adapter) as a PEFT adapter directory that
/// PeftModel.from_pretrained loads: adapter_model.safetensors (PEFT's keys, with DoRA's
/// lora_magnitude_vector for DoRA adapters, metadata {"format": "pt"}) and adapter_config.json
/// (ranks and alphas, with rank_pattern/alpha_pattern entries where modules differ). A module
/// without a lora bias, in an adapter where others have one, gets a zero bias (PEFT's lora_bias is
/// per adapter). Each file is replaced atomically and both are fully built before either is
/// written; if the config cannot be written after the weights were, the previous weights file is
/// put back. Returns the config written.
template <typename T>
AdapterConfig write_adapter(const std::string& dir,
                            const std::map<std::string, const LoRAAdapter<T>*>& adapters,
                            const SaveOptions& options = {}) {
  if (adapters.empty()) throw std::invalid_argument("save_adapter: no modules to save");
  for (const auto& [path, a] : adapters) {
    if (a == nullptr)
      throw std::invalid_argument("save_adapter: the adapter of \"" + path + "\" is null");
    if (path.empty() || !detail::split_key(key_of(path, "lora_A.weight")))
      throw std::invalid_argument("save_adapter: bad module path \"" + path + "\"");
  }
  const AdapterConfig config = detail::config_for(adapters, options);
  const io::DType dtype =
      options.dtype.value_or(std::is_same_v<T, double> ? io::DType::F64 : io::DType::F32);

  io::SafeTensorsWriter w;
  w.set_metadata("format", "pt");
  for (const auto& [path, a] : adapters) {
    w.add(key_of(path, "lora_A.weight"), a->A(), dtype);
    w.add(key_of(path, "lora_B.weight"), a->B(), dtype);
    if (config.lora_bias) {
      if (a->has_lora_bias())
        w.add_vector(key_of(path, "lora_B.bias"), a->lora_bias(), dtype);
      else
        w.add_vector(key_of(path, "lora_B.bias"),
                     Eigen::Matrix<T, Eigen::Dynamic, 1>::Zero(a->out_features()), dtype);
    }
    if (config.use_dora) w.add_vector(key_of(path, "lora_magnitude_vector"), a->magnitude(), dtype);
  }
  const std::vector<std::uint8_t> weights = w.serialize();
  const std::string config_text = config.dump();

  detail::make_directory(dir);
  const std::string weights_path = detail::join_path(dir, kWeightsFileName);
  std::optional<std::vector<std::uint8_t>> previous;
  {
    std::ifstream in(weights_path, std::ios::binary);
    if (in) previous.emplace(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  io::write_file_atomically(weights_path, weights.data(), weights.size());
  try {
    io::write_file_atomically(detail::join_path(dir, kConfigFileName), config_text);
  } catch (...) {
    if (previous) {
      try {
        io::write_file_atomically(weights_path, previous->data(), previous->size());
      } catch (...) {  // keep the first error; the weights file is complete either way
      }
    }
    throw;
  }
  return config;
}

/// Saves the adapters of layers (module path -> LoRALinear) as a PEFT adapter directory; see
/// write_adapter.
template <typename T, typename F>
AdapterConfig save_adapter(const std::string& dir,
                           const std::map<std::string, const LoRALinear<T, F>*>& layers,
                           const SaveOptions& options = {}) {
  std::map<std::string, const LoRAAdapter<T>*> adapters;
  for (const auto& [path, layer] : layers) {
    if (layer == nullptr)
      throw std::invalid_argument("save_adapter: the layer given for \"" + path + "\" is null");
    adapters.emplace(path, &layer->adapter());
  }
  return write_adapter<T>(dir, adapters, options);
}

/// As above for a map of non-const layer pointers (the one load_adapter takes).
template <typename T, typename F>
AdapterConfig save_adapter(const std::string& dir,
                           const std::map<std::string, LoRALinear<T, F>*>& layers,
                           const SaveOptions& options = {}) {
  return save_adapter<T, F>(
      dir, std::map<std::string, const LoRALinear<T, F>*>(layers.begin(), layers.end()), options);
}

/// Saves adapter `name` of MultiLoRALinear layers (module path -> layer) as a PEFT adapter
/// directory; see write_adapter.
template <typename T, typename F>
AdapterConfig save_adapter(const std::string& dir,
                           const std::map<std::string, const MultiLoRALinear<T, F>*>& layers,
                           const std::string& name, const SaveOptions& options = {}) {
  std::map<std::string, const LoRAAdapter<T>*> adapters;
  for (const auto& [path, layer] : layers) {
    if (layer == nullptr)
      throw std::invalid_argument("save_adapter: the layer given for \"" + path + "\" is null");
    adapters.emplace(path, &layer->adapter(name));
  }
  return write_adapter<T>(dir, adapters, options);
}

/// As above for a map of non-const layer pointers.
template <typename T, typename F>
AdapterConfig save_adapter(const std::string& dir,
                           const std::map<std::string, MultiLoRALinear<T, F>*>& layers,
                           const std::string& name, const SaveOptions& options = {}) {
  return save_adapter<T, F>(
      dir, std::map<std::string, const MultiLoRALinear<T, F>*>(layers.begin(), layers.end()), name,
      options);
}

}  // namespace lora::peft
