// Guards against NaN and infinity: a diverging run must be reported where it starts, never folded
// silently into the frozen weight. The checks throw std::domain_error naming the matrix, the first
// bad element (column-major order) and its value.
#pragma once

#include "lora/detail/check.hpp"

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>

namespace lora::detail {

/// Throws std::domain_error if `m` holds a NaN or an infinity: "<where>: <what>(i, j) is nan".
template <typename Derived, typename W = const char*>
void require_finite(const W& where, const char* what, const Eigen::MatrixBase<Derived>& m) {
  if (m.allFinite()) return;
  for (Eigen::Index j = 0; j < m.cols(); ++j)
    for (Eigen::Index i = 0; i < m.rows(); ++i)
      if (!std::isfinite(m(i, j)))
        throw std::domain_error(concat(where, ": ", what, "(", i, ", ", j, ") is ", m(i, j)));
}

/// The largest |m_ij| over the finite elements of m (0 when there are none).
template <typename Derived>
double max_abs_finite(const Eigen::MatrixBase<Derived>& m) {
  using Scalar = typename Derived::Scalar;
  if (m.size() == 0) return 0.0;
  return static_cast<double>(m.array().isFinite().select(m.array().abs(), Scalar(0)).maxCoeff());
}

/// An upper bound on every |s * (B A)_ij|: |s| * max_i sum_l |B_il| * max |A|, in double, O(r
/// (d+k)).
template <typename BType, typename AType>
double low_rank_abs_bound(double s, const Eigen::MatrixBase<BType>& B,
                          const Eigen::MatrixBase<AType>& A) {
  if (B.size() == 0 || A.size() == 0) return 0.0;
  const double row_sum = B.template cast<double>().cwiseAbs().rowwise().sum().maxCoeff();
  const double a_max = A.template cast<double>().cwiseAbs().maxCoeff();
  return std::abs(s) * row_sum * a_max;
}

/// True when W = W0 + D with |W0| <= w0_max and |D_ij| <= delta_bound can neither overflow T in
/// merge() nor in the unmerge() that subtracts D again (|W - D| <= w0_max + 2 delta_bound), with a
/// factor-4 margin that absorbs the rounding of the sums and the drift of repeated cycles.
template <typename T>
bool update_surely_finite(double w0_max, double delta_bound) {
  const double limit = static_cast<double>(std::numeric_limits<T>::max()) / 4;
  return w0_max + 2 * delta_bound <= limit;  // false for a NaN or infinite bound too
}

/// Throws std::domain_error where `merged` is not finite although `original` is there: the
/// update overflowed. Elements already non-finite in `original` are the caller's data, not ours.
template <typename M, typename O>
void require_update_finite(const char* where, const Eigen::MatrixBase<M>& merged,
                           const Eigen::MatrixBase<O>& original) {
  if (merged.allFinite()) return;
  for (Eigen::Index j = 0; j < merged.cols(); ++j)
    for (Eigen::Index i = 0; i < merged.rows(); ++i)
      if (!std::isfinite(merged(i, j)) && std::isfinite(original(i, j)))
        throw std::domain_error(concat(where, ": W0 + s*B*A overflows at (", i, ", ", j,
                                       "): W0 = ", original(i, j), " becomes ", merged(i, j),
                                       "; the weight was left as it was"));
}

}  // namespace lora::detail
