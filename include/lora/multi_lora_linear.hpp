// MultiLoRALinear<T, Frozen>: one frozen base W0 with many named LoRA adapters (one per task),
// PEFT's multi-adapter model in one layer: switch the active adapter in O(1), merge it for
// dense-speed inference, or serve a mixed batch where each column picks its own adapter (and
// train on one: backward_mixed). The face of AdapterLayer (adapter_layer.hpp) for many adapters.
#pragma once

#include "lora/adapter.hpp"
#include "lora/adapter_layer.hpp"
#include "lora/dense_frozen_weight.hpp"
#include "lora/detail/check.hpp"
#include "lora/parameter.hpp"
#include "lora/weighted_adapter.hpp"

#include <Eigen/Core>

#include <string>
#include <utility>
#include <vector>

namespace lora {

/// A frozen linear layer with named adapters, one of them active (or none: the base layer).
/// Switching while unmerged is O(1) and never touches W0; while merged, the old adapter's delta is
/// removed and the new one's added (O(d k)). With MergeMode::ExactRestore every unmerge gives W0
/// back bit for bit.
///
/// const members may be called from many threads at once (a training-mode forward with dropout
/// excepted); everything else needs exclusive access.
template <typename T, typename Frozen = DenseFrozenWeight<T>>
class MultiLoRALinear : public AdapterLayer<T, Frozen> {
  using Core = AdapterLayer<T, Frozen>;

 public:
  using Core::kNoAdapter;
  using typename Core::Adapter;
  using typename Core::Matrix;
  using typename Core::Vector;

  /// Wraps W0 (d x k; pass an rvalue to move it in), with an optional frozen bias of length d.
  explicit MultiLoRALinear(Matrix W0, Vector bias = Vector())
      : MultiLoRALinear(Frozen(checked(std::move(W0))), std::move(bias)) {}

  /// Wraps a frozen storage built by the caller (any storage: bf16, oneDNN, ...); its merge mode
  /// was chosen there.
  explicit MultiLoRALinear(Frozen frozen, Vector bias = Vector())
      : Core(std::move(frozen), std::move(bias), "MultiLoRALinear") {}

  // The multi-adapter part of AdapterLayer's API (protected there), public here; the rest of
  // AdapterLayer's public members are this class's by inheritance.
  using Core::adapter;
  using Core::adapter_count;
  using Core::adapter_index;
  using Core::adapter_names;
  using Core::add_adapter;
  using Core::has_adapter;
  using Core::parameters;
  using Core::remove_adapter;
  using Core::replace_adapter;

  using Core::active_name;
  using Core::disable;
  using Core::has_active;
  using Core::set_active;

  using Core::backward_mixed;
  using Core::backward_mixed_without_input_grad;
  using Core::forward_mixed;

  /// PEFT's add_weighted_adapter: adds adapter `name` = sum_i weights[i] s_i B_i A_i of the named
  /// adapters, exact (Combination::Cat) or truncated to rank svd_rank (Combination::Svd; 0: the
  /// largest input rank), computed from the factors (see combine_adapters). Returns it.
  Adapter& add_weighted_adapter(const std::string& name, const std::vector<std::string>& sources,
                                const std::vector<double>& weights, Combination how,
                                int svd_rank = 0) {
    std::vector<const Adapter*> parts;
    for (const auto& s : sources) parts.push_back(&std::as_const(*this).adapter(s));
    detail::require(!has_adapter(name),
                    "MultiLoRALinear::add_weighted_adapter: an adapter named \"", name,
                    "\" already exists");
    return add_adapter(name, combine_adapters<T>(parts, weights, how, svd_rank));
  }

 private:
  static Matrix checked(Matrix W0) {
    detail::require(W0.rows() >= 1 && W0.cols() >= 1,
                    "MultiLoRALinear: W0 must be at least 1 x 1, got ",
                    detail::shape_string(W0.rows(), W0.cols()));
    return W0;
  }
};

/// Adapter `name` of the layer as optimizer parameters (A, B and its lora bias when present),
/// named "<name>.A", ...; see parameter.hpp for how long they stay valid.
template <typename T, typename F>
std::vector<ParameterView<T>> adapter_parameters(MultiLoRALinear<T, F>& layer,
                                                 const std::string& name) {
  return layer.parameters(name);
}

}  // namespace lora
