// ParameterView<T>: one trainable tensor as a (value, gradient) pair of Eigen::Maps, the currency
// of the optimizers and the data-parallel reducer.
//
// A view of an adapter's tensor also holds a share of the adapter's storage, so it can never
// dangle: destroying or moving the layer, or replacing its adapter, never frees memory a view
// points to. When the adapter's tensor is reallocated (an adapter of another rank loaded into the
// layer, the lora bias removed) or the adapter is destroyed, the view becomes stale, and every
// optimizer refuses a stale view with std::logic_error naming it, instead of updating storage that
// no layer reads any more.
#pragma once

#include "lora/detail/check.hpp"

#include <Eigen/Core>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace lora {

/// The columns of a gradient that may be non-zero, for a tensor whose gradient is column-sparse
/// (an embedding's A: a batch touches only the columns of the token ids it holds). Marking and
/// clearing cost O(1) per column; the storage is sized once, when tracking starts.
struct ColumnSubset {
  /// True when any column may be non-zero (a dense gradient): `list` is then not used.
  bool all = true;
  /// The columns marked since the last clear(), each once, in the order first marked.
  std::vector<Eigen::Index> list;
  /// marked[j] != 0 when column j is in `list`.
  std::vector<unsigned char> marked;
  /// True when mark_all() turned a tracker dense until the next clear().
  bool dense_until_clear = false;

  ColumnSubset() = default;
  /// A copy keeps room for every column, so marking never allocates.
  ColumnSubset(const ColumnSubset& o)
      : all(o.all), marked(o.marked), dense_until_clear(o.dense_until_clear) {
    list.reserve(o.marked.size());
    list = o.list;
  }
  /// As the copy constructor.
  ColumnSubset& operator=(const ColumnSubset& o) {
    if (this != &o) {
      all = o.all;
      marked = o.marked;
      dense_until_clear = o.dense_until_clear;
      list.reserve(o.marked.size());
      list = o.list;
    }
    return *this;
  }

  /// Starts tracking a matrix of `cols` columns, none marked (allocates here, never afterwards).
  void track(Eigen::Index cols) {
    all = false;
    marked.assign(static_cast<std::size_t>(cols), 0);
    list.clear();
    list.reserve(static_cast<std::size_t>(cols));
  }
  /// True while tracking (not `all`).
  bool sparse() const { return !all; }
  /// Adds column j (no-op when already marked or when not tracking).
  void mark(Eigen::Index j) {
    if (all) return;
    unsigned char& m = marked[static_cast<std::size_t>(j)];
    if (m == 0) {
      m = 1;
      list.push_back(j);
    }
  }
  /// Every column may now be non-zero, until the next clear().
  void mark_all() {
    if (all) return;
    for (Eigen::Index j : list) marked[static_cast<std::size_t>(j)] = 0;
    list.clear();
    all = true;
    dense_until_clear = true;
  }
  /// No column marked (after the gradient's marked columns were zeroed); a tracker made dense by
  /// mark_all() tracks again.
  void clear() {
    if (dense_until_clear) {
      all = false;
      dense_until_clear = false;
    }
    for (Eigen::Index j : list) marked[static_cast<std::size_t>(j)] = 0;
    list.clear();
  }
};

/// The generation of one tensor's storage, shared between its owner and the views of it: the
/// owner bumps `generation` whenever the tensor's buffer is reallocated or retired.
struct TensorLifetime {
  /// Moves on whenever the tensor's buffer is reallocated or retired.
  std::uint64_t generation = 0;
};

/// One trainable tensor: its value and its gradient dL/dvalue, of the same shape, column-major.
template <typename T>
struct ParameterView {
  /// A dense T matrix.
  using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;

  /// The tensor's values (column-major; a vector is n x 1).
  Eigen::Map<Matrix> value;
  Eigen::Map<Matrix> grad;  ///< same shape as value
  /// What the view is of, for messages ("A", "B", "lora_bias", or a caller's name).
  std::string name;
  /// Keeps the storage alive (null for a view of the caller's own matrices, whose lifetime the
  /// caller manages) and tells whether the view still sees the tensor's current buffer.
  std::shared_ptr<const void> keep_alive;
  /// The tensor's lifetime (in the block keep_alive holds), or null.
  const TensorLifetime* lifetime = nullptr;
  /// The lifetime's generation when the view was taken.
  std::uint64_t generation = 0;
  /// For a column-sparse gradient (an embedding's A), the columns that may be non-zero; null (or
  /// `all`) for a dense one. The optimizers then update only those columns, lazily (see optim.hpp),
  /// and lora::zero_grad zeroes only them. Lives in the block keep_alive holds.
  ColumnSubset* columns = nullptr;

  /// True when only the columns in `columns` may hold a gradient.
  bool sparse_columns() const { return columns != nullptr && columns->sparse(); }

  /// False once the tensor this view was taken from has been reallocated or destroyed.
  bool valid() const { return lifetime == nullptr || lifetime->generation == generation; }

  /// Throws std::logic_error unless valid(), naming the tensor and what to do.
  void require_valid(const char* where) const {
    detail::require_state(valid(), where, ": parameter \"", name,
                          "\" is stale: its adapter was replaced by one of another shape, its "
                          "lora bias removed, or its layer destroyed; take the parameters again "
                          "(e.g. adapter_parameters(layer)) and build a new optimizer");
  }
};

/// A view of a caller-owned matrix parameter and its gradient; throws std::invalid_argument when
/// the shapes differ or when both are the same storage. The matrices must outlive the view and
/// must not be resized while it is in use.
template <typename T>
ParameterView<T> make_parameter(Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>& value,
                                Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>& grad,
                                std::string name = "parameter") {
  detail::require_shape("lora::make_parameter", "grad", grad, value.rows(), value.cols());
  detail::require_no_alias("lora::make_parameter", "grad", grad, "value", value);
  return {{value.data(), value.rows(), value.cols()},
          {grad.data(), grad.rows(), grad.cols()},
          std::move(name),
          nullptr,
          nullptr,
          0,
          nullptr};
}

/// A view of a caller-owned vector parameter (a bias, say) as an n x 1 matrix.
template <typename T>
ParameterView<T> make_parameter(Eigen::Matrix<T, Eigen::Dynamic, 1>& value,
                                Eigen::Matrix<T, Eigen::Dynamic, 1>& grad,
                                std::string name = "parameter") {
  detail::require_shape("lora::make_parameter", "grad", grad, value.rows(), value.cols());
  detail::require_no_alias("lora::make_parameter", "grad", grad, "value", value);
  return {{value.data(), value.rows(), 1},
          {grad.data(), grad.rows(), 1},
          std::move(name),
          nullptr,
          nullptr,
          0,
          nullptr};
}

}  // namespace lora
