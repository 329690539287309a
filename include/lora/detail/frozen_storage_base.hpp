// What every frozen storage shares (the contract is in lora/frozen_storage.hpp): the type
// aliases, the three product entry points over one kernel per orientation,
//   product(X, H, accumulate)              H = W X, or H += W X
//   transposed_product(G, dX, accumulate)  dX = W^T G, or dX += W^T G
// and the checks every merge and unmerge makes. A storage derives from
// FrozenStorageBase<Itself, Scalar> (CRTP) and befriends it, so these are written once.
#pragma once

#include "lora/detail/check.hpp"

#include <Eigen/Core>

#include <cmath>
#include <memory>
#include <stdexcept>

namespace lora::detail {

template <typename Derived, typename S>
class FrozenStorageBase {
 public:
  using Scalar = S;  ///< the type of the layer's inputs, outputs and adapter
  using Matrix = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic>;  ///< a dense Scalar matrix
  using Vector = Eigen::Matrix<S, Eigen::Dynamic, 1>;               ///< a dense Scalar vector
  using Index = Eigen::Index;                                       ///< Eigen's index type

  /// H = W X.   X: k x n,  H: d x n (overwritten; must not alias X).
  void multiply(const Eigen::Ref<const Matrix>& X, Eigen::Ref<Matrix> H) const {
    self().product(X, H, false);
  }
  /// H += W X: the layer writes its low-rank term and bias into H first.
  void multiply_add(const Eigen::Ref<const Matrix>& X, Eigen::Ref<Matrix> H) const {
    self().product(X, H, true);
  }
  /// dX += W^T G.   G: d x n,  dX: k x n (must not alias G).
  void multiply_transposed_add(const Eigen::Ref<const Matrix>& G, Eigen::Ref<Matrix> dX) const {
    self().transposed_product(G, dX, true);
  }

 protected:
  /// The checks of merge (merging = true) and unmerge: the merge state, and a row scale g of d
  /// elements or none. `who` names the call ("Bf16FrozenWeight::merge").
  void check_merge_call(const char* who, bool merging, const Eigen::Ref<const Vector>& g) const;

  /// The check of an InPlace merge's row scale, before anything is written: unmerge() divides
  /// row i by g_i again, so g_i and 1 / g_i must both be finite in S. A zero g_i, or a tiny one (a
  /// DoRA magnitude of 1e-40 gives 1 / g_i = inf in float), would bring W0's row back as inf or
  /// NaN for good: std::domain_error naming the row, weight untouched.
  void check_inverse_row_scale(const char* who, const Eigen::Ref<const Vector>& g) const;

  /// The checks of rebase: not merged, and W of the storage's shape. `who` names the call.
  void check_rebase_call(const char* who, const Eigen::Ref<const Matrix>& W) const;

 private:
  const Derived& self() const { return static_cast<const Derived&>(*this); }
};

// The checks, out of the class and not inline, as the members of the storages that call them (see
// lora/extern_templates.hpp).

template <typename Derived, typename S>
void FrozenStorageBase<Derived, S>::check_merge_call(const char* who, bool merging,
                                                     const Eigen::Ref<const Vector>& g) const {
  require_state(self().is_merged() != merging, who,
                merging ? ": a delta is already merged" : ": nothing is merged");
  require(g.size() == 0 || g.size() == self().out_features(), who, ": the row scale must have ",
          self().out_features(), " elements or none, got ", g.size());
}

template <typename Derived, typename S>
void FrozenStorageBase<Derived, S>::check_inverse_row_scale(
    const char* who, const Eigen::Ref<const Vector>& g) const {
  for (Index i = 0; i < g.size(); ++i) {
    const S inverse = S(1) / g(i);  // as unmerge computes it
    if (std::isfinite(g(i)) && std::isfinite(inverse)) continue;
    throw std::domain_error(concat(
        who, ": the row scale of row ", i, " is ", g(i), " and its inverse ", inverse,
        ": an InPlace unmerge() divides by it and could not give W0 back (a zero or tiny DoRA "
        "magnitude, or a zero row of W0 + s*B*A); the weight was left as it was; use "
        "MergeMode::ExactRestore"));
  }
}

template <typename Derived, typename S>
void FrozenStorageBase<Derived, S>::check_rebase_call(const char* who,
                                                      const Eigen::Ref<const Matrix>& W) const {
  require_state(!self().is_merged(), who, ": the weight is merged; call unmerge() first");
  require(W.rows() == self().out_features() && W.cols() == self().in_features(), who,
          ": the new base must be ", shape_string(self().out_features(), self().in_features()),
          ", got ", shape_string(W.rows(), W.cols()));
}

/// Per-object state that a copy must not share (cached oneDNN primitives, a mutex, scratch): a
/// copy starts with a fresh, empty State of its own (or none, if the original had none), so the
/// storage's copy constructor and assignment can stay the defaults.
template <typename State>
class FreshOnCopy {
 public:
  FreshOnCopy() = default;
  FreshOnCopy(const FreshOnCopy& o) : p_(o.p_ ? std::make_unique<State>() : nullptr) {}
  FreshOnCopy& operator=(const FreshOnCopy& o) {
    if (this != &o) p_ = o.p_ ? std::make_unique<State>() : nullptr;
    return *this;
  }
  FreshOnCopy(FreshOnCopy&&) noexcept = default;
  FreshOnCopy& operator=(FreshOnCopy&&) noexcept = default;

  void create() { p_ = std::make_unique<State>(); }  ///< a fresh State
  State* operator->() const { return p_.get(); }
  State& operator*() const { return *p_; }
  explicit operator bool() const { return p_ != nullptr; }

 private:
  std::unique_ptr<State> p_;
};

}  // namespace lora::detail
