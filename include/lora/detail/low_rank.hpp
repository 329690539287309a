// Kernels shared by every dense frozen-weight storage: the rank-r update used by merge.
#pragma once

#include <Eigen/Core>

#include <algorithm>

namespace lora::detail {

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
  // About 128 KiB of dst per panel: half of this machine's 512 KiB L2, whatever d is.
  const Index bytes_per_column =
      std::max<Index>(1, dst.rows()) * Index(sizeof(typename Dst::Scalar));
  const Index panel = std::max<Index>(8, (Index(128) * 1024) / bytes_per_column);
  for (Index j = 0; j < dst.cols(); j += panel) {
    const Index w = std::min(panel, dst.cols() - j);
    auto dst_panel = dst.middleCols(j, w);
    if (!in_place) dst_panel = src.middleCols(j, w);
    dst_panel.noalias() += s * B * A.middleCols(j, w);  // (d x r)(r x w): r*d*w multiply-adds
  }
}

}  // namespace lora::detail
