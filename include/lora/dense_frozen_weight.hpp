// DenseFrozenWeight<T>: the frozen base weight W0 of a LoRA layer, stored as a dense Eigen matrix.
//
// This is the seam between the trainable adapter and the frozen side. LoRALinear talks to its
// frozen storage only through the members below, so another storage (a bf16 weight multiplied by
// oneDNN, a quantised one) slots in as a second template argument without touching adapter code:
//
//   Index out_features() const, in_features() const
//   void multiply(X, H) const            H = W * X              (X: k x n, H: d x n, overwritten)
//   void multiply_transposed(G, dX) const dX = W^T * G          (G: d x n, dX: k x n, overwritten)
//   void multiply_add(X, H) const        H += W * X             (the layer starts H with its
//   void multiply_transposed_add(G, dX) const dX += W^T * G      low-rank term and bias, then adds)
//   void merge(s, B, A)                   W = W0 + s * B * A
//   void unmerge(s, B, A)                 W = W0 again (exactly or to a documented bound)
//   bool is_merged() const
//   weight() const                        the weight now in use (W0, or the merged weight)
#pragma once

#include "lora/config.hpp"
#include "lora/detail/check.hpp"
#include "lora/detail/finite.hpp"
#include "lora/detail/gemm.hpp"
#include "lora/detail/low_rank.hpp"

#include <Eigen/Core>

#include <utility>

namespace lora {

template <typename T>
class DenseFrozenWeight {
 public:
  using Scalar = T;
  using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;
  using Index = Eigen::Index;

  /// Takes W0 (out x in, like torch.nn.Linear.weight); pass an rvalue to move it in.
  explicit DenseFrozenWeight(Matrix W0, MergeMode mode = MergeMode::InPlace)
      : weight_(std::move(W0)), mode_(mode) {
    detail::require(weight_.size() > 0, "DenseFrozenWeight: W0 must not be empty, got ",
                    detail::shape_string(weight_.rows(), weight_.cols()));
  }

  Index out_features() const { return weight_.rows(); }
  Index in_features() const { return weight_.cols(); }
  MergeMode merge_mode() const { return mode_; }
  bool is_merged() const { return merged_; }

  /// The weight in use now: W0, or W0 + s*B*A while merged.
  const Matrix& weight() const { return weight_; }

  /// H = W * X.   W: d x k,  X: k x n,  H: d x n (overwritten; must not alias X).
  /// The products run on Eigen's kernel without allocating (detail/gemm.hpp), on
  /// Eigen::nbThreads() threads when compiled with OpenMP.
  void multiply(const Eigen::Ref<const Matrix>& X, Eigen::Ref<Matrix> H) const {
    H.setZero();  // as Eigen's own H = W * X does
    detail::gemm_add(H, weight_, X, T(1));
  }

  /// dX = W^T * G.   G: d x n,  dX: k x n (overwritten; must not alias G).
  void multiply_transposed(const Eigen::Ref<const Matrix>& G, Eigen::Ref<Matrix> dX) const {
    dX.setZero();
    detail::gemm_add(dX, weight_.transpose(), G, T(1));
  }

  /// H += W * X. Eigen's `H = W * X` zeroes H and then accumulates into it, so starting H with
  /// other terms and accumulating costs the same as the plain product.
  void multiply_add(const Eigen::Ref<const Matrix>& X, Eigen::Ref<Matrix> H) const {
    detail::gemm_add(H, weight_, X, T(1));  // (d x k)(k x n)
  }

  /// dX += W^T * G (W^T is a transposed view: no copy of W is made).
  void multiply_transposed_add(const Eigen::Ref<const Matrix>& G, Eigen::Ref<Matrix> dX) const {
    detail::gemm_add(dX, weight_.transpose(), G, T(1));  // (k x d)(d x n)
  }

  /// W = W0 + s * B * A (B: d x r, A: r x k), without a d x k temporary. In ExactRestore mode the
  /// merged weight is built in a second buffer and W0 is kept untouched beside it.
  /// Throws std::domain_error, leaving the weight as it was, when the sum overflows T where W0 was
  /// finite (an infinity would survive unmerge() and corrupt W0 for good). In InPlace mode a cheap
  /// O(r (d + k)) bound proves that impossible for any sane weight; only when the values come
  /// within a factor 4 of T's largest is the sum built aside in a d x k temporary and checked.
  void merge(T s, const Eigen::Ref<const Matrix>& B, const Eigen::Ref<const Matrix>& A) {
    detail::require_state(!merged_, "DenseFrozenWeight::merge: a delta is already merged");
    if (mode_ == MergeMode::ExactRestore) {
      spare_.resize(weight_.rows(), weight_.cols());  // allocates on the first merge only
      detail::add_low_rank(spare_, weight_, s, B, A);
      detail::require_update_finite("DenseFrozenWeight::merge", spare_, weight_);
      weight_.swap(spare_);  // spare_ now holds the pristine W0
    } else {
      if (w0_max_abs_ < 0) w0_max_abs_ = detail::max_abs_finite(weight_);  // W is W0 here
      if (detail::update_surely_finite<T>(w0_max_abs_, detail::low_rank_abs_bound(s, B, A))) {
        detail::add_low_rank(weight_, weight_, s, B, A);
      } else {
        Matrix merged(weight_.rows(), weight_.cols());
        detail::add_low_rank(merged, weight_, s, B, A);
        detail::require_update_finite("DenseFrozenWeight::merge", merged, weight_);
        weight_.swap(merged);
      }
    }
    merged_ = true;
  }

  /// Back to W0: a swap in ExactRestore mode (bit-exact, O(1)), W -= s*B*A in InPlace mode.
  void unmerge(T s, const Eigen::Ref<const Matrix>& B, const Eigen::Ref<const Matrix>& A) {
    detail::require_state(merged_, "DenseFrozenWeight::unmerge: nothing is merged");
    if (mode_ == MergeMode::ExactRestore) {
      weight_.swap(spare_);
    } else {
      detail::add_low_rank(weight_, weight_, T(-s), B, A);
    }
    merged_ = false;
  }

 private:
  Matrix weight_;
  Matrix spare_;  // ExactRestore: the pristine W0 while merged
  MergeMode mode_;
  bool merged_ = false;
  double w0_max_abs_ = -1;  // InPlace: max |W0| over finite elements, measured at the first merge
};

}  // namespace lora
