// The low-rank half of a mixed-adapter batch, segment by segment (Punica's SGMV on a CPU): the
// columns are grouped by adapter with one counting sort (O(n + adapters), no per-adapter scan of
// the batch), then each adapter's segment is shrunk, A_a X_seg (r x n_a), and expanded,
// s_a B_a (A_a X_seg), straight into its columns of H. A segment of adjacent columns, and a single
// column (a decode batch), is read and written in place; only a scattered segment is gathered.
// Each adapter's A and B are read once per batch; nothing is allocated once the workspace has
// grown.
#pragma once

#include "lora/adapter.hpp"
#include "lora/workspace.hpp"

#include <Eigen/Core>

namespace lora::detail {

/// A mixed batch's columns grouped by adapter: adapter a's columns, in increasing order, are
/// order(starts(a)), ..., order(starts(a + 1) - 1). Columns without an adapter are not listed.
struct ColumnGroups {
  Eigen::Map<Eigen::Matrix<Eigen::Index, Eigen::Dynamic, 1>> order;   ///< the grouped columns
  Eigen::Map<Eigen::Matrix<Eigen::Index, Eigen::Dynamic, 1>> starts;  ///< count + 1 offsets
  /// The number of adapter a's columns.
  Eigen::Index size(Eigen::Index a) const { return starts(a + 1) - starts(a); }
};

/// Groups columns 0..n-1 by ids[j] (in [0, count), or negative for none): a stable counting sort,
/// O(n + count), into the workspace's index slots.
template <typename T>
ColumnGroups group_columns(const int* ids, Eigen::Index n, Eigen::Index count, Workspace<T>& ws) {
  ColumnGroups g{ws.indices(IndexSlot::ColumnOrder, n),
                 ws.indices(IndexSlot::SegmentStart, count + 1)};
  g.starts.setZero();
  for (Eigen::Index j = 0; j < n; ++j)
    if (ids[j] >= 0) ++g.starts(ids[j] + 1);
  for (Eigen::Index a = 0; a < count; ++a) g.starts(a + 1) += g.starts(a);
  // starts(a) now points at adapter a's first slot; fill, then shift back by one segment.
  for (Eigen::Index j = 0; j < n; ++j)
    if (ids[j] >= 0) g.order(g.starts(ids[j])++) = j;
  for (Eigen::Index a = count; a > 0; --a) g.starts(a) = g.starts(a - 1);
  g.starts(0) = 0;
  return g;
}

/// For each column j of a mixed batch: H_j = s_a B_a (A_a X_j) + bias with a = ids[j] >= 0
/// (adapter_of(a) returns its LoRAAdapter<T>), H_j = bias for ids[j] < 0
/// (bias: length d, or empty for none). The frozen product is then accumulated on top by the
/// caller. Cost: O(sum_a r_a (d + k) n_a), each adapter's factors read once.
template <typename T, typename AdapterOf, typename Bias>
void assign_segmented_low_rank(const Eigen::Ref<const Eigen::Matrix<T, -1, -1>>& X, const int* ids,
                               Eigen::Index count, AdapterOf&& adapter_of,
                               const Eigen::MatrixBase<Bias>& bias,
                               Eigen::Ref<Eigen::Matrix<T, -1, -1>> H, Workspace<T>& ws) {
  using Index = Eigen::Index;
  const Index n = X.cols(), d = H.rows(), k = X.rows();
  for (Index j = 0; j < n; ++j) {
    if (ids[j] >= 0) continue;
    if (bias.size() != 0) {
      H.col(j) = bias;
    } else {
      H.col(j).setZero();
    }
  }
  const ColumnGroups g = group_columns(ids, n, count, ws);
  for (Index a = 0; a < count; ++a) {
    const Index n_a = g.size(a);
    if (n_a == 0) continue;
    const LoRAAdapter<T>& ad = adapter_of(static_cast<int>(a));
    auto AX = ws.get(Slot::LowRank, ad.rank(), n_a);
    const Index first = g.order(g.starts(a));
    if (g.order(g.starts(a) + n_a - 1) - first == n_a - 1) {
      // Adjacent columns (one column included): shrink and expand in place.
      ad.assign_forward(X.middleCols(first, n_a), H.middleCols(first, n_a), AX, bias);
      continue;
    }
    auto Xa = ws.get(Slot::GatheredInput, k, n_a);
    for (Index c = 0; c < n_a; ++c) Xa.col(c) = X.col(g.order(g.starts(a) + c));
    auto Ya = ws.get(Slot::GatheredOutput, d, n_a);
    ad.assign_forward(Xa, Ya, AX, bias);
    for (Index c = 0; c < n_a; ++c) H.col(g.order(g.starts(a) + c)) = Ya.col(c);
  }
}

}  // namespace lora::detail
