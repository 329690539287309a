// Always-on argument checks for the public API: they throw std::invalid_argument (bad input) or
// std::logic_error (a call that is wrong in the object's current state), and the message names
// both what was expected and what came.
#pragma once

#include <Eigen/Core>

#include <algorithm>
#include <cstdint>
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

/// The bytes an Eigen matrix or block covers, as `count` runs of `length` bytes whose starts are
/// `stride` bytes apart (a column-major block: one run per column, stride = outer stride).
struct MemorySpan {
  std::intptr_t begin = 0, length = 0, stride = 0;
  Eigen::Index count = 0;
};

template <typename M>
MemorySpan memory_span(const M& m) {
  // Element (i, j) is at data + i * rowStride + j * colStride (Eigen's strides, which account for
  // the storage order and for vectors). Runs go along the direction of stride 1.
  const auto elem = static_cast<std::intptr_t>(sizeof(typename M::Scalar));
  const auto rs = static_cast<std::intptr_t>(m.rowStride());
  const auto cs = static_cast<std::intptr_t>(m.colStride());
  const bool along_rows = !(rs == 1 || m.rows() == 1) && (cs == 1 || m.cols() == 1);
  const Eigen::Index runs = along_rows ? m.rows() : m.cols();
  const Eigen::Index per_run = along_rows ? m.cols() : m.rows();
  const std::intptr_t step = along_rows ? cs : rs;    // within a run (1 unless odd strides)
  const std::intptr_t stride = along_rows ? rs : cs;  // from one run to the next
  MemorySpan s;
  s.begin = reinterpret_cast<std::intptr_t>(m.data());
  // A step other than 1 spreads a run out: cover its whole extent (conservative).
  s.length = (static_cast<std::intptr_t>(per_run - 1) * step + 1) * elem;
  s.stride = stride * elem;
  s.count = runs;
  if (s.stride <= 0) s.count = 1;  // every run at the same address (a zero stride)
  return s;
}

/// floor(a / b) for b > 0.
inline std::intptr_t floor_div(std::intptr_t a, std::intptr_t b) {
  return a >= 0 ? a / b : -((-a + b - 1) / b);
}

/// True when a run of `a` and a run of `b` share a byte. Walks the span with fewer runs and, for
/// each run [lo, hi), finds the runs c of `b` with begin + c stride < hi and
/// begin + c stride + length > lo: O(min(a.count, b.count)).
inline bool spans_intersect(MemorySpan a, MemorySpan b) {
  if (a.count > b.count) std::swap(a, b);
  for (Eigen::Index c = 0; c < a.count; ++c) {
    const std::intptr_t lo = a.begin + static_cast<std::intptr_t>(c) * a.stride;
    const std::intptr_t hi = lo + a.length;
    if (b.count == 1) {
      if (lo < b.begin + b.length && b.begin < hi) return true;
      continue;
    }
    std::intptr_t first = floor_div(lo - b.begin - b.length, b.stride) + 1;
    std::intptr_t last = floor_div(hi - b.begin - 1, b.stride);
    first = std::max<std::intptr_t>(first, 0);
    last = std::min<std::intptr_t>(last, static_cast<std::intptr_t>(b.count) - 1);
    if (first <= last) return true;
  }
  return false;
}

/// True when a and b share a coefficient's memory: an output that overlaps an input would be
/// overwritten while still being read. Two blocks of one matrix whose bounding address ranges
/// interleave but that share no element (S.topRows(5) and S.bottomRows(5)) do not overlap.
template <typename A, typename B>
bool overlaps(const A& a, const B& b) {
  if (a.size() == 0 || b.size() == 0) return false;
  const MemorySpan sa = memory_span(a), sb = memory_span(b);
  // Fast path: the bounding ranges are apart (distinct matrices, the usual case).
  const std::intptr_t a_end =
      sa.begin + (static_cast<std::intptr_t>(sa.count) - 1) * sa.stride + sa.length;
  const std::intptr_t b_end =
      sb.begin + (static_cast<std::intptr_t>(sb.count) - 1) * sb.stride + sb.length;
  if (a_end <= sb.begin || b_end <= sa.begin) return false;
  return spans_intersect(sa, sb);
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
