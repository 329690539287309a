// LoRAAdapter<T>: the trainable half of a LoRA layer, h += s * B * (A * x), with its gradients.
// It knows nothing of the frozen weight, so one frozen base can carry several adapters.
#pragma once

#include "lora/config.hpp"
#include "lora/detail/check.hpp"
#include "lora/detail/finite.hpp"
#include "lora/detail/gemm.hpp"
#include "lora/detail/low_rank.hpp"
#include "lora/random.hpp"
#include "lora/workspace.hpp"

#include <Eigen/Core>

#include <cmath>
#include <type_traits>
#include <utility>

namespace lora {

template <typename T>
class LoRAAdapter {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "lora: adapters support T = float or T = double only; convert other types first.");

 public:
  using Scalar = T;
  using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;
  using Vector = Eigen::Matrix<T, Eigen::Dynamic, 1>;
  using Index = Eigen::Index;

  /// A fresh adapter for a d x k weight: A drawn as cfg.init says (seeded), B = 0.
  LoRAAdapter(Index out_features, Index in_features, const LoRAConfig& cfg) : config_(cfg) {
    detail::require(out_features >= 1 && in_features >= 1,
                    "LoRAAdapter: the weight must be at least 1 x 1, got ",
                    detail::shape_string(out_features, in_features));
    cfg.validate_for(out_features, in_features);
    scaling_ = static_cast<T>(cfg.scaling());
    A_.resize(cfg.rank, in_features);
    B_.setZero(out_features, cfg.rank);
    Rng rng(cfg.seed);
    if (cfg.init == Init::Gaussian) {
      fill_normal(A_, rng, 0.0, 1.0 / cfg.rank);
    } else {
      const double bound = 1.0 / std::sqrt(static_cast<double>(in_features));
      fill_uniform(A_, rng, -bound, bound);
    }
    zero_grad();
  }

  Index rank() const { return A_.rows(); }
  Index in_features() const { return A_.cols(); }
  Index out_features() const { return B_.rows(); }
  const LoRAConfig& config() const { return config_; }

  /// s = alpha / r (or alpha / sqrt(r) with rsLoRA), as a T.
  T scaling() const { return scaling_; }

  const Matrix& A() const { return A_; }  ///< r x k
  const Matrix& B() const { return B_; }  ///< d x r
  Matrix& A() { return A_; }
  Matrix& B() { return B_; }
  const Matrix& grad_A() const { return grad_A_; }  ///< dL/dA, r x k, accumulated
  const Matrix& grad_B() const { return grad_B_; }  ///< dL/dB, d x r, accumulated
  Matrix& grad_A() { return grad_A_; }
  Matrix& grad_B() { return grad_B_; }

  /// Replaces A and B (for example with loaded values); shapes must match this adapter.
  void set_weights(const Eigen::Ref<const Matrix>& A, const Eigen::Ref<const Matrix>& B) {
    detail::require_shape("LoRAAdapter::set_weights", "A", A, rank(), in_features());
    detail::require_shape("LoRAAdapter::set_weights", "B", B, out_features(), rank());
    A_ = A;
    B_ = B;
  }

  void zero_grad() {
    grad_A_.setZero(A_.rows(), A_.cols());
    grad_B_.setZero(B_.rows(), B_.cols());
    grad_lora_bias_.setZero(lora_bias_.size());
  }

  /// Trainable parameters: r * (d + k), plus d with a lora bias.
  Index parameter_count() const { return A_.size() + B_.size() + lora_bias_.size(); }

  // ---- lora bias (PEFT's `lora_bias=True`) -----------------------------------------------------
  // B becomes an affine map: the adapter adds s * (B * (A * X) + b_B), so the bias is scaled like
  // B (PEFT: lora_B(lora_A(x)) * scaling with lora_B = nn.Linear(r, d, bias=True)). A merged layer
  // folds s * B * A into the weight and still adds s * b_B (see add_lora_bias_term).

  /// True when the adapter carries a bias b_B (length d) on B.
  bool has_lora_bias() const { return lora_bias_.size() != 0; }
  const Vector& lora_bias() const { return lora_bias_; }  ///< b_B, length d (or empty)
  Vector& lora_bias() { return lora_bias_; }
  const Vector& grad_lora_bias() const { return grad_lora_bias_; }  ///< dL/db_B, accumulated
  Vector& grad_lora_bias() { return grad_lora_bias_; }

  /// Gives the adapter a bias on B, set to b (length d), with a zero gradient.
  void set_lora_bias(const Eigen::Ref<const Vector>& b) {
    detail::require(b.size() == out_features(),
                    "LoRAAdapter::set_lora_bias: the bias must have length ", out_features(),
                    " (out_features), got ", b.size());
    lora_bias_ = b;
    grad_lora_bias_.setZero(b.size());
  }

  /// Removes the bias on B.
  void clear_lora_bias() {
    lora_bias_.resize(0);
    grad_lora_bias_.resize(0);
  }

  /// H += s * b_B on every column (nothing without a lora bias): the bias part of the adapter,
  /// which a merged weight cannot hold.   H: d x n.
  void add_lora_bias_term(Eigen::Ref<Matrix> H) const {
    if (has_lora_bias()) H.colwise() += scaling_ * lora_bias_;
  }

  /// True when A, B, the lora bias and their gradients hold no NaN or infinity. O(r (d + k)):
  /// cheap every step.
  bool all_finite() const {
    return A_.allFinite() && B_.allFinite() && grad_A_.allFinite() && grad_B_.allFinite() &&
           lora_bias_.allFinite() && grad_lora_bias_.allFinite();
  }

  /// Throws std::domain_error naming the first NaN or infinity in A, B, grad_A, grad_B, the lora
  /// bias or its gradient (matrix, element, value), e.g. "LoRAAdapter::check_finite: grad_B(3, 0)
  /// is nan".
  void check_finite(const char* where = "LoRAAdapter::check_finite") const {
    detail::require_finite(where, "A", A_);
    detail::require_finite(where, "B", B_);
    detail::require_finite(where, "grad_A", grad_A_);
    detail::require_finite(where, "grad_B", grad_B_);
    detail::require_finite(where, "lora_bias", lora_bias_);
    detail::require_finite(where, "grad_lora_bias", grad_lora_bias_);
  }

  /// H = s * B * (A * X) + bias (bias: length d, or empty for none), overwriting H in one pass, so
  /// that a frozen product accumulated into H afterwards pays nothing extra for the adapter's
  /// memory traffic.   X: k x n,  H: d x n,  AX (scratch): r x n, holds A*X afterwards.
  template <typename Bias>
  void assign_forward(const Eigen::Ref<const Matrix>& X, Eigen::Ref<Matrix> H,
                      Eigen::Ref<Matrix> AX, const Eigen::MatrixBase<Bias>& bias) const {
    AX.setZero();
    detail::gemm_add(AX, A_, X, T(1));                   // (r x k)(k x n): r*k*n
    detail::assign_low_rank(H, scaling_, B_, AX, bias);  // (d x r)(r x n): d*r*n
    add_lora_bias_term(H);  // a second pass over H only for PEFT's rare lora_bias
  }

  /// Accumulates the gradients of L for G = dL/dH (cost O(n * r * (d + k)), no d x k matrix):
  ///   dB += s * G * (A X)^T              (d x n)(n x r)
  ///   dA += s * (B^T G) * X^T            (r x n)(n x k)
  ///   db_B += s * G * 1                  (with a lora bias: the row sums of G)
  /// AX and BtG are r x n scratch; BtG holds B^T G afterwards, for assign_input_gradient.
  void accumulate_gradients(const Eigen::Ref<const Matrix>& X, const Eigen::Ref<const Matrix>& G,
                            Eigen::Ref<Matrix> AX, Eigen::Ref<Matrix> BtG) {
    // Products on Eigen's kernel through detail::gemm_add: no allocation, no copy for a transpose.
    AX.setZero();
    detail::gemm_add(AX, A_, X, T(1));  // (r x k)(k x n)
    BtG.setZero();
    detail::gemm_add(BtG, B_.transpose(), G, T(1));           // (r x d)(d x n)
    detail::gemm_add(grad_B_, G, AX.transpose(), scaling_);   // (d x n)(n x r)
    detail::gemm_add(grad_A_, BtG, X.transpose(), scaling_);  // (r x n)(n x k)
    if (has_lora_bias()) grad_lora_bias_.noalias() += scaling_ * G.rowwise().sum();  // s * G * 1
  }

  /// dX = s * A^T * (B^T G), the adapter's share of dL/dX, overwriting dX in one pass (the frozen
  /// term W0^T G is accumulated after).   BtG: r x n,  dX: k x n.
  void assign_input_gradient(const Eigen::Ref<const Matrix>& BtG, Eigen::Ref<Matrix> dX) const {
    detail::assign_low_rank(dX, scaling_, A_.transpose(), BtG, Vector());  // (k x r)(r x n)
  }

 private:
  LoRAConfig config_;
  T scaling_{};
  Matrix A_, B_, grad_A_, grad_B_;
  Vector lora_bias_, grad_lora_bias_;  // empty without a lora bias
};

}  // namespace lora
