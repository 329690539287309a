// Kernels shared by every dense frozen-weight storage and by the layer: the rank-r update used by
// merge, and the fused pass that starts an output with its low-rank term and bias.
#pragma once

#include "lora/detail/gemm.hpp"

#include <Eigen/Core>

#include <algorithm>
#include <type_traits>

namespace lora::detail {

/// Columns per panel so that a panel of a matrix with `rows` rows of `bytes` each is about 128 KiB:
/// half of a 256 KiB to 1 MiB L2, whatever the shape.
inline Eigen::Index panel_columns(Eigen::Index rows, Eigen::Index bytes, Eigen::Index at_least) {
  const Eigen::Index bytes_per_column = std::max<Eigen::Index>(1, rows) * bytes;
  return std::max<Eigen::Index>(at_least, (Eigen::Index(128) * 1024) / bytes_per_column);
}

/// dst = src + s * B * A, one column panel at a time so that each panel of the rank-r product is
/// added while it is still in cache: the whole update reads src once and writes dst once (the cost
/// of a plain copy), and no d x k temporary is ever formed. dst and src may be the same matrix
/// (an in-place update); otherwise they must not overlap.
///   src, dst: d x k    B: d x r    A: r x k
template <typename Dst, typename Src, typename BType, typename AType>
void add_low_rank(Eigen::MatrixBase<Dst>& dst, const Eigen::MatrixBase<Src>& src,
                  typename Dst::Scalar s, const Eigen::MatrixBase<BType>& B,
                  const Eigen::MatrixBase<AType>& A) {
  using Index = Eigen::Index;
  const bool in_place = static_cast<const void*>(dst.derived().data()) ==
                        static_cast<const void*>(src.derived().data());
  const Index panel = panel_columns(dst.rows(), Index(sizeof(typename Dst::Scalar)), 8);
  const Index panels = (dst.cols() + panel - 1) / panel;
  // Panels are independent: with OpenMP each thread takes its share (gemm_add runs serially
  // inside the parallel region and allocates nothing).
  parallel_for(panels, Eigen::nbThreads(), [&](Index p) {
    const Index j = p * panel;
    const Index w = std::min(panel, dst.cols() - j);
    auto dst_panel = dst.middleCols(j, w);
    if (!in_place) dst_panel = src.middleCols(j, w);
    gemm_add(dst_panel, B.derived(), A.derived().middleCols(j, w), s);  // (d x r)(r x w)
  });
}

template <typename M>
struct is_transpose : std::false_type {};
template <typename M>
struct is_transpose<Eigen::Transpose<M>> : std::true_type {};

/// dst = s * L * R, plus `bias` added to every column when it is not empty, in one pass over dst:
/// the pass that a dense product `dst = W * X` would spend zeroing dst before accumulating, so a
/// caller that follows with `dst += W * X` pays nothing for the low-rank term's memory traffic.
/// Each column panel of dst is written while in cache (Eigen's own `dst = L * R` zeroes all of
/// dst first, then reads and writes it again); with OpenMP the panels are shared among threads.
///   dst: m x n    L: m x r (a matrix, or the transpose of one)    R: r x n    bias: m or empty
template <typename Dst, typename LType, typename RType, typename Bias>
void assign_low_rank(Eigen::MatrixBase<Dst>& dst, typename Dst::Scalar s,
                     const Eigen::MatrixBase<LType>& L, const Eigen::MatrixBase<RType>& R,
                     const Eigen::MatrixBase<Bias>& bias) {
  using Index = Eigen::Index;
  const Index panel = panel_columns(dst.rows(), Index(sizeof(typename Dst::Scalar)), 4);
  const Index panels = (dst.cols() + panel - 1) / panel;
  // Threads only where the pass is worth a parallel region (about a million multiply-adds).
  const double work = double(dst.rows()) * double(dst.cols()) * double(L.cols() + 1);
  parallel_for(panels, work > 1e6 ? Eigen::nbThreads() : 1, [&](Index p) {
    const Index j = p * panel;
    const Index w = std::min(panel, dst.cols() - j);
    auto dst_panel = dst.middleCols(j, w);
    if constexpr (is_transpose<LType>::value) {
      // A transposed (row-major) L does not vectorise as a coefficient-wise product: use the
      // GEMM kernel on the panel, which is in cache after the zeroing.
      dst_panel.setZero();
      gemm_add(dst_panel, L.derived(), R.derived().middleCols(j, w), s);  // (m x r)(r x w)
    } else {
      // s applied to the result: (s * L).lazyProduct would evaluate s * L into a temporary.
      dst_panel.noalias() = s * L.derived().lazyProduct(R.derived().middleCols(j, w));
    }
    if (bias.size() != 0) dst_panel.colwise() += bias;
  });
}

}  // namespace lora::detail
