// lora::summary(layers): trainable and total parameters of a model given as the name -> layer map
// that save_adapter and load_adapter take, printed as PEFT's print_trainable_parameters does:
//   trainable params: 1,234 || all params: 56,789 || trainable%: 2.1730
#pragma once

#include "lora/detail/compiled_mode.hpp"

#include <Eigen/Core>

#include <cstdio>
#include <map>
#include <ostream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

namespace lora {

/// Parameter counts of a model: what an optimizer trains (every adapter's A, B and lora bias)
/// and everything (those plus each frozen W0 and bias).
struct ParameterSummary {
  Eigen::Index trainable = 0;  ///< sum over layers of trainable_parameter_count()
  Eigen::Index total = 0;      ///< trainable plus sum over layers of frozen_parameter_count()

  /// 100 * trainable / total (0 for an empty model).
  double trainable_percent() const {
    return total == 0 ? 0.0 : 100.0 * static_cast<double>(trainable) / static_cast<double>(total);
  }

  /// "trainable params: 1,234 || all params: 56,789 || trainable%: 2.1730" (PEFT's wording).
  std::string to_string() const;

 private:
  // n with a comma every three digits, as Python's "{:,d}".
  static std::string grouped(Eigen::Index n);
};

#if LORA_WITH_BODIES

LORA_FUNC std::string ParameterSummary::to_string() const {
  char percent[64];
  std::snprintf(percent, sizeof percent, "%.4f", trainable_percent());
  return "trainable params: " + grouped(trainable) + " || all params: " + grouped(total) +
         " || trainable%: " + percent;
}

LORA_FUNC std::string ParameterSummary::grouped(Eigen::Index n) {
  std::string digits = std::to_string(n < 0 ? -n : n);
  for (auto i = static_cast<long>(digits.size()) - 3; i > 0; i -= 3)
    digits.insert(static_cast<std::size_t>(i), 1, ',');
  return n < 0 ? "-" + digits : digits;
}

#endif  // LORA_WITH_BODIES

/// Writes s.to_string().
inline std::ostream& operator<<(std::ostream& os, const ParameterSummary& s) {
  return os << s.to_string();
}

namespace detail {

template <typename L>
const auto& deref_layer(const L& layer) {
  if constexpr (std::is_pointer_v<L>)
    return *layer;
  else
    return layer;
}

}  // namespace detail

/// Trainable and total parameters of `layers`: any range of (name, layer) pairs, such as the
/// std::map<std::string, LoRALinear<T>*> that save_adapter takes or the
/// std::map<std::string, LoRALinear<T>> that peft::make_layers returns (layers or pointers to
/// them, LoRALinear or MultiLoRALinear). Every adapter of a layer counts as trainable. Throws
/// std::invalid_argument for a null layer.
template <typename Layers>
ParameterSummary summary(const Layers& layers) {
  ParameterSummary s;
  for (const auto& [name, layer] : layers) {
    if constexpr (std::is_pointer_v<std::decay_t<decltype(layer)>>)
      if (layer == nullptr)
        throw std::invalid_argument("lora::summary: the layer given for \"" + std::string(name) +
                                    "\" is null");
    const auto& l = detail::deref_layer(layer);
    s.trainable += l.trainable_parameter_count();
    s.total += l.trainable_parameter_count() + l.frozen_parameter_count();
  }
  return s;
}

/// One layer's parameter counts, taken from a layer or a pointer to one (LoRALinear or
/// MultiLoRALinear, any scalar and storage), for the braced-list summary():
/// `summary({{"fc1", &fc1}, {"fc2", &fc2}})`. Throws std::invalid_argument for a null pointer.
class LayerCounts {
 public:
  /// Counts `layer` (a layer, or a pointer to one) now.
  template <typename L, typename = decltype(detail::deref_layer(std::declval<const L&>())
                                                .frozen_parameter_count())>
  LayerCounts(const L& layer)  // NOLINT(google-explicit-constructor): braced lists need it
  {
    if constexpr (std::is_pointer_v<L>)
      if (layer == nullptr) throw std::invalid_argument("lora::summary: a layer given is null");
    const auto& l = detail::deref_layer(layer);
    trainable_ = l.trainable_parameter_count();
    frozen_ = l.frozen_parameter_count();
  }
  Eigen::Index trainable_parameter_count() const { return trainable_; }  ///< the adapters'
  Eigen::Index frozen_parameter_count() const { return frozen_; }        ///< W0's and the bias's

 private:
  Eigen::Index trainable_ = 0, frozen_ = 0;
};

/// summary() for a braced list of layers or pointers to them, as save_adapter takes:
/// `std::cout << lora::summary({{"fc1", &fc1}, {"fc2", &fc2}})`.
LORA_FUNC ParameterSummary summary(const std::map<std::string, LayerCounts>& layers);

#if LORA_WITH_BODIES

LORA_FUNC ParameterSummary summary(const std::map<std::string, LayerCounts>& layers) {
  return summary<std::map<std::string, LayerCounts>>(layers);
}

#endif  // LORA_WITH_BODIES

}  // namespace lora
