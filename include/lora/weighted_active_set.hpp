// WeightedActiveSet<T, Frozen>: several adapters of one MultiLoRALinear active at once, each with
// a weight (PEFT's multiple active adapters, llama.cpp's scaled adapter set):
//   H = W0 X + b + sum_i w_i s_i (B_i (A_i X) + b_i)        (b_i: PEFT's lora bias, if any)
// The adapters stay separate (none is combined into a new one: see weighted_adapter.hpp for that):
// forward and backward cost O(d k n + sum_i r_i (d + k) n), and each adapter trains on its own
// share of the gradient, scaled by its weight:
//   dB_i += w_i s_i G (A_i X)^T,  dA_i += w_i s_i (B_i^T G) X^T,  db_i += w_i s_i G 1,
//   dX = W0^T G + sum_i w_i s_i A_i^T (B_i^T G).
// merge() folds the weighted sum into W0 as one exact adapter of rank sum_i r_i (the factors
// stacked: [w_1 s_1 A_1; ...], [B_1, ...]), through the layer's own merge(), so unmerge() gives
// W0 back with the same guarantee (bit for bit with MergeMode::ExactRestore).
#pragma once

#include "lora/adapter.hpp"
#include "lora/detail/check.hpp"
#include "lora/detail/gemm.hpp"
#include "lora/multi_lora_linear.hpp"
#include "lora/workspace.hpp"

#include <Eigen/Core>

#include <cmath>
#include <string>
#include <utility>
#include <vector>

namespace lora {

/// A weighted set of active adapters on a MultiLoRALinear layer. It refers to the layer (which
/// must outlive it) and to its adapters by name; the layer's own active adapter is not used (but
/// merge() makes the set's sum the layer's merged adapter, see there). DoRA adapters cannot join
/// (their magnitude rescales the whole weight): std::invalid_argument. No LoRA dropout is applied.
/// const members are safe from many threads at once.
template <typename T, typename Frozen = DenseFrozenWeight<T>>
class WeightedActiveSet {
 public:
  using Layer = MultiLoRALinear<T, Frozen>;                         ///< the layer
  using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;  ///< a dense T matrix
  using Adapter = LoRAAdapter<T>;                                   ///< one adapter

  /// The name of the adapter merge() adds to the layer for the weighted sum.
  static constexpr const char* kMergedName = "weighted_active_set";

  /// Adapters `names` of `layer` with weights `weights` (finite, any sign). Throws
  /// std::invalid_argument for an unknown or repeated name, a DoRA adapter, a size mismatch or
  /// a non-finite weight.
  WeightedActiveSet(Layer& layer, std::vector<std::string> names, std::vector<double> weights)
      : layer_(&layer), names_(std::move(names)), weights_(std::move(weights)) {
    const char* where = "WeightedActiveSet";
    detail::require(!names_.empty(), where, ": no adapters");
    detail::require(names_.size() == weights_.size(), where, ": ", names_.size(), " adapters but ",
                    weights_.size(), " weights");
    for (std::size_t i = 0; i < names_.size(); ++i) {
      detail::require(std::isfinite(weights_[i]), where, ": weight ", i, " of adapter \"",
                      names_[i], "\" is not finite");
      for (std::size_t j = 0; j < i; ++j)
        detail::require(names_[i] != names_[j], where, ": adapter \"", names_[i],
                        "\" is named twice");
      detail::require(!layer.adapter(names_[i]).uses_dora(), where, ": adapter \"", names_[i],
                      "\" is a DoRA adapter");
    }
  }

  /// The adapters' names.
  const std::vector<std::string>& names() const { return names_; }
  /// Their weights.
  const std::vector<double>& weights() const { return weights_; }

  /// H = W0 X + b + sum_i w_i s_i (B_i (A_i X) + b_i)   X: k x n -> H: d x n. While merged()
  /// this is the layer's merged forward (a dense layer).
  Matrix forward(const Eigen::Ref<const Matrix>& X) const {
    Matrix H(layer_->out_features(), X.cols());
    Workspace<T> ws;
    forward(X, H, ws);
    return H;
  }

  /// As above into H (d x n, must not overlap X); allocation-free once ws has grown.
  void forward(const Eigen::Ref<const Matrix>& X, Eigen::Ref<Matrix> H, Workspace<T>& ws) const {
    const detail::Where where{"WeightedActiveSet", "forward"};
    detail::require_forward_args(where, X, H, layer_->out_features(), layer_->in_features());
    if (merged_) {
      layer_->forward(X, H, ws);
      return;
    }
    if (layer_->has_bias()) {
      H.colwise() = layer_->bias();
    } else {
      H.setZero();
    }
    for (std::size_t i = 0; i < names_.size(); ++i) {
      const Adapter& a = layer_->adapter(names_[i]);
      const T ws_i = weighted_scaling(i, a);
      auto AX = ws.get(Slot::LowRank, a.rank(), X.cols());
      AX.setZero();
      detail::gemm_add(AX, a.A(), X, T(1));  // A_i X: (r x k)(k x n)
      detail::gemm_add(H, a.B(), AX, ws_i);  // += w_i s_i B_i (A_i X): (d x r)(r x n)
      if (a.has_lora_bias()) H.colwise() += ws_i * a.lora_bias();
    }
    layer_->frozen().multiply_add(X, H);  // (d x k)(k x n)
  }

  /// Accumulates every adapter's gradients for G = dL/dH, each scaled by its weight, and returns
  /// dL/dX (see the top of this file). Throws std::logic_error while merged.
  Matrix backward(const Eigen::Ref<const Matrix>& X, const Eigen::Ref<const Matrix>& G) {
    Matrix dX(layer_->in_features(), X.cols());
    Workspace<T> ws;
    backward(X, G, dX, ws);
    return dX;
  }

  /// As above into dX (k x n, must not overlap X or G); allocation-free once ws has grown.
  void backward(const Eigen::Ref<const Matrix>& X, const Eigen::Ref<const Matrix>& G,
                Eigen::Ref<Matrix> dX, Workspace<T>& ws) {
    const detail::Where where{"WeightedActiveSet", "backward"};
    detail::require_state(!merged_, where, ": the set is merged; call unmerge() first");
    detail::require_backward_args(where, X, G, layer_->out_features(), layer_->in_features());
    detail::require_input_gradient_arg(where, dX, X, G);
    dX.setZero();
    for (std::size_t i = 0; i < names_.size(); ++i) {
      Adapter& a = layer_->adapter(names_[i]);
      const T ws_i = weighted_scaling(i, a);
      auto AX = ws.get(Slot::LowRank, a.rank(), X.cols());
      auto BtG = ws.get(Slot::BackProjected, a.rank(), X.cols());
      AX.setZero();
      detail::gemm_add(AX, a.A(), X, T(1));  // A_i X
      BtG.setZero();
      detail::gemm_add(BtG, a.B().transpose(), G, T(1));       // B_i^T G: (r x d)(d x n)
      detail::gemm_add(a.grad_B(), G, AX.transpose(), ws_i);   // (d x n)(n x r)
      detail::gemm_add(a.grad_A(), BtG, X.transpose(), ws_i);  // (r x n)(n x k)
      if (a.has_lora_bias()) a.grad_lora_bias().noalias() += ws_i * G.rowwise().sum();
      detail::gemm_add(dX, a.A().transpose(), BtG, ws_i);  // w_i s_i A_i^T (B_i^T G)
    }
    layer_->frozen().multiply_transposed_add(G, dX);  // + W0^T G: (k x d)(d x n)
  }

  /// The weighted sum as one exact adapter of rank sum_i r_i and scaling 1:
  /// A = [w_1 s_1 A_1; ...] (the products rounded once in T), B = [B_1, ...],
  /// b = sum_i w_i s_i b_i.
  Adapter combined() const {
    Eigen::Index R = 0;
    bool bias = false;
    for (const auto& n : names_) {
      R += layer_->adapter(n).rank();
      bias = bias || layer_->adapter(n).has_lora_bias();
    }
    LoRAConfig cfg;
    cfg.rank = static_cast<int>(R);
    cfg.alpha = static_cast<double>(R);  // s = 1
    Adapter out(layer_->out_features(), layer_->in_features(), cfg);
    Matrix A(R, layer_->in_features()), B(layer_->out_features(), R);
    Eigen::Matrix<T, Eigen::Dynamic, 1> b = Eigen::Matrix<T, Eigen::Dynamic, 1>::Zero(B.rows());
    Eigen::Index row = 0;
    for (std::size_t i = 0; i < names_.size(); ++i) {
      const Adapter& a = layer_->adapter(names_[i]);
      const T ws_i = weighted_scaling(i, a);
      A.middleRows(row, a.rank()) = ws_i * a.A();
      B.middleCols(row, a.rank()) = a.B();
      if (a.has_lora_bias()) b += ws_i * a.lora_bias();
      row += a.rank();
    }
    out.set_weights(A, B);
    if (bias) out.set_lora_bias(b);
    return out;
  }

  /// Folds the weighted sum into the layer's weight: adds combined() to the layer as adapter
  /// kMergedName, makes it active and merges it (the layer's merge(): its checks, its exactness).
  /// The set's forward is then the dense merged layer. Throws std::logic_error when the layer is
  /// already merged, std::invalid_argument when the summed rank exceeds min(d, k) or the name is
  /// taken; std::domain_error (nothing changed) for a sum that is not finite in the storage.
  void merge() {
    if (merged_) return;
    detail::require_state(!layer_->is_merged(), "WeightedActiveSet::merge",
                          ": the layer is already merged; call unmerge() first");
    previous_active_ = layer_->has_active() ? layer_->active_name() : std::string();
    layer_->add_adapter(kMergedName, combined());
    try {
      layer_->set_active(kMergedName);
      layer_->merge();
    } catch (...) {
      restore_active();
      layer_->remove_adapter(kMergedName);
      throw;
    }
    merged_ = true;
  }

  /// Gives W0 back (the layer's unmerge()), removes kMergedName and re-activates the adapter that
  /// was active before merge(). A no-op when not merged.
  void unmerge() {
    if (!merged_) return;
    layer_->unmerge();
    restore_active();
    layer_->remove_adapter(kMergedName);
    merged_ = false;
  }

  /// True while merged.
  bool merged() const { return merged_; }

 private:
  T weighted_scaling(std::size_t i, const Adapter& a) const {
    return static_cast<T>(weights_[i] * static_cast<double>(a.scaling()));
  }

  void restore_active() {
    if (previous_active_.empty()) {
      layer_->disable();
    } else {
      layer_->set_active(previous_active_);
    }
  }

  Layer* layer_;
  std::vector<std::string> names_;
  std::vector<double> weights_;
  bool merged_ = false;
  std::string previous_active_;
};

}  // namespace lora
