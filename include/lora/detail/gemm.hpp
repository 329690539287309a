// C += alpha * L * R on Eigen's own GEMM kernel, without a heap allocation per call.
//
// Eigen's `C.noalias() += L * R` mallocs its packing buffers on every call once they exceed
// EIGEN_STACK_ALLOCATION_LIMIT (128 KiB: any product of a real layer), and its OpenMP path
// allocates the shared packed block too. This drives the same kernel
// (internal::general_matrix_matrix_product) with packing buffers that each thread keeps and only
// grows, so a training step's products allocate nothing in steady state. With OpenMP the work is
// split into one slab of rows (or columns) per thread; without it everything runs on the caller's
// thread. The thread count is Eigen's: Eigen::nbThreads() (OMP_NUM_THREADS, or
// Eigen::setNbThreads).
//
// Eigen's internal:: interfaces are not a public API. This file was written against Eigen 3.4
// (3.4.0 to 3.4.x); with any other version, or with LORA_GEMM_USE_EIGEN_PRODUCTS defined (CI
// builds one test binary that way, so the fallback cannot rot), gemm_add uses Eigen's public
// products instead: the same results, with Eigen's per-call allocations.
#pragma once

#include <Eigen/Core>

#include <algorithm>

#if defined(_OPENMP)
#include <omp.h>
#endif

#if !defined(LORA_GEMM_USE_EIGEN_PRODUCTS) && \
    !(EIGEN_WORLD_VERSION == 3 && EIGEN_MAJOR_VERSION == 4)
#define LORA_GEMM_USE_EIGEN_PRODUCTS 1
#endif

namespace lora::detail {

/// True when gemm_add drives Eigen's kernel with its own buffers (no allocation in steady state);
/// false on the public-product fallback.
#if defined(LORA_GEMM_USE_EIGEN_PRODUCTS)
inline constexpr bool kGemmAllocationFree = false;
#else
inline constexpr bool kGemmAllocationFree = true;
#endif

/// Runs f(0), ..., f(count - 1), on `threads` OpenMP threads when there are more than one and
/// this is not already inside a parallel region. With one thread no OpenMP region is entered at
/// all: libgomp allocates a team for every single-thread region.
template <typename F>
void parallel_for(Eigen::Index count, int threads, F&& f) {
#if defined(_OPENMP)
  if (threads > 1 && count > 1 && !omp_in_parallel()) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (Eigen::Index i = 0; i < count; ++i) f(i);
    return;
  }
#endif
  (void)threads;
  for (Eigen::Index i = 0; i < count; ++i) f(i);
}

/// One GEMM operand as raw storage: column-major, or row-major (a transposed view).
template <typename Scalar>
struct GemmOperand {
  const Scalar* data;
  Eigen::Index stride;  // outer stride of the stored (untransposed) matrix
  bool row_major;
};

template <typename Derived>
GemmOperand<typename Derived::Scalar> gemm_operand(const Eigen::PlainObjectBase<Derived>& m) {
  return {m.data(), m.outerStride(), false};
}
template <typename M, int Options, typename Stride>
GemmOperand<typename M::Scalar> gemm_operand(const Eigen::Ref<M, Options, Stride>& m) {
  static_assert(!(M::Flags & Eigen::RowMajorBit), "lora::detail::gemm: column-major operands only");
  return {m.data(), m.outerStride(), false};
}
template <typename M, int Options, typename Stride>
GemmOperand<typename M::Scalar> gemm_operand(const Eigen::Map<M, Options, Stride>& m) {
  static_assert(!(M::Flags & Eigen::RowMajorBit), "lora::detail::gemm: column-major operands only");
  return {m.data(), m.outerStride(), false};
}
template <typename XprType, int BlockRows, int BlockCols, bool InnerPanel>
GemmOperand<typename XprType::Scalar> gemm_operand(
    const Eigen::Block<XprType, BlockRows, BlockCols, InnerPanel>& m) {
  return {m.data(), m.outerStride(), false};
}
/// A transposed column-major matrix is the same storage read row-major: no copy.
template <typename M>
GemmOperand<typename M::Scalar> gemm_operand(const Eigen::Transpose<M>& t) {
  const auto flipped = gemm_operand(t.nestedExpression());
  return {flipped.data, flipped.stride, !flipped.row_major};
}

#if !defined(LORA_GEMM_USE_EIGEN_PRODUCTS)
/// Per-thread, grow-only packing buffers (slot 0: the packed L block, slot 1: the packed R block).
template <typename Scalar>
Scalar* gemm_buffer(int slot, Eigen::Index count) {
  thread_local Eigen::Matrix<Scalar, Eigen::Dynamic, 1> buffers[2];
  auto& b = buffers[slot];
  if (b.size() < count) b.resize(count);
  return b.data();
}

/// Blocking sizes with buffers supplied from outside (Eigen's own level3_blocking interface).
template <typename Scalar>
class ExternalBlocking : public Eigen::internal::level3_blocking<Scalar, Scalar> {
 public:
  ExternalBlocking(Eigen::Index rows, Eigen::Index cols, Eigen::Index depth) {
    this->m_mc = rows;
    this->m_nc = cols;
    this->m_kc = depth;
    Eigen::internal::computeProductBlockingSizes<Scalar, Scalar, 1, Eigen::Index>(
        this->m_kc, this->m_mc, this->m_nc, 1);
    this->m_blockA = gemm_buffer<Scalar>(0, this->m_kc * this->m_mc);
    this->m_blockB = gemm_buffer<Scalar>(1, this->m_kc * this->m_nc);
  }
};

/// The serial kernel for one block of C: rows x cols += alpha * L(rows x depth) * R(depth x cols).
template <typename Scalar, bool LRowMajor, bool RRowMajor>
void gemm_serial(Eigen::Index rows, Eigen::Index cols, Eigen::Index depth, const Scalar* L,
                 Eigen::Index ldl, const Scalar* R, Eigen::Index ldr, Scalar* C, Eigen::Index ldc,
                 Scalar alpha) {
  using Kernel = Eigen::internal::general_matrix_matrix_product<
      Eigen::Index, Scalar, LRowMajor ? Eigen::RowMajor : Eigen::ColMajor, false, Scalar,
      RRowMajor ? Eigen::RowMajor : Eigen::ColMajor, false, Eigen::ColMajor, 1>;
  ExternalBlocking<Scalar> blocking(rows, cols, depth);
  Kernel::run(rows, cols, depth, L, ldl, R, ldr, C, 1, ldc, alpha, blocking, nullptr);
}

template <typename Scalar, bool LRowMajor, bool RRowMajor>
void gemm_split(Eigen::Index rows, Eigen::Index cols, Eigen::Index depth,
                const GemmOperand<Scalar>& L, const GemmOperand<Scalar>& R, Scalar* C,
                Eigen::Index ldc, Scalar alpha, int threads) {
  // (i, j) of a column-major operand is at i + j*stride, of a row-major one at i*stride + j.
  auto l_at = [&](Eigen::Index i) { return L.data + (LRowMajor ? i * L.stride : i); };
  auto r_at = [&](Eigen::Index j) { return R.data + (RRowMajor ? j : j * R.stride); };
  const bool by_rows = rows >= cols;
  const Eigen::Index extent = by_rows ? rows : cols;
  const Eigen::Index quantum = by_rows ? 16 : 4;  // whole micro-kernel tiles per slab
  const Eigen::Index slab = ((extent + threads - 1) / threads + quantum - 1) / quantum * quantum;
  parallel_for(threads, threads, [&](Eigen::Index t) {
    const Eigen::Index begin = std::min(extent, t * slab);
    const Eigen::Index size = std::min(extent, begin + slab) - begin;
    if (size <= 0) return;
    if (by_rows) {
      gemm_serial<Scalar, LRowMajor, RRowMajor>(size, cols, depth, l_at(begin), L.stride, R.data,
                                                R.stride, C + begin, ldc, alpha);
    } else {
      gemm_serial<Scalar, LRowMajor, RRowMajor>(rows, size, depth, L.data, L.stride, r_at(begin),
                                                R.stride, C + begin * ldc, ldc, alpha);
    }
  });
}

/// The four kernel drivers of one scalar, as explicit instantiations (`PREFIX` is `template`) or
/// declarations (`extern template`): see lora/extern_templates.hpp.
#define LORA_GEMM_SPLIT_TEMPLATES(PREFIX, T)                                         \
  PREFIX void lora::detail::gemm_split<T, false, false>(                             \
      Eigen::Index, Eigen::Index, Eigen::Index, const lora::detail::GemmOperand<T>&, \
      const lora::detail::GemmOperand<T>&, T*, Eigen::Index, T, int);                \
  PREFIX void lora::detail::gemm_split<T, false, true>(                              \
      Eigen::Index, Eigen::Index, Eigen::Index, const lora::detail::GemmOperand<T>&, \
      const lora::detail::GemmOperand<T>&, T*, Eigen::Index, T, int);                \
  PREFIX void lora::detail::gemm_split<T, true, false>(                              \
      Eigen::Index, Eigen::Index, Eigen::Index, const lora::detail::GemmOperand<T>&, \
      const lora::detail::GemmOperand<T>&, T*, Eigen::Index, T, int);                \
  PREFIX void lora::detail::gemm_split<T, true, true>(                               \
      Eigen::Index, Eigen::Index, Eigen::Index, const lora::detail::GemmOperand<T>&, \
      const lora::detail::GemmOperand<T>&, T*, Eigen::Index, T, int);

#endif  // !LORA_GEMM_USE_EIGEN_PRODUCTS

/// C += alpha * L * R (C column-major with inner stride 1; L and R column-major matrices, maps,
/// refs or blocks of them, or their .transpose()). Products too small or thin for the blocked
/// kernel (a vector, or tiny) go to Eigen's own coefficient-based or GEMV paths, which allocate
/// nothing either.
template <typename CType, typename LType, typename RType>
void gemm_add(CType&& C, const LType& Lx, const RType& Rx, typename LType::Scalar alpha) {
  using Scalar [[maybe_unused]] = typename LType::Scalar;
  using Index = Eigen::Index;
  const Index rows = Lx.rows(), cols = Rx.cols(), depth = Lx.cols();
  if (rows == 0 || cols == 0 || depth == 0) return;
  if (rows + cols + depth < 20) {  // Eigen's own threshold for a coefficient-based product
    C.noalias() += alpha * Lx.lazyProduct(Rx);
    return;
  }
  if (rows == 1 || cols == 1) {  // a matrix-vector product: Eigen's GEMV, allocation-free
    C.noalias() += alpha * Lx * Rx;
    return;
  }
#if defined(LORA_GEMM_USE_EIGEN_PRODUCTS)
  C.noalias() += alpha * Lx * Rx;  // Eigen's public product: same numbers, allocates
#else
  const GemmOperand<Scalar> L = gemm_operand(Lx), R = gemm_operand(Rx);
  // One thread per 50,000 multiply-adds at most, as Eigen decides (tiny products stay serial).
  const double work = double(rows) * double(cols) * double(depth);
  int threads = std::max(1, std::min(Eigen::nbThreads(), int(work / 50000.0)));
#if defined(_OPENMP)
  if (omp_in_parallel()) threads = 1;
#endif
  Scalar* c = C.data();
  const Index ldc = C.outerStride();
  if (L.row_major) {
    if (R.row_major)
      gemm_split<Scalar, true, true>(rows, cols, depth, L, R, c, ldc, alpha, threads);
    else
      gemm_split<Scalar, true, false>(rows, cols, depth, L, R, c, ldc, alpha, threads);
  } else {
    if (R.row_major)
      gemm_split<Scalar, false, true>(rows, cols, depth, L, R, c, ldc, alpha, threads);
    else
      gemm_split<Scalar, false, false>(rows, cols, depth, L, R, c, ldc, alpha, threads);
  }
#endif
}

}  // namespace lora::detail

// Compiled mode (LORA_EXTERN_TEMPLATES, lora::compiled): the drivers are compiled once in the
// library. Declared here, before any lora header uses them.
#if defined(LORA_EXTERN_TEMPLATES) && !defined(LORA_GEMM_USE_EIGEN_PRODUCTS)
LORA_GEMM_SPLIT_TEMPLATES(extern template, float)
LORA_GEMM_SPLIT_TEMPLATES(extern template, double)
#endif
