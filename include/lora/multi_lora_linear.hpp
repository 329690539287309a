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
/// or a DoRA adapter excepted); everything else needs exclusive access.
template <typename T, typename Frozen = DenseFrozenWeight<T>>
class MultiLoRALinear : public AdapterLayer<T, Frozen> {
  using Core = AdapterLayer<T, Frozen>;

 public:
  using Core::kNoAdapter;
  using typename Core::Adapter;
  using typename Core::Matrix;
  using typename Core::Vector;

  /// Wraps W0 (d x k; pass an rvalue to move it in), with an optional frozen bias of length d.
  explicit MultiLoRALinear(Matrix W0, Vector bias = Vector());

  /// Wraps a frozen storage built by the caller (any storage: bf16, oneDNN, ...); its merge mode
  /// was chosen there.
  explicit MultiLoRALinear(Frozen frozen, Vector bias = Vector());

  // The multi-adapter part of AdapterLayer's API (protected there), public here; the rest of
  // AdapterLayer's public members are this class's by inheritance.
  using Core::adapter;
  using Core::adapter_count;
  using Core::adapter_index;
  using Core::adapter_names;
  using Core::has_adapter;
  using Core::parameters;
  using Core::remove_adapter;
  using Core::replace_adapter;

  using Core::active_name;
  using Core::disable;
  using Core::has_active;
  using Core::set_active;

  /// Adds a fresh adapter (A drawn as cfg says, B = 0; DoRA's m = the row norms of W0) named
  /// `name` and returns it. As PEFT, the first adapter of a layer becomes active (a forward right
  /// after uses it); later ones do not change the active adapter (set_active switches). Throws
  /// std::invalid_argument for an empty name, a name in use, or a config that does not fit W0.
  Adapter& add_adapter(const std::string& name, const LoRAConfig& cfg) {
    return activate_if_first(Core::add_adapter(name, cfg), name);
  }
  /// As above for a PiSSA, OLoRA or LoftQ config, factoring `original`: the full-precision W0
  /// the storage was built from (d x k); see AdapterLayer::add_adapter.
  Adapter& add_adapter(const std::string& name, const LoRAConfig& cfg,
                       const Eigen::Ref<const Matrix>& original) {
    return activate_if_first(Core::add_adapter(name, cfg, original), name);
  }
  /// As above, forming the residual in `original` itself (a d x k matrix the caller gives up).
  Adapter& add_adapter(const std::string& name, const LoRAConfig& cfg, Matrix&& original) {
    return activate_if_first(Core::add_adapter(name, cfg, std::move(original)), name);
  }
  /// Adds `adapter` (for this layer's d x k weight, e.g. one loaded from a file) under `name`,
  /// activating it when it is the layer's first, as above.
  Adapter& add_adapter(const std::string& name, Adapter adapter) {
    return activate_if_first(Core::add_adapter(name, std::move(adapter)), name);
  }

  using Core::backward_mixed;
  using Core::backward_mixed_without_input_grad;
  using Core::forward_mixed;

  /// PEFT's add_weighted_adapter: adds adapter `name` = sum_i weights[i] s_i B_i A_i of the named
  /// adapters, exact (Combination::Cat) or truncated to rank svd_rank (Combination::Svd; 0: the
  /// largest input rank), computed from the factors (see combine_adapters). Returns it. DoRA
  /// adapters cannot be combined this way (their magnitudes scale each adapter's whole weight):
  /// std::invalid_argument.
  Adapter& add_weighted_adapter(const std::string& name, const std::vector<std::string>& sources,
                                const std::vector<double>& weights, Combination how,
                                int svd_rank = 0) {
    CombineOptions options;
    options.svd_rank = svd_rank;
    return add_weighted_adapter(name, sources, weights, how, options);
  }

  /// As above, for every PEFT combination_type (Combination::Linear, Ties, DareLinear, DareTies,
  /// MagnitudePrune and their Svd forms) with its options: density, majority sign, DARE's seed
  /// and the Svd forms' rank (see combine_adapters for the formulas, PEFT's).
  Adapter& add_weighted_adapter(const std::string& name, const std::vector<std::string>& sources,
                                const std::vector<double>& weights, Combination how,
                                const CombineOptions& options);

 private:
  Adapter& activate_if_first(Adapter& added, const std::string& name) {
    if (adapter_count() == 1 && !has_active()) Core::set_active(name);
    return added;
  }

  static Matrix checked(Matrix W0);
};

// The members with bodies, out of the class so that they are not inline: a file that sees
// `extern template class MultiLoRALinear<T, F>` (lora/extern_templates.hpp) does not instantiate
// them.

template <typename T, typename Frozen>
MultiLoRALinear<T, Frozen>::MultiLoRALinear(Matrix W0, Vector bias)
    : MultiLoRALinear(Frozen(checked(std::move(W0))), std::move(bias)) {}

template <typename T, typename Frozen>
MultiLoRALinear<T, Frozen>::MultiLoRALinear(Frozen frozen, Vector bias)
    : Core(std::move(frozen), std::move(bias), "MultiLoRALinear") {}

template <typename T, typename Frozen>
auto MultiLoRALinear<T, Frozen>::add_weighted_adapter(const std::string& name,
                                                      const std::vector<std::string>& sources,
                                                      const std::vector<double>& weights,
                                                      Combination how,
                                                      const CombineOptions& options) -> Adapter& {
  std::vector<const Adapter*> parts;
  for (const auto& s : sources) {
    parts.push_back(&std::as_const(*this).adapter(s));
    detail::require(!parts.back()->uses_dora(), "MultiLoRALinear::add_weighted_adapter: adapter \"",
                    s,
                    "\" is a DoRA adapter; a weighted sum of B A updates does not combine DoRA's "
                    "magnitudes");
  }
  detail::require(!has_adapter(name), "MultiLoRALinear::add_weighted_adapter: an adapter named \"",
                  name, "\" already exists");
  return add_adapter(name, combine_adapters<T>(parts, weights, how, options));
}

template <typename T, typename Frozen>
auto MultiLoRALinear<T, Frozen>::checked(Matrix W0) -> Matrix {
  detail::require(W0.rows() >= 1 && W0.cols() >= 1,
                  "MultiLoRALinear: W0 must be at least 1 x 1, got ",
                  detail::shape_string(W0.rows(), W0.cols()));
  return W0;
}

/// Adapter `name` of the layer as optimizer parameters (A, B and its lora bias when present),
/// named "<name>.A", ...; see parameter.hpp for how long they stay valid.
template <typename T, typename F>
std::vector<ParameterView<T>> adapter_parameters(MultiLoRALinear<T, F>& layer,
                                                 const std::string& name) {
  return layer.parameters(name);
}

}  // namespace lora
