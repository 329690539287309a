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
#include "lora/detail/compiled_mode.hpp"
#include "lora/io/atomic_file.hpp"
#include "lora/io/read_file.hpp"
#include "lora/io/safetensors.hpp"
#include "lora/io/safetensors_writer.hpp"
#include "lora/lora_linear.hpp"
#include "lora/multi_lora_linear.hpp"
#include "lora/peft/adapter_config.hpp"
#include "lora/plain_adapter.hpp"

#include <Eigen/Core>

#if LORA_WITH_BODIES
#include <sys/stat.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <sstream>
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
LORA_FUNC std::string key_of(const std::string& module, const char* tensor);

#if LORA_WITH_BODIES

LORA_FUNC std::string key_of(const std::string& module, const char* tensor) {
  return std::string(kKeyPrefix) + module + "." + tensor;
}

#endif  // LORA_WITH_BODIES

/// An adapter read from a directory: its config and one LoRAAdapter per module path.
template <typename T>
struct AdapterFile {
  AdapterConfig config;                           ///< adapter_config.json
  std::map<std::string, LoRAAdapter<T>> modules;  ///< module path -> its adapter
};

/// How adapters are read.
struct ReadOptions {
  /// Load lora_A, lora_B and lora_B.bias even when they hold NaN or infinity (or a value beyond
  /// the range of T, which becomes infinity). By default such a file is refused with a
  /// FormatError naming the tensor and the first bad element; PEFT loads it without a word.
  bool allow_non_finite = false;
};

namespace detail {

LORA_FUNC std::string join_path(const std::string& dir, const char* file);

LORA_FUNC bool ends_with(const std::string& s, const std::string& suffix);

/// Splits a PEFT key into (module path, tensor suffix); nothing for a key of another shape.
LORA_FUNC std::optional<std::pair<std::string, std::string>> split_key(const std::string& key);

#if LORA_WITH_BODIES

LORA_FUNC std::string join_path(const std::string& dir, const char* file) {
  if (dir.empty()) return file;
  return dir.back() == '/' ? dir + file : dir + "/" + file;
}

LORA_FUNC bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

LORA_FUNC std::optional<std::pair<std::string, std::string>> split_key(const std::string& key) {
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

#endif  // LORA_WITH_BODIES

/// Throws FormatError unless every element of `m` (tensor `key`, read as T) is finite: names the
/// first bad element in the file's row-major order, and says when the stored value was finite but
/// beyond T's range (an F64 1e300 read as float).
template <typename T, typename Derived>
void require_finite_tensor(const io::SafeTensors& st, const std::string& key,
                           const Eigen::MatrixBase<Derived>& m, const std::string& source) {
  if (m.allFinite()) return;
  for (Eigen::Index i = 0; i < m.rows(); ++i)
    for (Eigen::Index j = 0; j < m.cols(); ++j) {
      if (std::isfinite(m(i, j))) continue;
      const auto linear = static_cast<std::size_t>(i * m.cols() + j);
      const double stored = st.values<double>(key)[linear];
      std::ostringstream s;
      s.precision(17);
      s << "PEFT adapter \"" << source << "\": tensor " << io::quote_for_message(key) << " holds "
        << stored << " at [" << i;
      if (st.info(key).shape.size() == 2) s << ", " << j;
      s << "]";
      if (std::isfinite(stored))
        s << ", beyond the range of " << (std::is_same_v<T, float> ? "float" : "double");
      s << "; non-finite weights are refused (ReadOptions::allow_non_finite loads them anyway)";
      throw FormatError(s.str());
    }
}

template <typename T>
LoRAAdapter<T> make_adapter(const io::SafeTensors& st, const AdapterConfig& config,
                            const ModuleRules& rules, const std::string& module,
                            const std::string& source, const ReadOptions& options) {
  auto fail = [&](const std::string& what) {
    return FormatError("PEFT adapter \"" + source + "\": module " + io::quote_for_message(module) +
                       ": " + what);
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
  const LoRAConfig cfg = rules.lora_config_for(module);
  if (cfg.rank != a[0]) {
    const auto key = rules.rank_key(module);
    throw fail(
        "the config gives rank " + std::to_string(cfg.rank) +
        (key ? " (rank_pattern key " + io::quote_for_message(*key) + ")" : std::string(" (r)")) +
        " but lora_A is " + io::shape_to_string(a));
  }
  if (config.use_dora != st.contains(m_key))
    throw fail(config.use_dora
                   ? "use_dora is true (DoRA) but " + io::quote_for_message(m_key) + " is missing"
                   : io::quote_for_message(m_key) + " is present but use_dora (DoRA) is false");
  if (config.lora_bias != st.contains(bias_key))
    throw fail(config.lora_bias ? "lora_bias is true but \"" + bias_key + "\" is missing"
                                : "\"" + bias_key + "\" is present but lora_bias is false");
  if (cfg.rank > std::min(a[1], b[0]))
    throw fail("rank " + std::to_string(cfg.rank) + " exceeds min(out, in) of a " +
               std::to_string(b[0]) + " x " + std::to_string(a[1]) +
               " weight, which this library does not support");
  // s = alpha / r (or alpha / sqrt r) must be finite in T: lora_alpha 1e40 is a finite double
  // but an infinite float scaling, which would make every output NaN even with B = 0.
  const double scaling = cfg.scaling();
  if (!std::isfinite(static_cast<T>(scaling))) {
    const auto key = rules.alpha_key(module);
    std::ostringstream s;
    s << (key ? "alpha_pattern[" + io::quote_for_message(*key) + "]" : std::string("lora_alpha"))
      << " = " << cfg.alpha << " gives the scaling " << scaling << ", beyond the range of "
      << (std::is_same_v<T, float> ? "float" : "double");
    throw fail(s.str());
  }

  LoRAAdapter<T> adapter(b[0], a[1], cfg);
  {
    const auto A = st.matrix<T>(a_key);
    const auto B = st.matrix<T>(b_key);
    if (!options.allow_non_finite) {
      require_finite_tensor<T>(st, a_key, A, source);
      require_finite_tensor<T>(st, b_key, B, source);
    }
    adapter.set_weights(A, B);
  }
  if (config.lora_bias) {
    const auto& bias = st.info(bias_key).shape;
    if (bias.size() != 1 || bias[0] != b[0])
      throw fail("lora_B.bias must have shape [" + std::to_string(b[0]) + "], got " +
                 io::shape_to_string(bias));
    const auto v = st.vector<T>(bias_key);
    if (!options.allow_non_finite) require_finite_tensor<T>(st, bias_key, v, source);
    adapter.set_lora_bias(v);
  }
  if (config.use_dora) {
    const auto& m = st.info(m_key).shape;
    if (m.size() != 1 || m[0] != b[0])
      throw fail("lora_magnitude_vector must have shape [" + std::to_string(b[0]) + "], got " +
                 io::shape_to_string(m));
    const auto v = st.vector<T>(m_key);
    if (!options.allow_non_finite) require_finite_tensor<T>(st, m_key, v, source);
    adapter.set_magnitude(v);
  }
  return adapter;
}

}  // namespace detail

// ---- reading ------------------------------------------------------------------------------------

/// Checks and converts an adapter held in memory: `config` (an AdapterConfig already parsed) and
/// the safetensors file `weights`; `source` names it in messages. See read_adapter.
template <typename T>
AdapterFile<T> parse_adapter(AdapterConfig config, const io::SafeTensors& weights,
                             const std::string& source = "<memory>",
                             const ReadOptions& options = {}) {
  AdapterFile<T> out;
  out.config = std::move(config);
  out.config.require_supported(source);
  std::set<std::string> modules;
  for (const auto& key : weights.names()) {
    const auto split = detail::split_key(key);
    if (!split)
      throw FormatError("PEFT adapter \"" + source + "\": unexpected key " +
                        io::quote_for_message(key) + "; expected " + kKeyPrefix +
                        "<module>.lora_A.weight, .lora_B.weight, .lora_B.bias or "
                        ".lora_magnitude_vector");
    if (split->first.size() > kMaxModulePathLength)
      throw FormatError("PEFT adapter \"" + source + "\": a module path of " +
                        std::to_string(split->first.size()) + " characters exceeds the limit of " +
                        std::to_string(kMaxModulePathLength));
    modules.insert(split->first);
  }
  if (modules.empty()) throw FormatError("PEFT adapter \"" + source + "\" holds no LoRA tensors");
  const ModuleRules rules = out.config.rules(source);  // every pattern compiled once
  rules.check_modules({modules.begin(), modules.end()});
  for (const auto& m : modules)
    out.modules.emplace(m, detail::make_adapter<T>(weights, out.config, rules, m, source, options));
  return out;
}

/// As parse_adapter, from the text of adapter_config.json and the bytes of
/// adapter_model.safetensors (for example to check data that never touches the disk), with the
/// same limits as read_adapter (see AdapterConfig::parse).
template <typename T>
AdapterFile<T> parse_adapter(const std::string& config_json, std::vector<std::uint8_t> weights,
                             const std::string& source = "<memory>",
                             const ReadOptions& options = {}) {
  AdapterConfig config = AdapterConfig::parse(config_json, source);
  return parse_adapter<T>(std::move(config), io::SafeTensors::parse(std::move(weights), source),
                          source, options);
}

/// Reads and checks a PEFT adapter directory without any layer: the config (refusing what cannot
/// be applied: modules_to_save, ...), then one LoRAAdapter<T> per module, with the rank and
/// scaling PEFT gives it (r / lora_alpha, rank_pattern / alpha_pattern, use_rslora). Tensors of
/// any float dtype (F32, F16, BF16, F64) are converted to T. Throws FormatError, also for a
/// scaling or a weight that is not finite in T (see ReadOptions for the weights).
template <typename T>
AdapterFile<T> read_adapter(const std::string& dir, const ReadOptions& options = {}) {
  const std::string config_path = detail::join_path(dir, kConfigFileName);
  const std::string weights_path = detail::join_path(dir, kWeightsFileName);
  AdapterConfig config = AdapterConfig::load(config_path);
  config.require_supported(config_path);
  return parse_adapter<T>(std::move(config), io::SafeTensors::load(weights_path), dir, options);
}

namespace detail {

/// The Levenshtein distance between a and b (insertions, deletions, substitutions), O(|a| |b|).
LORA_FUNC std::size_t edit_distance(const std::string& a, const std::string& b);

/// ", closest in the file: \"a\", \"b\", \"c\"": up to three module paths of `file` nearest to
/// `path` (for a typo in a module name).
template <typename T>
std::string closest_modules(const AdapterFile<T>& file, const std::string& path) {
  std::vector<std::pair<std::size_t, const std::string*>> scored;
  for (const auto& [name, adapter] : file.modules)
    scored.emplace_back(edit_distance(path.substr(0, 4096), name), &name);
  const std::size_t n = std::min<std::size_t>(3, scored.size());
  std::partial_sort(scored.begin(), scored.begin() + static_cast<long>(n), scored.end(),
                    [](const auto& x, const auto& y) {
                      return x.first != y.first ? x.first < y.first : *x.second < *y.second;
                    });
  std::string out =
      "; the file's " + std::to_string(file.modules.size()) + " module(s) include, closest first: ";
  for (std::size_t i = 0; i < n; ++i)
    out += (i ? ", " : "") + io::quote_for_message(*scored[i].second);
  return out;
}

/// Throws std::invalid_argument when `layer` was already given for another module (`seen`: the
/// layers so far): one layer cannot take two modules' adapters.
LORA_FUNC void require_distinct_layer(std::map<const void*, std::string>& seen, const void* layer,
                                      const std::string& path);

#if LORA_WITH_BODIES

LORA_FUNC std::size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<std::size_t> row(b.size() + 1);
  for (std::size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (std::size_t i = 1; i <= a.size(); ++i) {
    std::size_t diagonal = row[0];
    row[0] = i;
    for (std::size_t j = 1; j <= b.size(); ++j) {
      const std::size_t up = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diagonal + (a[i - 1] != b[j - 1] ? 1 : 0)});
      diagonal = up;
    }
  }
  return row[b.size()];
}

LORA_FUNC void require_distinct_layer(std::map<const void*, std::string>& seen, const void* layer,
                                      const std::string& path) {
  const auto [it, fresh] = seen.emplace(layer, path);
  if (!fresh)
    throw std::invalid_argument("load_adapter: the same layer is given for modules " +
                                io::quote_for_message(it->second) + " and " +
                                io::quote_for_message(path));
}

#endif  // LORA_WITH_BODIES

/// Checks that `file` and `layers` name the same modules with the same shapes.
template <typename T, typename Layer>
void match_modules(const AdapterFile<T>& file, const std::map<std::string, Layer*>& layers,
                   const std::string& dir) {
  for (const auto& [path, layer] : layers) {
    if (layer == nullptr)
      throw std::invalid_argument("load_adapter: the layer given for " +
                                  io::quote_for_message(path) + " is null");
    const auto it = file.modules.find(path);
    if (it == file.modules.end())
      throw FormatError("PEFT adapter \"" + dir + "\" has no weights for module " +
                        io::quote_for_message(path) + " (missing " +
                        io::quote_for_message(key_of(path, "lora_A.weight")) + ")" +
                        closest_modules(file, path));
    const auto& a = it->second;
    if (a.out_features() != layer->out_features() || a.in_features() != layer->in_features())
      throw FormatError("PEFT adapter \"" + dir + "\": module " + io::quote_for_message(path) +
                        " is for a " +
                        lora::detail::shape_string(a.out_features(), a.in_features()) +
                        " (out x in) weight, but its layer's W0 is " +
                        lora::detail::shape_string(layer->out_features(), layer->in_features()));
  }
  for (const auto& [path, adapter] : file.modules)
    if (layers.count(path) == 0)
      throw FormatError("PEFT adapter \"" + dir + "\" has weights for module " +
                        io::quote_for_message(path) + " but no layer was given for it");
}

}  // namespace detail

/// Loads a PEFT adapter directory into LoRALinear layers, one per module path: each layer's
/// adapter is replaced (rank and scaling as the file says). Nothing is changed unless everything
/// fits: a module without a layer (the message lists the file's closest module names), a layer
/// without a module or a shape mismatch throws FormatError, a merged layer std::logic_error, one
/// layer given for two modules std::invalid_argument.
/// Returns the config read.
template <typename T, typename F>
AdapterConfig load_adapter(const std::string& dir,
                           const std::map<std::string, LoRALinear<T, F>*>& layers,
                           const ReadOptions& options = {}) {
  AdapterFile<T> file = read_adapter<T>(dir, options);
  detail::match_modules(file, layers, dir);
  std::map<const void*, std::string> seen;
  for (const auto& [path, layer] : layers) {
    detail::require_distinct_layer(seen, layer, path);
    lora::detail::require_state(!layer->is_merged(), "load_adapter: the layer of \"", path,
                                "\" is merged; unmerge it first");
  }
  // All or nothing: should a layer still refuse, the earlier ones get their adapters back.
  std::vector<std::pair<LoRALinear<T, F>*, LoRAAdapter<T>>> done;
  try {
    for (auto& [path, adapter] : file.modules) {
      LoRALinear<T, F>* layer = layers.at(path);
      LoRAAdapter<T> old = layer->adapter();
      layer->replace_adapter(adapter);
      done.emplace_back(layer, std::move(old));
    }
  } catch (...) {
    for (auto it = done.rbegin(); it != done.rend(); ++it) it->first->replace_adapter(it->second);
    throw;
  }
  return file.config;
}

/// Loads a PEFT adapter directory into MultiLoRALinear layers as the adapter named `name` (the
/// other adapters and the active one are unchanged). All-or-nothing as above; a layer that already
/// has an adapter `name`, or one layer given for two modules, throws std::invalid_argument before
/// anything is added; a layer that refuses the adapter (std::logic_error: a DoRA adapter into a
/// merged layer) leaves every layer as it was.
template <typename T, typename F>
AdapterConfig load_adapter(const std::string& dir,
                           const std::map<std::string, MultiLoRALinear<T, F>*>& layers,
                           const std::string& name, const ReadOptions& options = {}) {
  AdapterFile<T> file = read_adapter<T>(dir, options);
  detail::match_modules(file, layers, dir);
  std::map<const void*, std::string> seen;
  for (const auto& [path, layer] : layers) {
    detail::require_distinct_layer(seen, layer, path);
    lora::detail::require(!layer->has_adapter(name), "load_adapter: the layer of \"", path,
                          "\" already has an adapter named \"", name, "\"");
  }
  // All or nothing: a layer that refuses (a DoRA adapter needs W0's row norms, which a merged
  // layer no longer holds) has the adapter removed again from the layers before it.
  std::vector<MultiLoRALinear<T, F>*> done;
  try {
    for (auto& [path, adapter] : file.modules) {
      layers.at(path)->add_adapter(name, std::move(adapter));
      done.push_back(layers.at(path));
    }
  } catch (...) {
    for (auto it = done.rbegin(); it != done.rend(); ++it) (*it)->remove_adapter(name);
    throw;
  }
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
  /// PEFT's save_pretrained(path_initial_model_for_weight_conversion=...): a PiSSA, OLoRA or
  /// LoftQ adapter is written as the equivalent plain adapter of the ORIGINAL base
  /// (lora::plain_adapter: rank 2r, `init_lora_weights: true`), which loads onto the unmodified
  /// model. Without it such an adapter is written as it is, with init_lora_weights naming its
  /// init ("pissa", ...): it belongs on its residual base.
  bool convert_to_plain = false;
};

namespace detail {

/// An escaped regular expression for a literal module path (PEFT's keys are regexes).
LORA_FUNC std::string regex_escape(const std::string& s);

#if LORA_WITH_BODIES

LORA_FUNC std::string regex_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (std::string("\\^$.|?*+()[]{}").find(c) != std::string::npos) out += '\\';
    out += c;
  }
  return out;
}

#endif  // LORA_WITH_BODIES

/// Candidate defaults for r or lora_alpha: `first`, then the other values in `wanted` from the
/// most common to the least (ties: the smaller first).
template <typename V>
std::vector<V> default_candidates(const std::map<std::string, V>& wanted, V first) {
  std::map<V, std::size_t> votes;
  for (const auto& [path, v] : wanted) ++votes[v];
  std::vector<std::pair<std::size_t, V>> order;
  for (const auto& [v, n] : votes)
    if (v != first) order.emplace_back(n, v);
  std::stable_sort(order.begin(), order.end(),
                   [](const auto& x, const auto& y) { return x.first > y.first; });
  std::vector<V> out{first};
  for (const auto& [n, v] : order) out.push_back(v);
  return out;
}

/// PEFT's rank_pattern (or alpha_pattern) that, with the default `d`, gives every module its
/// `wanted` value: `base` (the base config's patterns), plus an escaped full-path key for each
/// module that they and `d` get wrong, sorted as PEFT reads them back (the file's keys are
/// sorted), keys that match no module dropped. Nothing when some module still resolves wrongly
/// (another module's key matches it first); `culprit` then names it.
template <typename V>
std::optional<std::vector<std::pair<std::string, V>>> express_patterns(
    V d, const std::vector<std::pair<std::string, V>>& base, const std::map<std::string, V>& wanted,
    const std::vector<std::string>& modules, std::string& culprit) {
  const PatternTable base_table(keys_of(base), "pattern", "save_adapter");
  std::map<std::string, V> patterns(base.begin(), base.end());
  for (const auto& m : modules) {
    const auto i = base_table.first_match(m);
    const V got = i ? base[*i].second : d;
    if (got != wanted.at(m)) patterns[regex_escape(m)] = wanted.at(m);
  }
  std::vector<std::pair<std::string, V>> sorted(patterns.begin(), patterns.end());
  {
    const PatternTable table(keys_of(sorted), "pattern", "save_adapter");
    std::vector<bool> used(sorted.size(), false);
    for (const auto& m : modules) table.mark_matches(m, used);
    std::vector<std::pair<std::string, V>> kept;
    for (std::size_t i = 0; i < sorted.size(); ++i)
      if (used[i]) kept.push_back(sorted[i]);
    sorted = std::move(kept);
  }
  const PatternTable table(keys_of(sorted), "pattern", "save_adapter");
  for (const auto& m : modules) {
    const auto i = table.first_match(m);
    if ((i ? sorted[*i].second : d) != wanted.at(m)) {
      culprit = m;
      return std::nullopt;
    }
  }
  return sorted;
}

/// The config that makes PEFT rebuild exactly these adapters (ranks, alphas, rsLoRA, lora_bias).
/// Without a base config, r and lora_alpha are the first of the modules' values (the most common
/// first) with which the patterns can express every module; only when none can, it throws.
template <typename T>
AdapterConfig config_for(const std::map<std::string, const LoRAAdapter<T>*>& adapters,
                         const SaveOptions& options) {
  AdapterConfig c = options.base ? *options.base : AdapterConfig{};
  std::vector<std::string> modules;
  bool any_bias = false;
  const bool rslora = adapters.begin()->second->config().use_rslora;
  const bool dora = adapters.begin()->second->uses_dora();
  std::map<std::pair<int, double>, int> votes;  // the most common (rank, alpha) is tried first
  std::map<std::string, int> ranks;
  std::map<std::string, double> alphas;
  for (const auto& [path, a] : adapters) {
    modules.push_back(path);
    any_bias = any_bias || a->has_lora_bias();
    if (a->config().use_rslora != rslora)
      throw std::invalid_argument("save_adapter: PEFT has one use_rslora per adapter, but module " +
                                  io::quote_for_message(path) + " differs from " +
                                  io::quote_for_message(adapters.begin()->first));
    if (a->uses_dora() != dora)
      throw std::invalid_argument("save_adapter: PEFT has one use_dora per adapter, but module " +
                                  io::quote_for_message(path) + " differs from " +
                                  io::quote_for_message(adapters.begin()->first));
    ++votes[{static_cast<int>(a->rank()), a->config().alpha}];
    ranks[path] = static_cast<int>(a->rank());
    alphas[path] = a->config().alpha;
  }
  c.use_rslora = rslora;
  c.use_dora = dora;
  c.lora_bias = any_bias;
  // PEFT has one init_lora_weights per adapter: a residual init names itself (its base is not
  // the original one); otherwise the base config's value, or PEFT's default `true`.
  for (const auto& [path, a] : adapters)
    if (a->needs_residual_base()) {
      c.init_lora_weights = peft_init_name(a->config().init, a->config().svd_iterations);
      break;
    }
  std::vector<int> rank_defaults{c.r};
  std::vector<double> alpha_defaults{c.lora_alpha};
  if (!options.base) {
    const auto best =
        std::max_element(votes.begin(), votes.end(),
                         [](const auto& x, const auto& y) { return x.second < y.second; });
    rank_defaults = default_candidates(ranks, best->first.first);
    alpha_defaults = default_candidates(alphas, best->first.second);
    c.target_modules = modules;  // full paths: PEFT adapts exactly these modules
    c.target_modules_regex.reset();
  }
  auto solve = [&](const auto& defaults, const auto& base, const auto& wanted, const char* what,
                   auto& out_default, auto& out_patterns) {
    std::string culprit, first_culprit;
    for (const auto& d : defaults) {
      if (auto p = express_patterns(d, base, wanted, modules, culprit)) {
        out_default = d;
        out_patterns = std::move(*p);
        return;
      }
      if (first_culprit.empty()) first_culprit = culprit;
    }
    throw std::invalid_argument(std::string("save_adapter: cannot express the ") + what +
                                " of module " + io::quote_for_message(first_culprit) +
                                " with PEFT's " + what + "_pattern: whichever default is chosen (" +
                                std::to_string(defaults.size()) +
                                " tried), another module's key matches it first");
  };
  solve(rank_defaults, c.rank_pattern, ranks, "rank", c.r, c.rank_pattern);
  solve(alpha_defaults, c.alpha_pattern, alphas, "alpha", c.lora_alpha, c.alpha_pattern);
  const ModuleRules rules = c.rules("save_adapter");
  for (const auto& path : modules)
    if (!rules.targets(path))
      throw std::invalid_argument("save_adapter: module " + io::quote_for_message(path) +
                                  " is not selected by the base config's target_modules");
  return c;
}

/// Creates `dir` unless it exists; returns true when it created it.
LORA_FUNC bool make_directory(const std::string& dir);

/// `path` normalised lexically, as Python's os.path.normpath: "." components and empty ones
/// ("a//b") dropped, "x/.." removed ("a/p1/../p2" is "a/p2"; "/.." is "/"), no trailing '/'.
/// The empty path stays empty; one that normalises to nothing is ".".
LORA_FUNC std::string normalize_path(const std::string& path);

/// Creates `dir` and its missing parents (mkdir -p); returns the folders it created, the deepest
/// last, so that a failed save can remove them again (see remove_directories).
LORA_FUNC std::vector<std::string> make_directories(const std::string& dir);

/// Removes the folders make_directories created, the deepest first (each only when empty).
LORA_FUNC void remove_directories(const std::vector<std::string>& created);

LORA_FUNC void require_not_directory(const std::string& path);

/// The file at `path` as it was before a save, so that a failed save can put it back: kept under a
/// second name (a hard link: putting it back is a rename, which needs no free space) or, where
/// the file system has no hard links, as a copy in memory. A path with no file is put back by
/// removing what the save wrote there.
class PreviousFile {
 public:
  explicit PreviousFile(const std::string& path);
  PreviousFile(const PreviousFile&) = delete;
  PreviousFile& operator=(const PreviousFile&) = delete;
  ~PreviousFile();

  /// Puts the previous file back (best effort: the first error is the one reported).
  void restore();

 private:
  std::string path_, kept_;
  bool existed_ = false;
  std::optional<std::vector<std::uint8_t>> copy_;
};

#if LORA_WITH_BODIES

LORA_FUNC bool make_directory(const std::string& dir) {
  if (::mkdir(dir.c_str(), 0777) == 0) return true;
  if (errno != EEXIST)
    throw io::WriteError("save_adapter: cannot create the folder \"" + dir +
                         "\": " + io::detail::errno_string(errno));
  struct stat st {};
  if (::stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode))
    throw io::WriteError("save_adapter: \"" + dir + "\" exists and is not a folder");
  return false;
}

LORA_FUNC std::string normalize_path(const std::string& path) {
  if (path.empty()) return path;
  const bool absolute = path.front() == '/';
  std::vector<std::string> parts;
  std::size_t begin = 0;
  while (begin <= path.size()) {
    std::size_t end = path.find('/', begin);
    if (end == std::string::npos) end = path.size();
    const std::string part = path.substr(begin, end - begin);
    if (part == "..") {
      if (!parts.empty() && parts.back() != "..") {
        parts.pop_back();
      } else if (!absolute) {
        parts.push_back(part);  // above the relative start: kept
      }
    } else if (!part.empty() && part != ".") {
      parts.push_back(part);
    }
    begin = end + 1;
  }
  std::string out = absolute ? "/" : "";
  for (std::size_t i = 0; i < parts.size(); ++i) out += (i ? "/" : "") + parts[i];
  return out.empty() ? "." : out;
}

LORA_FUNC std::vector<std::string> make_directories(const std::string& dir) {
  if (dir.empty()) make_directory(dir);  // throws: "" names no folder
  std::vector<std::string> created;
  try {
    for (std::size_t i = 1; i <= dir.size(); ++i) {
      if (i < dir.size() && dir[i] != '/') continue;
      if (dir[i - 1] == '/') continue;  // "a//b", or a trailing '/'
      const std::string prefix = dir.substr(0, i);
      if (make_directory(prefix)) created.push_back(prefix);
    }
  } catch (...) {
    for (auto it = created.rbegin(); it != created.rend(); ++it) ::rmdir(it->c_str());
    throw;
  }
  return created;
}

LORA_FUNC void remove_directories(const std::vector<std::string>& created) {
  for (auto it = created.rbegin(); it != created.rend(); ++it) ::rmdir(it->c_str());
}

LORA_FUNC void require_not_directory(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode))
    throw io::WriteError("save_adapter: \"" + path + "\" is a directory, not a file");
}

LORA_FUNC PreviousFile::PreviousFile(const std::string& path) : path_(path) {
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) {
    if (errno == ENOENT) return;
    throw io::WriteError("save_adapter: cannot inspect \"" + path +
                         "\": " + io::detail::errno_string(errno));
  }
  if (S_ISDIR(st.st_mode))
    throw io::WriteError("save_adapter: \"" + path + "\" is a directory, not a file");
  existed_ = true;
  for (int attempt = 0; attempt < 100; ++attempt) {
    const std::string name = io::detail::sibling_name(path, "keep");
    if (::link(path.c_str(), name.c_str()) == 0) {
      kept_ = name;
      return;
    }
    if (errno != EEXIST) break;
  }
  try {
    copy_ = io::read_file(path, "save_adapter");
  } catch (const io::FormatError& e) {
    throw io::WriteError(std::string(e.what()) + " (it would be replaced)");
  }
}

LORA_FUNC PreviousFile::~PreviousFile() {
  if (!kept_.empty()) ::unlink(kept_.c_str());
}

LORA_FUNC void PreviousFile::restore() {
  if (!existed_) {
    ::unlink(path_.c_str());
  } else if (!kept_.empty()) {
    if (::rename(kept_.c_str(), path_.c_str()) == 0) kept_.clear();
  } else if (copy_) {
    try {
      io::write_file_atomically(path_, copy_->data(), copy_->size());
    } catch (const io::WriteError&) {
    }
  }
}

#endif  // LORA_WITH_BODIES

/// Throws std::domain_error unless every element of `m` is finite, naming the tensor `key`.
template <typename Derived>
void require_finite_for_save(const std::string& key, const Eigen::MatrixBase<Derived>& m) {
  if (m.allFinite()) return;
  for (Eigen::Index j = 0; j < m.cols(); ++j)
    for (Eigen::Index i = 0; i < m.rows(); ++i)
      if (!std::isfinite(m(i, j))) {
        std::ostringstream s;
        s << "save_adapter: tensor " << io::quote_for_message(key) << " holds " << m(i, j)
          << " at [" << i << ", " << j << "]; an adapter with non-finite weights is not saved";
        throw std::domain_error(s.str());
      }
}

}  // namespace detail

/// Writes `adapters` (module path -> adapter) as a PEFT adapter directory that
/// PeftModel.from_pretrained loads: adapter_model.safetensors (PEFT's keys, with DoRA's
/// lora_magnitude_vector for DoRA adapters, metadata {"format": "pt"}) and adapter_config.json
/// (ranks and alphas, with rank_pattern/alpha_pattern entries where modules differ). A module
/// without a lora bias, in an adapter where others have one, gets a zero bias (PEFT's lora_bias is
/// per adapter). Both files are fully built before either is written, and each is replaced
/// atomically; a save that fails part-way leaves the directory as it was: the previous pair of
/// files, or no new file (and no new directory: missing parent folders are created, and removed
/// again when the save fails; `dir` is normalised lexically first, so "a/p1/../p2" creates only
/// a/p2). Throws std::invalid_argument (what PEFT cannot express),
/// std::domain_error (a non-finite weight, or one that `options.dtype` cannot hold) or
/// io::WriteError. Returns the config written.
template <typename T>
AdapterConfig write_adapter(const std::string& dir_as_given,
                            const std::map<std::string, const LoRAAdapter<T>*>& adapters,
                            const SaveOptions& options = {}) {
  // Normalised first, so that only the folders the final path needs are created ("a/p1/../p2"
  // creates a/p2, never a/p1).
  const std::string dir = detail::normalize_path(dir_as_given);
  if (adapters.empty()) throw std::invalid_argument("save_adapter: no modules to save");
  for (const auto& [path, a] : adapters) {
    if (a == nullptr)
      throw std::invalid_argument("save_adapter: the adapter of " + io::quote_for_message(path) +
                                  " is null");
    if (path.empty() || !detail::split_key(key_of(path, "lora_A.weight")))
      throw std::invalid_argument("save_adapter: bad module path " + io::quote_for_message(path));
  }
  if (options.convert_to_plain) {
    std::vector<LoRAAdapter<T>> plain;
    plain.reserve(adapters.size());
    std::map<std::string, const LoRAAdapter<T>*> converted;
    for (const auto& [path, a] : adapters) {
      plain.push_back(plain_adapter(*a));
      converted.emplace(path, &plain.back());
    }
    SaveOptions rest = options;
    rest.convert_to_plain = false;
    if (rest.base) rest.base->init_lora_weights = "true";
    return write_adapter<T>(dir, converted, rest);
  }
  const AdapterConfig config = detail::config_for(adapters, options);
  const io::DType dtype =
      options.dtype.value_or(std::is_same_v<T, double> ? io::DType::F64 : io::DType::F32);

  io::SafeTensorsWriter w;
  w.set_metadata("format", "pt");
  for (const auto& [path, a] : adapters) {
    detail::require_finite_for_save(key_of(path, "lora_A.weight"), a->A());
    detail::require_finite_for_save(key_of(path, "lora_B.weight"), a->B());
    w.add(key_of(path, "lora_A.weight"), a->A(), dtype);
    w.add(key_of(path, "lora_B.weight"), a->B(), dtype);
    if (config.lora_bias) {
      if (a->has_lora_bias()) {
        detail::require_finite_for_save(key_of(path, "lora_B.bias"), a->lora_bias());
        w.add_vector(key_of(path, "lora_B.bias"), a->lora_bias(), dtype);
      } else {
        w.add_vector(key_of(path, "lora_B.bias"),
                     Eigen::Matrix<T, Eigen::Dynamic, 1>::Zero(a->out_features()), dtype);
      }
    }
    if (config.use_dora) {
      detail::require_finite_for_save(key_of(path, "lora_magnitude_vector"), a->magnitude());
      w.add_vector(key_of(path, "lora_magnitude_vector"), a->magnitude(), dtype);
    }
  }
  const std::vector<std::uint8_t> weights = w.serialize();
  const std::string config_text = config.dump();

  const std::vector<std::string> created = detail::make_directories(dir);
  const std::string weights_path = detail::join_path(dir, kWeightsFileName);
  const std::string config_path = detail::join_path(dir, kConfigFileName);
  try {
    detail::require_not_directory(config_path);  // found now, before the weights are written
    detail::PreviousFile previous_weights(weights_path);
    io::write_file_atomically(weights_path, weights.data(), weights.size());
    try {
      io::write_file_atomically(config_path, config_text);
    } catch (...) {
      previous_weights.restore();
      throw;
    }
  } catch (...) {
    detail::remove_directories(created);  // each only succeeds when it is empty again
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
