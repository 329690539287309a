// Building layers straight from a PEFT adapter directory, as PeftModel.from_pretrained does: the
// rank, scaling and lora bias of each module come from the file, the frozen W0 (and bias) from the
// caller's base weights (module path -> W0, out x in). And save_adapter / load_adapter for a braced
// list of layers, `save_adapter("out", {{"fc1", &fc1}, {"fc2", &fc2}})`, which the templates in
// adapter_io.hpp cannot take (a braced list deduces no template parameter).
#pragma once

#include "lora/detail/compiled_mode.hpp"
#include "lora/lora_linear.hpp"
#include "lora/multi_lora_linear.hpp"
#include "lora/peft/adapter_io.hpp"

#include <Eigen/Core>

#include <algorithm>
#include <functional>
#include <map>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

namespace lora::peft {

/// Base weights by module path: W0 (out x in, torch.nn.Linear.weight's layout) of each module.
template <typename T>
using BaseWeights = std::map<std::string, Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>>;
/// Frozen biases by module path (length out); modules without one are left out.
template <typename T>
using BaseBiases = std::map<std::string, Eigen::Matrix<T, Eigen::Dynamic, 1>>;

namespace detail {

/// ", closest given: \"a\", \"b\"": up to three keys of `names` nearest to `path`.
template <typename Map>
std::string closest_keys(const Map& names, const std::string& path, const char* what) {
  std::vector<std::pair<std::size_t, const std::string*>> scored;
  for (const auto& entry : names)
    scored.emplace_back(edit_distance(path.substr(0, 4096), entry.first), &entry.first);
  const std::size_t n = std::min<std::size_t>(3, scored.size());
  std::partial_sort(scored.begin(), scored.begin() + static_cast<long>(n), scored.end(),
                    [](const auto& x, const auto& y) {
                      return x.first != y.first ? x.first < y.first : *x.second < *y.second;
                    });
  std::string out = std::string("; the ") + what + " name " + std::to_string(names.size()) +
                    " module(s), closest first: ";
  for (std::size_t i = 0; i < n; ++i)
    out += (i ? ", " : "") + io::quote_for_message(*scored[i].second);
  return out;
}

/// Checks that the file's modules and the base weights (and biases) name the same modules with
/// shapes that fit; throws FormatError naming the first that does not.
template <typename T>
void match_base(const AdapterFile<T>& file, const BaseWeights<T>& weights,
                const BaseBiases<T>& biases, const std::string& dir) {
  // A base weight the file does not know first: most likely a typo, named with the file's
  // closest module paths.
  for (const auto& [path, w] : weights)
    if (file.modules.count(path) == 0)
      throw FormatError(
          "make_layers: a base weight was given for module " + io::quote_for_message(path) +
          " but PEFT adapter \"" + dir + "\" has no weights for it (missing " +
          io::quote_for_message(key_of(path, "lora_A.weight")) + ")" + closest_modules(file, path));
  for (const auto& [path, adapter] : file.modules) {
    const auto it = weights.find(path);
    if (it == weights.end())
      throw FormatError("make_layers: PEFT adapter \"" + dir + "\" adapts module " +
                        io::quote_for_message(path) + " but no base weight was given for it" +
                        closest_keys(weights, path, "base weights"));
    if (it->second.rows() != adapter.out_features() || it->second.cols() != adapter.in_features())
      throw FormatError("make_layers: PEFT adapter \"" + dir + "\": module " +
                        io::quote_for_message(path) + " is for a " +
                        lora::detail::shape_string(adapter.out_features(), adapter.in_features()) +
                        " (out x in) weight, but its base weight is " +
                        lora::detail::shape_string(it->second.rows(), it->second.cols()));
  }
  for (const auto& [path, b] : biases) {
    const auto it = weights.find(path);
    if (it == weights.end())
      throw std::invalid_argument("make_layers: a bias was given for module " +
                                  io::quote_for_message(path) + " but no base weight" +
                                  closest_keys(weights, path, "base weights"));
    if (b.size() != it->second.rows())
      throw std::invalid_argument("make_layers: the bias of module " + io::quote_for_message(path) +
                                  " has length " + std::to_string(b.size()) + ", expected " +
                                  std::to_string(it->second.rows()) + " (out)");
  }
}

}  // namespace detail

/// Builds one LoRALinear per module of the PEFT adapter directory `dir`, as
/// PeftModel.from_pretrained does: W0 from `base_weights` (module path -> W0, out x in), the frozen
/// bias from `biases` where given, and the adapter (rank, scaling, lora bias, weights) from the
/// file. The base weights must name exactly the file's modules, with shapes that fit: otherwise
/// FormatError names the module (and the closest names, for a typo); a bias of the wrong length
/// or for an unknown module throws std::invalid_argument. Other errors as read_adapter.
///
/// `Frozen` is the storage each W0 is put in (DenseFrozenWeight<T> by default), built as
/// `Frozen(W0, storage_args...)`: so a QLoRA user writes
/// `make_layers<float, Nf4FrozenWeight>(dir, weights)`, or with the storage's options
/// `make_layers<float, Bf16FrozenWeight>(dir, weights, {}, {}, MergeMode::ExactRestore,
/// Bf16Backend::Portable)`. A storage's own errors (an NF4 W0 holding NaN, say) propagate.
/// Returns the layers by module path.
template <typename T, typename Frozen = DenseFrozenWeight<T>, typename... StorageArgs>
std::map<std::string, LoRALinear<T, Frozen>> make_layers(const std::string& dir,
                                                         const BaseWeights<T>& base_weights,
                                                         const BaseBiases<T>& biases = {},
                                                         const ReadOptions& options = {},
                                                         const StorageArgs&... storage_args) {
  const AdapterFile<T> file = read_adapter<T>(dir, options);
  detail::match_base(file, base_weights, biases, dir);
  using Layer = LoRALinear<T, Frozen>;
  std::map<std::string, Layer> layers;
  for (const auto& [path, adapter] : file.modules) {
    const auto bias = biases.find(path);
    Layer layer(Frozen(base_weights.at(path), storage_args...),
                bias == biases.end() ? typename Layer::Vector() : bias->second, adapter.config());
    layer.replace_adapter(adapter);
    layers.emplace(path, std::move(layer));
  }
  return layers;
}

/// As make_layers, building MultiLoRALinear layers (W0 in `Frozen`, built from `storage_args` as
/// there) that hold the file's adapter under `name`, active; more task adapters can then be added
/// (load_adapter with a name) and switched with set_active.
template <typename T, typename Frozen = DenseFrozenWeight<T>, typename... StorageArgs>
std::map<std::string, MultiLoRALinear<T, Frozen>> make_multi_layers(
    const std::string& dir, const BaseWeights<T>& base_weights, const std::string& name,
    const BaseBiases<T>& biases = {}, const ReadOptions& options = {},
    const StorageArgs&... storage_args) {
  AdapterFile<T> file = read_adapter<T>(dir, options);
  detail::match_base(file, base_weights, biases, dir);
  using Layer = MultiLoRALinear<T, Frozen>;
  std::map<std::string, Layer> layers;
  for (auto& [path, adapter] : file.modules) {
    const auto bias = biases.find(path);
    Layer layer(Frozen(base_weights.at(path), storage_args...),
                bias == biases.end() ? typename Layer::Vector() : bias->second);
    layer.add_adapter(name, std::move(adapter));
    layer.set_active(name);
    layers.emplace(path, std::move(layer));
  }
  return layers;
}

// ---- braced lists of layers ---------------------------------------------------------------------

/// A LoRALinear or MultiLoRALinear layer (of any scalar and storage) in a braced list for
/// save_adapter and load_adapter: `{{"fc1", &fc1}, {"fc2", &fc2}}`. Holds a pointer: the layer
/// must outlive it. A pointer to const can be saved, not loaded into.
class LayerRef {
 public:
  /// Refers to `layer`, which save_adapter reads and load_adapter may change.
  template <typename T, typename F>
  LayerRef(LoRALinear<T, F>* layer)  // NOLINT(google-explicit-constructor): braced lists need it
      : LayerRef(static_cast<const LoRALinear<T, F>*>(layer)) {
    if (layer == nullptr) return;
    writable_ = true;
    ops<T>().put = [layer](LoRAAdapter<T> a, const std::string&) {
      LoRAAdapter<T> old = layer->adapter();  // to put back if a later layer refuses
      layer->replace_adapter(a);
      return std::function<void()>([layer, old] { layer->replace_adapter(old); });
    };
  }
  /// Refers to `layer` for save_adapter only.
  template <typename T, typename F>
  LayerRef(const LoRALinear<T, F>* layer)  // NOLINT(google-explicit-constructor)
  {
    if (layer == nullptr) return;
    init<T>(*layer, false);
    ops<T>().get = [layer](const std::string&) { return &layer->adapter(); };
  }
  /// Refers to `layer`, whose adapter of the name given to save_adapter or load_adapter is read
  /// or added.
  template <typename T, typename F>
  LayerRef(MultiLoRALinear<T, F>* layer)  // NOLINT(google-explicit-constructor)
      : LayerRef(static_cast<const MultiLoRALinear<T, F>*>(layer)) {
    if (layer == nullptr) return;
    writable_ = true;
    ops<T>().put = [layer](LoRAAdapter<T> a, const std::string& name) {
      layer->add_adapter(name, std::move(a));
      return std::function<void()>([layer, name] { layer->remove_adapter(name); });
    };
  }
  /// Refers to `layer` for save_adapter only.
  template <typename T, typename F>
  LayerRef(const MultiLoRALinear<T, F>* layer)  // NOLINT(google-explicit-constructor)
  {
    if (layer == nullptr) return;
    init<T>(*layer, true);
    ops<T>().get = [layer](const std::string& name) { return &layer->adapter(name); };
    ops<T>().has = [layer](const std::string& name) { return layer->has_adapter(name); };
  }

  /// True for a null layer.
  bool is_null() const { return scalar_ == 0; }
  /// True when the layer's scalar is T.
  template <typename T>
  bool holds() const {
    return scalar_ == (std::is_same_v<T, float> ? 1 : 2);
  }
  /// True for a MultiLoRALinear layer (whose adapters are named).
  bool is_multi() const { return multi_; }
  /// True for a layer given by a pointer to non-const (which load_adapter may change).
  bool is_writable() const { return writable_; }
  Eigen::Index out_features() const { return out_; }  ///< d
  Eigen::Index in_features() const { return in_; }    ///< k
  /// Whether the layer is merged now.
  bool is_merged() const { return merged_ && merged_(); }
  /// Whether a MultiLoRALinear layer has an adapter `name` (false for a LoRALinear).
  template <typename T>
  bool has_adapter(const std::string& name) const {
    return ops<T>().has && ops<T>().has(name);
  }
  /// The layer's adapter (`name` of a MultiLoRALinear; ignored for a LoRALinear).
  template <typename T>
  const LoRAAdapter<T>& adapter(const std::string& name = {}) const {
    return *ops<T>().get(name);
  }
  /// LoRALinear::replace_adapter, or MultiLoRALinear::add_adapter(name, a); only for a writable
  /// layer of scalar T. Returns what undoes it (puts the old adapter back, or removes the new one).
  template <typename T>
  std::function<void()> put_adapter(LoRAAdapter<T> a, const std::string& name = {}) const {
    return ops<T>().put(std::move(a), name);
  }
  /// The layer's address: two refs to one layer have the same.
  const void* address() const { return address_; }

 private:
  template <typename T>
  struct Ops {
    std::function<const LoRAAdapter<T>*(const std::string&)> get;
    std::function<std::function<void()>(LoRAAdapter<T>, const std::string&)> put;
    std::function<bool(const std::string&)> has;
  };

  template <typename T, typename L>
  void init(const L& layer, bool multi) {
    scalar_ = std::is_same_v<T, float> ? 1 : 2;
    multi_ = multi;
    out_ = layer.out_features();
    in_ = layer.in_features();
    merged_ = [&layer] { return layer.is_merged(); };
    address_ = &layer;
  }
  template <typename T>
  Ops<T>& ops() {
    if constexpr (std::is_same_v<T, float>)
      return float_;
    else
      return double_;
  }
  template <typename T>
  const Ops<T>& ops() const {
    if constexpr (std::is_same_v<T, float>)
      return float_;
    else
      return double_;
  }

  int scalar_ = 0;  // 0: null, 1: float, 2: double
  bool multi_ = false, writable_ = false;
  Eigen::Index out_ = 0, in_ = 0;
  const void* address_ = nullptr;
  std::function<bool()> merged_;
  Ops<float> float_;
  Ops<double> double_;
};

/// Layers by module path in a braced list: `{{"fc1", &fc1}, {"fc2", &fc2}}`.
using LayerRefs = std::map<std::string, LayerRef>;

namespace detail {

/// True when the layers are float, false when double; throws std::invalid_argument for an empty
/// list, a null layer, a mix of float and double, of LoRALinear and MultiLoRALinear, or a name
/// given (or not) where the kind of layer wants the opposite.
LORA_FUNC bool check_refs(const LayerRefs& layers, const char* who, bool named);

template <typename T>
AdapterConfig load_refs(const std::string& dir, const LayerRefs& layers, const std::string& name,
                        const ReadOptions& options) {
  for (const auto& [path, ref] : layers)
    if (!ref.is_writable())
      throw std::invalid_argument("load_adapter: the layer given for " +
                                  io::quote_for_message(path) + " is const");
  AdapterFile<T> file = read_adapter<T>(dir, options);
  std::map<std::string, const LayerRef*> pointers;
  std::map<const void*, std::string> seen;
  for (const auto& [path, ref] : layers) {
    pointers.emplace(path, &ref);
    require_distinct_layer(seen, ref.address(), path);
  }
  match_modules(file, pointers, dir);
  for (const auto& [path, ref] : layers) {
    if (ref.is_multi())
      lora::detail::require(!ref.template has_adapter<T>(name), "load_adapter: the layer of \"",
                            path, "\" already has an adapter named \"", name, "\"");
    else
      lora::detail::require_state(!ref.is_merged(), "load_adapter: the layer of \"", path,
                                  "\" is merged; unmerge it first");
  }
  // All or nothing: a layer that refuses (a DoRA adapter needing W0's row norms from a merged
  // layer, ...) undoes what the earlier layers took.
  std::vector<std::function<void()>> undo;
  try {
    for (auto& [path, adapter] : file.modules)
      undo.push_back(layers.at(path).template put_adapter<T>(std::move(adapter), name));
  } catch (...) {
    for (auto it = undo.rbegin(); it != undo.rend(); ++it) (*it)();
    throw;
  }
  return file.config;
}

template <typename T>
AdapterConfig save_refs(const std::string& dir, const LayerRefs& layers, const std::string& name,
                        const SaveOptions& options) {
  std::map<std::string, const LoRAAdapter<T>*> adapters;
  for (const auto& [path, ref] : layers) adapters.emplace(path, &ref.template adapter<T>(name));
  return write_adapter<T>(dir, adapters, options);
}

#if LORA_WITH_BODIES

LORA_FUNC bool check_refs(const LayerRefs& layers, const char* who, bool named) {
  const auto fail = [who](const std::string& what) {
    return std::invalid_argument(std::string(who) + ": " + what);
  };
  if (layers.empty()) throw fail("no layers given");
  for (const auto& [path, ref] : layers)
    if (ref.is_null())
      throw fail("the layer given for " + io::quote_for_message(path) + " is null");
  const auto& [first_path, first] = *layers.begin();
  for (const auto& [path, ref] : layers) {
    if (ref.holds<float>() != first.holds<float>())
      throw fail("the layers mix float and double (" + io::quote_for_message(first_path) + " and " +
                 io::quote_for_message(path) + ")");
    if (ref.is_multi() != named)
      throw fail(named ? "an adapter name is given but the layer of " +
                             io::quote_for_message(path) + " is a LoRALinear"
                       : "the layer of " + io::quote_for_message(path) +
                             " is a MultiLoRALinear: give the adapter's name");
  }
  return first.holds<float>();
}

#endif  // LORA_WITH_BODIES

}  // namespace detail

/// save_adapter for a braced list of LoRALinear layers (float or double, one kind per call):
/// `save_adapter("out", {{"fc1", &fc1}, {"fc2", &fc2}})`. See write_adapter.
LORA_FUNC AdapterConfig save_adapter(const std::string& dir, const LayerRefs& layers,
                                     const SaveOptions& options = {});

/// save_adapter for adapter `name` of a braced list of MultiLoRALinear layers:
/// `save_adapter("out", {{"fc1", &fc1}}, "task_a")`.
LORA_FUNC AdapterConfig save_adapter(const std::string& dir, const LayerRefs& layers,
                                     const std::string& name, const SaveOptions& options = {});

/// load_adapter for a braced list of LoRALinear layers: `load_adapter("out", {{"fc1", &fc1}})`,
/// all-or-nothing as the map overload.
LORA_FUNC AdapterConfig load_adapter(const std::string& dir, const LayerRefs& layers,
                                     const ReadOptions& options = {});

/// load_adapter for a braced list of MultiLoRALinear layers, adding the file's adapter as `name`:
/// `load_adapter("out", {{"fc1", &fc1}}, "task_b")`; all-or-nothing as the map overload.
LORA_FUNC AdapterConfig load_adapter(const std::string& dir, const LayerRefs& layers,
                                     const std::string& name, const ReadOptions& options = {});

#if LORA_WITH_BODIES

LORA_FUNC AdapterConfig save_adapter(const std::string& dir, const LayerRefs& layers,
                                     const SaveOptions& options) {
  return detail::check_refs(layers, "save_adapter", false)
             ? detail::save_refs<float>(dir, layers, {}, options)
             : detail::save_refs<double>(dir, layers, {}, options);
}

LORA_FUNC AdapterConfig save_adapter(const std::string& dir, const LayerRefs& layers,
                                     const std::string& name, const SaveOptions& options) {
  return detail::check_refs(layers, "save_adapter", true)
             ? detail::save_refs<float>(dir, layers, name, options)
             : detail::save_refs<double>(dir, layers, name, options);
}

LORA_FUNC AdapterConfig load_adapter(const std::string& dir, const LayerRefs& layers,
                                     const ReadOptions& options) {
  return detail::check_refs(layers, "load_adapter", false)
             ? detail::load_refs<float>(dir, layers, {}, options)
             : detail::load_refs<double>(dir, layers, {}, options);
}

LORA_FUNC AdapterConfig load_adapter(const std::string& dir, const LayerRefs& layers,
                                     const std::string& name, const ReadOptions& options) {
  return detail::check_refs(layers, "load_adapter", true)
             ? detail::load_refs<float>(dir, layers, name, options)
             : detail::load_refs<double>(dir, layers, name, options);
}

#endif  // LORA_WITH_BODIES

}  // namespace lora::peft
