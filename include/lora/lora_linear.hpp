// LoRALinear<T, Frozen>: a frozen linear layer W0 (d x k) with one trainable low-rank adapter,
//   H = W0 X + b + s B (A X)          (the paper's Eq. 3, with a column per sample)
// The face of AdapterLayer (adapter_layer.hpp) for one adapter: everything the layer does is
// implemented there, once, for this face and MultiLoRALinear alike; the multi-adapter part of
// AdapterLayer's API stays hidden here.
#pragma once

#include "lora/adapter.hpp"
#include "lora/adapter_layer.hpp"
#include "lora/config.hpp"
#include "lora/dense_frozen_weight.hpp"
#include "lora/detail/check.hpp"
#include "lora/parameter.hpp"

#include <Eigen/Core>

#include <utility>
#include <vector>

namespace lora {

/// A frozen linear layer with one LoRA adapter. Shapes: W0 is d x k (out x in, the layout of
/// torch.nn.Linear.weight), A is r x k, B is d x r, inputs X are k x n with one column per sample,
/// outputs H are d x n.
///
/// The convenience calls (`forward(X)`, `backward(X, G)`) return new matrices; the out-parameter
/// overloads write into caller-owned storage and take a Workspace, and allocate nothing once the
/// workspace has grown to the batch size. const members are safe to call from many threads at
/// once (a training-mode forward with dropout or DoRA excepted: see train()); anything that
/// changes the layer needs exclusive access.
///
/// `Frozen` is the storage of W0 (DenseFrozenWeight<T> by default; Bf16FrozenWeight,
/// onednn::OneDnnFrozenWeight, ...): see frozen_storage.hpp for what a storage provides. Its merge
/// mode is chosen when the storage is built; a layer built from a plain W0 uses the storage's
/// default.
template <typename T, typename Frozen = DenseFrozenWeight<T>>
class LoRALinear : public AdapterLayer<T, Frozen> {
 public:
  using Adapter = typename AdapterLayer<T, Frozen>::Adapter;  ///< the trainable half
  using Index = typename AdapterLayer<T, Frozen>::Index;      ///< Eigen's index type
  using Matrix = typename AdapterLayer<T, Frozen>::Matrix;    ///< a dense T matrix
  using Vector = typename AdapterLayer<T, Frozen>::Vector;    ///< a dense T vector

  /// Wraps the frozen weight W0 (d x k); pass an rvalue to move it in instead of copying.
  explicit LoRALinear(Matrix W0, const LoRAConfig& config = LoRAConfig{});

  /// As above, with a frozen bias b of length d. A PiSSA, OLoRA or LoftQ config factors this W0
  /// at full precision before the storage rounds the residual (lora/init.hpp).
  LoRALinear(Matrix W0, Vector bias, const LoRAConfig& config);

  /// Wraps a frozen storage built by the caller, e.g.
  /// `DenseFrozenWeight<float>(W0, MergeMode::ExactRestore)` or
  /// `Bf16FrozenWeight(W0, MergeMode::ExactRestore, Bf16Backend::Portable)`; bias: length d or
  /// empty.
  LoRALinear(Frozen frozen, Vector bias, const LoRAConfig& config);

  /// As above for a PiSSA, OLoRA or LoftQ config, which factors `original`: the full-precision W0
  /// (d x k) the storage was built from, e.g.
  /// `LoRALinear<float, Nf4FrozenWeight>(Nf4FrozenWeight(W0, options), {}, cfg, W0)` for LoftQ.
  LoRALinear(Frozen frozen, Vector bias, const LoRAConfig& config,
             const Eigen::Ref<const Matrix>& original);

  // The frozen side, modes, forward and backward, merge and health are AdapterLayer's public
  // members; this face adds the accessors of its one adapter.

  // ---- switching the adapter off (PEFT's disable_adapter) ---------------------------------------

  /// Switches the adapter off: forward gives the base output W0 X + b (a merged layer is unmerged
  /// first) and backward throws std::logic_error until enable(). The adapter and its optimizer
  /// state are kept. PEFT's `with model.disable_adapter():`. A no-op when already disabled.
  void disable() { Core::disable(); }
  /// Switches the adapter back on (not merged; call merge() again for a merged layer). A no-op
  /// when enabled.
  void enable() {
    if (!Core::has_active()) Core::set_active(kName);
  }
  /// True unless disable() switched the adapter off.
  bool is_enabled() const { return Core::has_active(); }

  // ---- the adapter -----------------------------------------------------------------------------

  Index rank() const { return adapter().rank(); }                  ///< r
  const LoRAConfig& config() const { return adapter().config(); }  ///< the adapter's config
  T scaling() const { return adapter().scaling(); }  ///< s = alpha / r or alpha / sqrt(r)

  /// A (r x k) and B (d x r). Writing them while merged is safe (unmerge() removes exactly what was
  /// merged) but a merged forward then refuses until the layer is merged again.
  const Matrix& A() const { return adapter().A(); }
  const Matrix& B() const { return adapter().B(); }            ///< B, d x r
  Matrix& A() { return adapter().A(); }                        ///< mutable A (never resize it)
  Matrix& B() { return adapter().B(); }                        ///< mutable B (never resize it)
  const Matrix& grad_A() const { return adapter().grad_A(); }  ///< dL/dA, r x k
  const Matrix& grad_B() const { return adapter().grad_B(); }  ///< dL/dB, d x r
  Matrix& grad_A() { return adapter().grad_A(); }              ///< mutable dL/dA
  Matrix& grad_B() { return adapter().grad_B(); }              ///< mutable dL/dB

  /// DoRA's magnitude m (length d; empty unless config().use_dora) and its gradient. Writing m
  /// while merged is safe, as for A and B.
  const Vector& magnitude() const { return adapter().magnitude(); }
  Vector& magnitude() { return adapter().magnitude(); }  ///< mutable m (never resize it)
  const Vector& grad_magnitude() const { return adapter().grad_magnitude(); }  ///< dL/dm
  Vector& grad_magnitude() { return adapter().grad_magnitude(); }              ///< mutable dL/dm

  const Adapter& adapter() const { return Core::entry(0).adapter; }  ///< the one adapter
  Adapter& adapter() { return Core::entry(0).adapter; }              ///< the one adapter, mutable

  /// Replaces A (r x k) and B (d x r), e.g. with loaded values; throws std::logic_error while
  /// merged.
  void set_adapter_weights(const Eigen::Ref<const Matrix>& A, const Eigen::Ref<const Matrix>& B);

  /// Gives the layer the values of `adapter` (for example one loaded from a PEFT file, whose rank
  /// and scaling may differ from the layer's first config), copying into the existing storage where
  /// shapes agree so that optimizer views stay valid. Its shapes must fit W0. Throws
  /// std::logic_error while merged. (PEFT's set_adapter(name) switches adapters: that is
  /// MultiLoRALinear::set_active.)
  void replace_adapter(const Adapter& adapter) { Core::replace_adapter(kName, adapter); }

  /// The trainable tensors as optimizer views: A, B, and the lora bias or DoRA's magnitude when
  /// present.
  std::vector<ParameterView<T>> parameters() { return adapter().parameters(); }

  /// s * B * A as a dense d x k matrix (for inspection and export; training never forms it). For
  /// DoRA this is the direction's update only; weight() after merge() is the whole adapted weight.
  Matrix delta_weight() const;

 private:
  using Core = AdapterLayer<T, Frozen>;

  static constexpr const char* kName = "default";  // PEFT's name for a model's one adapter

  // The storage of W0; W0 itself is kept (copied) only when an init still needs it.
  static Frozen make_frozen(Matrix& W0, const LoRAConfig& config);

  static const Matrix& checked_weight(const Matrix& W0, const LoRAConfig& config);
};

// The members with bodies, out of the class so that they are not inline: a file that sees
// `extern template class LoRALinear<T, F>` (lora/extern_templates.hpp) does not instantiate them.

template <typename T, typename Frozen>
LoRALinear<T, Frozen>::LoRALinear(Matrix W0, const LoRAConfig& config)
    : LoRALinear(std::move(W0), Vector(), config) {}

template <typename T, typename Frozen>
LoRALinear<T, Frozen>::LoRALinear(Matrix W0, Vector bias, const LoRAConfig& config)
    : Core(make_frozen(W0, config), std::move(bias), "LoRALinear") {
  if (changes_base(config.init) && W0.size() != 0)
    Core::add_adapter(kName, config, std::move(W0));  // the residual is formed in W0 itself
  else
    Core::add_adapter(kName, config);
  Core::set_active(kName);
}

template <typename T, typename Frozen>
LoRALinear<T, Frozen>::LoRALinear(Frozen frozen, Vector bias, const LoRAConfig& config)
    : Core(std::move(frozen), std::move(bias), "LoRALinear") {
  Core::add_adapter(kName, config);
  Core::set_active(kName);
}

template <typename T, typename Frozen>
LoRALinear<T, Frozen>::LoRALinear(Frozen frozen, Vector bias, const LoRAConfig& config,
                                  const Eigen::Ref<const Matrix>& original)
    : Core(std::move(frozen), std::move(bias), "LoRALinear") {
  Core::add_adapter(kName, config, original);
  Core::set_active(kName);
}

template <typename T, typename Frozen>
void LoRALinear<T, Frozen>::set_adapter_weights(const Eigen::Ref<const Matrix>& A,
                                                const Eigen::Ref<const Matrix>& B) {
  detail::require_state(!this->is_merged(),
                        "LoRALinear::set_adapter_weights: the layer is merged; call unmerge() "
                        "first");
  adapter().set_weights(A, B);
}

template <typename T, typename Frozen>
auto LoRALinear<T, Frozen>::delta_weight() const -> Matrix {
  return scaling() * B() * A();
}

template <typename T, typename Frozen>
Frozen LoRALinear<T, Frozen>::make_frozen(Matrix& W0, const LoRAConfig& config) {
  checked_weight(W0, config);
  if (changes_base(config.init)) return Frozen(W0);
  return Frozen(std::move(W0));
}

template <typename T, typename Frozen>
auto LoRALinear<T, Frozen>::checked_weight(const Matrix& W0, const LoRAConfig& config)
    -> const Matrix& {
  detail::require(W0.rows() >= 1 && W0.cols() >= 1, "LoRALinear: W0 must be at least 1 x 1, got ",
                  detail::shape_string(W0.rows(), W0.cols()));
  config.validate_for(W0.rows(), W0.cols());
  return W0;
}

/// The layer's adapter as optimizer parameters: {A, grad_A} (r x k), {B, grad_B} (d x r) and, with
/// a lora bias, {b_B, grad}; with DoRA, {m, grad_m} (d x 1). The views stay valid while the layer
/// keeps its adapter's shapes (moving the layer is fine); see parameter.hpp. The frozen weight and
/// bias are not included.
template <typename T, typename F>
std::vector<ParameterView<T>> adapter_parameters(LoRALinear<T, F>& layer) {
  return layer.parameters();
}

}  // namespace lora
