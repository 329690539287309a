// Always-on argument checks for the public API: they throw std::invalid_argument (bad input) or
// std::logic_error (a call that is wrong in the object's current state), and the message names
// both what was expected and what came.
#pragma once

#include <Eigen/Core>

#include <ostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace lora::detail {

/// "Face::method" in a message, without building a string unless the message is built: the one
/// layer core serves several faces (LoRALinear, MultiLoRALinear) and names the one in use.
struct Where {
  const char* face;
  const char* method;
};

inline std::ostream& operator<<(std::ostream& out, const Where& w) {
  return out << w.face << "::" << w.method;
}

/// "rows x cols", the way every shape appears in an error message.
inline std::string shape_string(Eigen::Index rows, Eigen::Index cols) {
  std::ostringstream s;
  s << rows << " x " << cols;
  return s.str();
}

/// Concatenates its arguments with operator<< (a tiny, dependency-free formatter for messages).
template <typename... Parts>
std::string concat(Parts&&... parts) {
  std::ostringstream s;
  (s << ... << std::forward<Parts>(parts));
  return s.str();
}

template <typename... Parts>
void require(bool ok, Parts&&... message) {
  if (!ok) throw std::invalid_argument(concat(std::forward<Parts>(message)...));
}

template <typename... Parts>
void require_state(bool ok, Parts&&... message) {
  if (!ok) throw std::logic_error(concat(std::forward<Parts>(message)...));
}

/// Throws unless `actual` is rows x cols; `what` names the argument ("X", "G", ...).
template <typename Derived, typename W = const char*>
void require_shape(const W& where, const char* what, const Eigen::EigenBase<Derived>& actual,
                   Eigen::Index rows, Eigen::Index cols) {
  if (actual.rows() != rows || actual.cols() != cols) {
    throw std::invalid_argument(concat(where, ": ", what, " must be ", shape_string(rows, cols),
                                       ", got ", shape_string(actual.rows(), actual.cols())));
  }
}

/// Throws unless `actual` has `rows` rows (any column count): the batch dimension is free.
template <typename Derived, typename W = const char*>
void require_rows(const W& where, const char* what, const Eigen::EigenBase<Derived>& actual,
                  Eigen::Index rows, const char* meaning) {
  if (actual.rows() != rows) {
    throw std::invalid_argument(concat(where, ": ", what, " must have ", rows, " rows (", meaning,
                                       "), got ", shape_string(actual.rows(), actual.cols())));
  }
}

/// True when every coefficient is finite (no NaN, no infinity).
template <typename Derived>
bool all_finite(const Eigen::MatrixBase<Derived>& m) {
  return m.allFinite();
}

/// True when the coefficients of a and b (column-major, inner stride 1) share memory: an output
/// that overlaps an input would be overwritten while still being read.
template <typename A, typename B>
bool overlaps(const A& a, const B& b) {
  if (a.size() == 0 || b.size() == 0) return false;
  const auto* a0 = reinterpret_cast<const char*>(a.data());
  const auto* b0 = reinterpret_cast<const char*>(b.data());
  const auto* a1 =
      reinterpret_cast<const char*>(a.data() + (a.cols() - 1) * a.outerStride() + a.rows());
  const auto* b1 =
      reinterpret_cast<const char*>(b.data() + (b.cols() - 1) * b.outerStride() + b.rows());
  return a0 < b1 && b0 < a1;
}

template <typename Out, typename In, typename W = const char*>
void require_no_alias(const W& where, const char* out_name, const Out& out, const char* in_name,
                      const In& in) {
  require(!overlaps(out, in), where, ": ", out_name, " must not share memory with ", in_name);
}

// The argument checks that every layer (LoRALinear, MultiLoRALinear) shares. The layer has a d x k
// weight; X is k x n with any batch n.

/// forward: X is k x n, H is d x n and shares no memory with X.
template <typename In, typename Out, typename W = const char*>
void require_forward_args(const W& where, const In& X, const Out& H, Eigen::Index d,
                          Eigen::Index k) {
  require_rows(where, "X", X, k, "in_features");
  require_shape(where, "H", H, d, X.cols());
  require_no_alias(where, "H", H, "X", X);
}

/// backward's inputs: X is k x n and G = dL/dH is d x n.
template <typename In, typename Grad, typename W = const char*>
void require_backward_args(const W& where, const In& X, const Grad& G, Eigen::Index d,
                           Eigen::Index k) {
  require_rows(where, "X", X, k, "in_features");
  require_shape(where, "G", G, d, X.cols());
}

/// backward's output dX = dL/dX: k x n like X, and apart from both X and G.
template <typename Out, typename In, typename Grad, typename W = const char*>
void require_input_gradient_arg(const W& where, const Out& dX, const In& X, const Grad& G) {
  require_shape(where, "dX", dX, X.rows(), X.cols());
  require_no_alias(where, "dX", dX, "X", X);
  require_no_alias(where, "dX", dX, "G", G);
}

}  // namespace lora::detail
