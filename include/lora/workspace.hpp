// Workspace<T>: scratch memory that a training loop owns and passes to the out-parameter calls, so
// that a step allocates nothing once the buffers have grown to the largest batch seen.
#pragma once

#include <Eigen/Core>

#include <cstddef>

namespace lora {

/// The scratch buffers a layer uses, by role. Every call of a layer that takes a Workspace uses
/// these names, so two roles can never share a buffer by accident.
enum class Slot : int {
  LowRank,         ///< A X, r x n: the adapter's input projected to rank r
  BackProjected,   ///< B^T G, r x n: the output gradient projected to rank r
  MaskedInput,     ///< M .* X, k x n: the adapter's input under LoRA dropout
  GatheredInput,   ///< k x n_a: the columns of one adapter in a mixed batch
  GatheredGrad,    ///< d x n_a: their output gradients
  GatheredOutput,  ///< d x n_a or k x n_a: one adapter's term before it is scattered back
  // DoRA (see docs/dora.md): the row norms of W0 + s B A without a d x k matrix, and its backward.
  DoraFactorT,     ///< A^T, k x r: A as the input of the storage's product
  DoraProjected,   ///< W0 A^T, d x r
  DoraGram,        ///< A A^T, r x r
  DoraGramB,       ///< B (A A^T), d x r
  DoraScales,      ///< d x 2 per adapter: c = m / ||W|| and 1 / ||W|| (row norms of W0 + s B A)
  DoraRowSelect,   ///< d x q: unit vectors picking the q rows whose norm is recomputed exactly
  DoraRows,        ///< k x q: those rows of W0, as stored
  DoraScaledGrad,  ///< d x n: c .* G, the output gradient as the adapter's direction sees it
  DoraDirection,   ///< d x n: (W0 X + s B A X) / ||W||, recomputed or gathered for dm
  DoraBase,        ///< d x n: W0 (M .* X), the base term DoRA scales under LoRA dropout
  DoraOutputGrad,  ///< d x n: G of a mixed batch with DoRA columns as c .* G, for W^T G
  DoraInput,       ///< k x (n + r): [X, A^T], the forward's product input in evaluation mode
  DoraOutput,      ///< d x (n + r): [W0 X + s B A X, W0 A^T], that product's output
  Count            ///< the number of slots (not a slot)
};

/// Integer scratch of a layer's calls, by role (see Workspace::indices).
enum class IndexSlot : int {
  ColumnOrder,   ///< n: a mixed batch's columns, grouped by adapter
  SegmentStart,  ///< adapters + 1: where each adapter's columns start in ColumnOrder
  Count          ///< the number of index slots (not a slot)
};

template <typename T>
/// Scratch buffers for a layer's out-parameter calls, named by Slot; owned by the caller and reused
/// across steps so that a training loop allocates nothing once the buffers have grown.
class Workspace {
 public:
  /// A dense T matrix.
  using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;
  /// A view of scratch memory as a matrix.
  using View = Eigen::Map<Matrix>;
  /// A vector of indices (integer scratch).
  using IndexVector = Eigen::Matrix<Eigen::Index, Eigen::Dynamic, 1>;

  /// A rows x cols scratch matrix in `slot`; the slots are independent buffers. A buffer grows
  /// when a larger view is asked for and is never shrunk, so steady-state calls do not allocate.
  /// The contents are unspecified.
  View get(Slot slot, Eigen::Index rows, Eigen::Index cols) {
    const int i = static_cast<int>(slot);
    eigen_assert(i >= 0 && i < kSlots && "lora::Workspace: no such slot");
    eigen_assert(rows >= 0 && cols >= 0 && "lora::Workspace: negative size");
    Buffer& b = slots_[i];
    if (b.size() < rows * cols) b.resize(rows * cols);
    return View(b.data(), rows, cols);
  }

  /// An integer scratch vector of `size` in `slot`, grown like get()'s buffers, never shrunk.
  Eigen::Map<IndexVector> indices(IndexSlot slot, Eigen::Index size) {
    const int i = static_cast<int>(slot);
    eigen_assert(i >= 0 && i < kIndexSlots && "lora::Workspace: no such index slot");
    IndexVector& b = index_slots_[i];
    if (b.size() < size) b.resize(size);
    return Eigen::Map<IndexVector>(b.data(), size);
  }

  /// Bytes held by all slots.
  std::size_t bytes() const;

  /// The number of slots (Slot::Count).
  static constexpr int kSlots = static_cast<int>(Slot::Count);
  /// The number of index slots (IndexSlot::Count).
  static constexpr int kIndexSlots = static_cast<int>(IndexSlot::Count);

 private:
  using Buffer = Eigen::Matrix<T, Eigen::Dynamic, 1>;
  Buffer slots_[kSlots];
  IndexVector index_slots_[kIndexSlots];
};

// Out of the class so that it is not inline: a file that sees `extern template class Workspace<T>`
// (lora/extern_templates.hpp) does not instantiate it.

template <typename T>
std::size_t Workspace<T>::bytes() const {
  std::size_t n = 0;
  for (const Buffer& b : slots_) n += static_cast<std::size_t>(b.size()) * sizeof(T);
  for (const IndexVector& b : index_slots_)
    n += static_cast<std::size_t>(b.size()) * sizeof(Eigen::Index);
  return n;
}

}  // namespace lora
