// DenseFrozenWeight<T>: the frozen base weight W0 of a LoRA layer, stored as a dense Eigen matrix
// of T (float or double). The reference storage of the frozen-storage contract
// (frozen_storage.hpp), and the default of every layer.
#pragma once

#include "lora/detail/check.hpp"
#include "lora/detail/finite.hpp"
#include "lora/detail/frozen_storage_base.hpp"
#include "lora/detail/gemm.hpp"
#include "lora/detail/low_rank.hpp"
#include "lora/frozen_storage.hpp"

#include <Eigen/Core>

#include <cmath>
#include <cstddef>
#include <utility>

namespace lora {

template <typename T>
/// The frozen weight W0 (d x k) as a dense matrix of T: the reference storage of the contract in
/// frozen_storage.hpp, and every layer's default. Products run on Eigen's kernel, allocation-free.
class DenseFrozenWeight : public detail::FrozenStorageBase<DenseFrozenWeight<T>, T> {
  using Base = detail::FrozenStorageBase<DenseFrozenWeight<T>, T>;
  friend Base;  // calls product() and transposed_product()

 public:
  using typename Base::Index;
  using typename Base::Matrix;
  using typename Base::Vector;

  /// Takes W0 (out x in, like torch.nn.Linear.weight); pass an rvalue to move it in. `mode` says
  /// how unmerge() restores W0 (InPlace, PEFT's way, is the default).
  explicit DenseFrozenWeight(Matrix W0, MergeMode mode = MergeMode::InPlace)
      : weight_(std::move(W0)), mode_(mode) {
    detail::require(weight_.size() > 0, "DenseFrozenWeight: W0 must not be empty, got ",
                    detail::shape_string(weight_.rows(), weight_.cols()));
  }

  /// d, the rows of W0 (output features).
  Index out_features() const { return weight_.rows(); }
  /// k, the columns of W0 (input features).
  Index in_features() const { return weight_.cols(); }
  /// How unmerge() restores W0, chosen at construction.
  MergeMode merge_mode() const { return mode_; }
  /// True while a delta is merged into the weight.
  bool is_merged() const { return merged_; }
  /// The products run on Eigen's kernel with per-thread buffers (detail/gemm.hpp): none allocates
  /// once the buffers have grown (unless Eigen's public products are forced, see gemm.hpp).
  bool allocation_free() const { return detail::kGemmAllocationFree; }

  /// The weight in use (W0, or the merged weight), by reference: no copy.
  const Matrix& matrix() const { return weight_; }
  /// The weight in use as a new matrix (the contract's weight(); matrix() avoids the copy).
  Matrix weight() const { return weight_; }
  /// True when the weight in use holds no NaN or infinity (no allocation).
  bool all_finite() const { return weight_.allFinite(); }
  /// Bytes held: W0, and the pristine copy an ExactRestore merge keeps.
  std::size_t stored_bytes() const {
    return static_cast<std::size_t>(weight_.size() + spare_.size()) * sizeof(T);
  }

  /// out(i) = ||row i of W0||, accumulated in double one column at a time (no d x k temporary).
  void row_norms(Eigen::Ref<Eigen::VectorXd> out) const {
    detail::require_state(!merged_, "DenseFrozenWeight::row_norms: the weight is merged");
    detail::require(out.size() == out_features(), "DenseFrozenWeight::row_norms: out must have ",
                    out_features(), " elements, got ", out.size());
    out.setZero();
    for (Index j = 0; j < in_features(); ++j)
      out.array() += weight_.col(j).template cast<double>().array().square();
    out = out.cwiseSqrt();
  }

  /// W = diag(g) (W0 + s B A) (B: d x r, A: r x k, g: d or empty for none), without a d x k
  /// temporary in the common case. ExactRestore builds it in a second buffer beside W0.
  /// Throws std::domain_error, leaving the weight as it was, where the result is not finite
  /// although W0 was (an infinity would survive unmerge() and corrupt W0 for good). InPlace mode
  /// updates in place when a cheap O(r (d + k)) bound proves that impossible, and otherwise builds
  /// the sum aside and checks it first.
  void merge(T s, const Eigen::Ref<const Matrix>& B, const Eigen::Ref<const Matrix>& A,
             const Eigen::Ref<const Vector>& g) {
    this->check_merge_call("DenseFrozenWeight::merge", true, g);
    if (mode_ == MergeMode::ExactRestore) {
      spare_.resize(weight_.rows(), weight_.cols());  // allocates on the first merge only
      build(spare_, s, B, A, g);
      detail::require_update_finite("DenseFrozenWeight::merge", spare_, weight_);
      weight_.swap(spare_);  // spare_ now holds the pristine W0
    } else {
      detail::require(g.size() == 0 || (g.array() != T(0)).all(),
                      "DenseFrozenWeight::merge: an InPlace merge cannot undo a zero row scale; "
                      "use MergeMode::ExactRestore");
      if (w0_max_abs_ < 0) w0_max_abs_ = detail::max_abs_finite(weight_);  // W is W0 here
      const double g_max = g.size() ? static_cast<double>(g.cwiseAbs().maxCoeff()) : 1.0;
      const double g_min = g.size() ? static_cast<double>(g.cwiseAbs().minCoeff()) : 1.0;
      // |diag(g)(W0 + D)| <= g_max (w0 + delta); the unmerge divides by g again (<= that / g_min).
      const double bound = detail::low_rank_abs_bound(s, B, A);
      if (detail::update_surely_finite<T>(g_max * w0_max_abs_, g_max * bound) &&
          detail::update_surely_finite<T>(w0_max_abs_ * g_max / g_min, bound * g_max / g_min)) {
        build(weight_, s, B, A, g);
      } else {
        Matrix merged(weight_.rows(), weight_.cols());
        build(merged, s, B, A, g);
        detail::require_update_finite("DenseFrozenWeight::merge", merged, weight_);
        weight_.swap(merged);
      }
    }
    merged_ = true;
  }

  /// Back to W0: a swap in ExactRestore mode (bit-exact, O(1)); in InPlace mode
  /// W = diag(1/g) W - s B A with the factors of the merge.
  void unmerge(T s, const Eigen::Ref<const Matrix>& B, const Eigen::Ref<const Matrix>& A,
               const Eigen::Ref<const Vector>& g) {
    this->check_merge_call("DenseFrozenWeight::unmerge", false, g);
    if (mode_ == MergeMode::ExactRestore) {
      weight_.swap(spare_);
    } else {
      if (g.size() != 0) weight_ = g.cwiseInverse().asDiagonal() * weight_;
      detail::add_low_rank(weight_, weight_, T(-s), B, A);
    }
    merged_ = false;
  }

  /// W0 = W (same shape; no allocation): the residual base of PiSSA and OLoRA. Throws
  /// std::logic_error while merged, std::invalid_argument for another shape.
  void rebase(const Eigen::Ref<const Matrix>& W) {
    this->check_rebase_call("DenseFrozenWeight::rebase", W);
    weight_ = W;
    w0_max_abs_ = -1;  // measured again at the next InPlace merge
  }

 private:
  /// H = W X, or H += W X.   W: d x k,  X: k x n,  H: d x n. On Eigen::nbThreads() threads when
  /// compiled with OpenMP. (Eigen's own H = W X zeroes H, then accumulates: starting H with other
  /// terms and accumulating costs the same as the plain product.)
  void product(const Eigen::Ref<const Matrix>& X, Eigen::Ref<Matrix> H, bool accumulate) const {
    if (!accumulate) H.setZero();
    detail::gemm_add(H, weight_, X, T(1));  // (d x k)(k x n)
  }

  /// dX (+)= W^T G: W^T is a transposed view, no copy of W is made.   G: d x n,  dX: k x n.
  void transposed_product(const Eigen::Ref<const Matrix>& G, Eigen::Ref<Matrix> dX,
                          bool accumulate) const {
    if (!accumulate) dX.setZero();
    detail::gemm_add(dX, weight_.transpose(), G, T(1));  // (k x d)(d x n)
  }

  /// dst = diag(g) (W + s B A), where W is the weight now (W0); dst may be weight_ itself.
  void build(Matrix& dst, T s, const Eigen::Ref<const Matrix>& B, const Eigen::Ref<const Matrix>& A,
             const Eigen::Ref<const Vector>& g) const {
    detail::add_low_rank(dst, weight_, s, B, A);
    if (g.size() != 0) dst = g.asDiagonal() * dst;
  }

  Matrix weight_;
  Matrix spare_;  // ExactRestore: the pristine W0 while merged
  MergeMode mode_;
  bool merged_ = false;
  double w0_max_abs_ = -1;  // InPlace: max |W0| over finite elements, measured at the first merge
};

}  // namespace lora
