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

namespace lora {

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
          0};
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
          0};
}

}  // namespace lora
