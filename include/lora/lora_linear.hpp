// LoRALinear<T>: a frozen linear layer W0 (d x k) with one trainable low-rank adapter,
//   H = W0 X + b + s B (A X)          (the paper's Eq. 3, with a column per sample)
#pragma once

#include "lora/adapter.hpp"
#include "lora/config.hpp"
#include "lora/dense_frozen_weight.hpp"
#include "lora/detail/check.hpp"
#include "lora/detail/finite.hpp"
#include "lora/random.hpp"
#include "lora/workspace.hpp"

#include <Eigen/Core>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <type_traits>
#include <utility>

namespace lora {

/// A frozen linear layer with a LoRA adapter. Shapes: W0 is d x k (out x in, the layout of
/// torch.nn.Linear.weight), A is r x k, B is d x r, inputs X are k x n with one column per sample,
/// outputs H are d x n.
///
/// The convenience calls (`forward(X)`, `backward(X, G)`) return new matrices; the out-parameter
/// overloads write into caller-owned storage and take a Workspace, and allocate nothing once the
/// workspace has grown to the batch size. const members are safe to call from many threads at
/// once; anything that changes the layer needs exclusive access.
///
/// LoRA dropout (config.dropout = p > 0, PEFT's lora_dropout) applies in training mode, the
/// default as for a torch.nn.Module: the adapter sees a masked input,
///   H = W0 X + b + s B A (M .* X),   M_ij = 0 with probability p, else 1 / (1 - p),
/// with M drawn from the layer's own seeded Rng at each forward and kept for the backward that
/// follows. Such a forward therefore changes the layer (the mask and the generator) although it is
/// const: it must not run concurrently with any other call on the same layer. In eval mode, or
/// with p = 0, forward is the plain path and is thread-safe as above.
///
/// `Frozen` is the storage of W0 (DenseFrozenWeight<T> by default): see dense_frozen_weight.hpp
/// for what a storage provides.
template <typename T, typename Frozen = DenseFrozenWeight<T>>
class LoRALinear {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "lora::LoRALinear<T> supports T = float or T = double only; convert the weight "
                "with .template cast<float>() first.");

 public:
  using Scalar = T;
  using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;
  using Vector = Eigen::Matrix<T, Eigen::Dynamic, 1>;
  using Index = Eigen::Index;
  using Adapter = LoRAAdapter<T>;
  using WorkspaceType = Workspace<T>;

  /// Wraps the frozen weight W0 (d x k); pass an rvalue to move it in instead of copying.
  explicit LoRALinear(Matrix W0, const LoRAConfig& config = LoRAConfig{})
      : LoRALinear(std::move(W0), Vector(), config) {}

  /// As above, with a frozen bias b of length d.
  LoRALinear(Matrix W0, Vector bias, const LoRAConfig& config)
      : LoRALinear(Frozen(checked_weight(std::move(W0), config), config.merge_mode),
                   std::move(bias), config) {}

  /// Wraps a frozen storage built by the caller, e.g.
  /// `Bf16FrozenWeight(W0, MergeMode::InPlace, Bf16Backend::Portable)`; bias: length d or empty.
  LoRALinear(Frozen frozen, Vector bias, const LoRAConfig& config)
      : frozen_(std::move(frozen)),
        bias_(std::move(bias)),
        adapter_(frozen_.out_features(), frozen_.in_features(), config),
        dropout_rng_(config.seed + kDropoutSeedOffset) {
    detail::require(bias_.size() == 0 || bias_.size() == out_features(),
                    "LoRALinear: bias must have length ", out_features(), " (out_features), got ",
                    bias_.size());
  }

  // ---- training / evaluation mode (LoRA dropout) ------------------------------------------------

  /// Training mode (the default): forward applies LoRA dropout when config().dropout > 0.
  void train(bool on = true) { training_ = on; }
  /// Evaluation mode: no dropout; forward is deterministic and thread-safe.
  void eval() { training_ = false; }
  bool is_training() const { return training_; }
  /// True when forward masks the adapter's input: training mode and config().dropout > 0.
  bool dropout_active() const { return training_ && config().dropout > 0; }
  /// Restarts the dropout generator (by default seeded from config().seed, apart from A's draw).
  void seed_dropout(std::uint64_t seed) { dropout_rng_ = Rng(seed); }
  /// The mask M of the last forward with dropout (k x n; entries 0 or 1 / (1 - p)); 0 x 0 before.
  Eigen::Map<const Matrix> dropout_mask() const {
    return Eigen::Map<const Matrix>(mask_storage_.data(), mask_rows_, mask_cols_);
  }

  Index in_features() const { return frozen_.in_features(); }    ///< k
  Index out_features() const { return frozen_.out_features(); }  ///< d
  Index rank() const { return adapter_.rank(); }                 ///< r
  const LoRAConfig& config() const { return adapter_.config(); }
  T scaling() const { return adapter_.scaling(); }  ///< s = alpha / r or alpha / sqrt(r)

  /// A (r x k) and B (d x r). The mutable overloads throw std::logic_error while merged: a change
  /// then would not reach the merged weight. Read through a const layer (std::as_const) instead.
  const Matrix& A() const { return adapter_.A(); }
  const Matrix& B() const { return adapter_.B(); }
  Matrix& A() { return mutable_adapter("LoRALinear::A()").A(); }
  Matrix& B() { return mutable_adapter("LoRALinear::B()").B(); }
  const Matrix& grad_A() const { return adapter_.grad_A(); }  ///< dL/dA, r x k
  const Matrix& grad_B() const { return adapter_.grad_B(); }  ///< dL/dB, d x r
  Matrix& grad_A() { return adapter_.grad_A(); }
  Matrix& grad_B() { return adapter_.grad_B(); }

  /// Replaces A (r x k) and B (d x r), e.g. with loaded values; throws while merged.
  void set_adapter_weights(const Eigen::Ref<const Matrix>& A, const Eigen::Ref<const Matrix>& B) {
    mutable_adapter("LoRALinear::set_adapter_weights").set_weights(A, B);
  }

  const Adapter& adapter() const { return adapter_; }

  /// Replaces the whole adapter (for example with one loaded from a PEFT file, whose rank and
  /// scaling may differ from the layer's first config). Its shapes must fit W0: B is d x r, A is
  /// r x k. Throws std::logic_error while merged.
  void set_adapter(Adapter adapter) {
    mutable_adapter("LoRALinear::set_adapter");
    detail::require(
        adapter.out_features() == out_features() && adapter.in_features() == in_features(),
        "LoRALinear::set_adapter: the adapter is for a ",
        detail::shape_string(adapter.out_features(), adapter.in_features()),
        " weight, this layer's W0 is ", detail::shape_string(out_features(), in_features()));
    adapter_ = std::move(adapter);
  }

  const Frozen& frozen() const { return frozen_; }
  bool has_bias() const { return bias_.size() != 0; }
  const Vector& bias() const { return bias_; }  ///< length d, or empty

  /// The weight in use: W0, or W0 + s*B*A while merged.
  decltype(auto) weight() const { return frozen_.weight(); }

  /// s * B * A as a dense d x k matrix (for inspection and export; training never forms it).
  Matrix delta_weight() const { return adapter_.scaling() * adapter_.B() * adapter_.A(); }

  /// Trainable parameters r * (d + k); frozen parameters d * k (+ d with a bias).
  Index trainable_parameter_count() const { return adapter_.parameter_count(); }
  Index frozen_parameter_count() const { return out_features() * in_features() + bias_.size(); }

  // ---- forward -------------------------------------------------------------------------------

  /// H = W0 X + b + s B (A X).   X: k x n  ->  H: d x n. Allocates the result and scratch.
  Matrix forward(const Eigen::Ref<const Matrix>& X) const {
    Matrix H(out_features(), X.cols());
    WorkspaceType ws;
    forward(X, H, ws);
    return H;
  }

  /// As above into H (d x n, must not overlap X); allocation-free once ws has grown.
  void forward(const Eigen::Ref<const Matrix>& X, Eigen::Ref<Matrix> H, WorkspaceType& ws) const {
    detail::require_forward_args("LoRALinear::forward", X, H, out_features(), in_features());
    if (frozen_.is_merged()) {
      // Exactly a dense layer, plus s * b_B for PEFT's lora_bias (a weight cannot hold it).
      if (has_bias()) {
        H.colwise() = bias_;
      } else if (adapter_.has_lora_bias()) {
        H.setZero();
      } else {
        frozen_.multiply(X, H);  // (d x k)(k x n)
        return;
      }
      adapter_.add_lora_bias_term(H);
    } else if (!dropout_active()) {
      // H starts as the adapter's term and the bias, written in the one pass over H that the dense
      // product would spend zeroing it; the frozen product then accumulates on top.
      adapter_.assign_forward(X, H, ws.get(0, rank(), X.cols()), bias_);
    } else {
      draw_dropout_mask(X.cols());
      auto Xd = ws.get(2, in_features(), X.cols());  // M .* X, k x n
      Xd = X.cwiseProduct(dropout_mask());
      adapter_.assign_forward(Xd, H, ws.get(0, rank(), X.cols()), bias_);
    }
    frozen_.multiply_add(X, H);  // (d x k)(k x n): the cost of the layer
  }

  // ---- backward ------------------------------------------------------------------------------

  /// Accumulates grad_A and grad_B for G = dL/dH (d x n) and returns dL/dX (k x n):
  ///   dX = W0^T G + s A^T (B^T G).
  /// X must be the input of the matching forward. Throws std::logic_error while merged.
  Matrix backward(const Eigen::Ref<const Matrix>& X, const Eigen::Ref<const Matrix>& G) {
    Matrix dX(in_features(), X.cols());
    WorkspaceType ws;
    backward(X, G, dX, ws);
    return dX;
  }

  /// As above into dX (k x n, must not overlap X or G); allocation-free once ws has grown.
  void backward(const Eigen::Ref<const Matrix>& X, const Eigen::Ref<const Matrix>& G,
                Eigen::Ref<Matrix> dX, WorkspaceType& ws) {
    check_backward_args("LoRALinear::backward", X, G);
    detail::require_input_gradient_arg("LoRALinear::backward", dX, X, G);
    auto BtG = ws.get(1, rank(), X.cols());
    if (!dropout_active()) {
      adapter_.accumulate_gradients(X, G, ws.get(0, rank(), X.cols()), BtG);
      adapter_.assign_input_gradient(BtG, dX);  // dX = s A^T (B^T G): (k x r)(r x n)
      frozen_.multiply_transposed_add(G, dX);   // dX += W0^T G: (k x d)(d x n)
      return;
    }
    // With the forward's mask M: dA = s (B^T G) (M .* X)^T, and the adapter's share of dX is
    // M .* (s A^T B^T G).
    auto Xd = masked_input("LoRALinear::backward", X, ws);
    adapter_.accumulate_gradients(Xd, G, ws.get(0, rank(), X.cols()), BtG);
    adapter_.assign_input_gradient(BtG, dX);  // (k x r)(r x n)
    dX.array() *= dropout_mask().array();
    frozen_.multiply_transposed_add(G, dX);  // dX += W0^T G: (k x d)(d x n)
  }

  /// Accumulates grad_A and grad_B only, for a first layer whose input needs no gradient:
  /// O(n * r * (d + k)), none of the d x k work of dX.
  void backward_without_input_grad(const Eigen::Ref<const Matrix>& X,
                                   const Eigen::Ref<const Matrix>& G, WorkspaceType& ws) {
    check_backward_args("LoRALinear::backward_without_input_grad", X, G);
    if (!dropout_active()) {
      adapter_.accumulate_gradients(X, G, ws.get(0, rank(), X.cols()), ws.get(1, rank(), X.cols()));
      return;
    }
    auto Xd = masked_input("LoRALinear::backward_without_input_grad", X, ws);
    adapter_.accumulate_gradients(Xd, G, ws.get(0, rank(), X.cols()), ws.get(1, rank(), X.cols()));
  }

  void backward_without_input_grad(const Eigen::Ref<const Matrix>& X,
                                   const Eigen::Ref<const Matrix>& G) {
    WorkspaceType ws;
    backward_without_input_grad(X, G, ws);
  }

  /// Sets grad_A and grad_B to zero.
  void zero_grad() { adapter_.zero_grad(); }

  // ---- merge -----------------------------------------------------------------------------------

  /// Folds s*B*A into the weight so that forward costs exactly a dense layer. A no-op when already
  /// merged. Throws std::domain_error, leaving the weight untouched, if A, B or s is not finite or
  /// if W0 + s*B*A overflows where W0 is finite.
  void merge() {
    if (frozen_.is_merged()) return;
    if (!std::isfinite(static_cast<double>(scaling())) || !adapter_.A().allFinite() ||
        !adapter_.B().allFinite()) {
      throw std::domain_error(
          "LoRALinear::merge: A, B and the scaling must be finite; the weight was left as it was");
    }
    frozen_.merge(scaling(), adapter_.B(), adapter_.A());
  }

  /// Gives W0 back (bit-exact with MergeMode::ExactRestore; see MergeMode::InPlace for its
  /// bound). A no-op when not merged.
  void unmerge() {
    if (!frozen_.is_merged()) return;
    frozen_.unmerge(scaling(), adapter_.B(), adapter_.A());
  }

  bool is_merged() const { return frozen_.is_merged(); }

  // ---- numerical health --------------------------------------------------------------------

  /// True when A, B, their gradients, the bias and the weight in use hold no NaN or infinity.
  /// O(d k), a fraction of one forward pass; adapter().all_finite() is the O(r (d + k)) check.
  bool all_finite() const {
    return adapter_.all_finite() && bias_.allFinite() && frozen_.weight().allFinite();
  }

  /// Throws std::domain_error naming the first NaN or infinity (matrix, element, value) among A, B,
  /// grad_A, grad_B, the bias and the weight in use. Call it after backward() and before the
  /// optimiser step to stop a diverging run where it starts. The library never lets a non-finite
  /// value reach W0 by itself: merge() refuses a non-finite adapter and an overflowing sum.
  void check_finite() const {
    adapter_.check_finite("LoRALinear::check_finite");
    detail::require_finite("LoRALinear::check_finite", "bias", bias_);
    detail::require_finite("LoRALinear::check_finite", is_merged() ? "merged weight" : "W0",
                           frozen_.weight());
  }

 private:
  // Keeps the dropout stream apart from A's draw, which uses config.seed itself.
  static constexpr std::uint64_t kDropoutSeedOffset = 0x6c6f72615f64726fULL;  // "lora_dro"

  /// Draws M (k x n) into storage that grows and never shrinks: no allocation once grown.
  void draw_dropout_mask(Index n) const {
    const Index size = in_features() * n;
    if (mask_storage_.size() < size) mask_storage_.resize(size);
    mask_rows_ = in_features();
    mask_cols_ = n;
    const double p = config().dropout;
    const T keep_scale = static_cast<T>(1.0 / (1.0 - p));
    for (Index i = 0; i < size; ++i)
      mask_storage_[i] = dropout_rng_.uniform() < p ? T(0) : keep_scale;
  }

  /// ws slot 2 := M .* X (k x n), with the mask of the matching forward.
  Eigen::Map<Matrix> masked_input(const char* where, const Eigen::Ref<const Matrix>& X,
                                  WorkspaceType& ws) const {
    detail::require_state(mask_rows_ == in_features() && mask_cols_ == X.cols(), where,
                          ": dropout is on, but no training-mode forward with a batch of ",
                          X.cols(), " columns preceded it (the last mask is ",
                          detail::shape_string(mask_rows_, mask_cols_), ")");
    auto Xd = ws.get(2, in_features(), X.cols());
    Xd = X.cwiseProduct(dropout_mask());
    return Xd;
  }

  static Matrix checked_weight(Matrix W0, const LoRAConfig& config) {
    detail::require(W0.rows() >= 1 && W0.cols() >= 1, "LoRALinear: W0 must be at least 1 x 1, got ",
                    detail::shape_string(W0.rows(), W0.cols()));
    config.validate_for(W0.rows(), W0.cols());
    return W0;
  }

  Adapter& mutable_adapter(const char* what) {
    detail::require_state(!frozen_.is_merged(), what,
                          ": the layer is merged; call unmerge() before changing or training the "
                          "adapter");
    return adapter_;
  }

  void check_backward_args(const char* where, const Eigen::Ref<const Matrix>& X,
                           const Eigen::Ref<const Matrix>& G) {
    mutable_adapter(where);
    detail::require_backward_args(where, X, G, out_features(), in_features());
  }

  Frozen frozen_;
  Vector bias_;
  Adapter adapter_;
  bool training_ = true;
  // LoRA dropout state, written by a training-mode forward (see the class comment).
  mutable Rng dropout_rng_;
  mutable Vector mask_storage_;
  mutable Index mask_rows_ = 0, mask_cols_ = 0;
};

}  // namespace lora
