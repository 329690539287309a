// The kernels that can run the products of a dense frozen weight (DenseFrozenWeight<float/double>)
// and the rule that picks one per product and shape.
//
// Eigen's kernel (detail/gemm.hpp) is always there. A BLAS joins it where the build defines
// LORA_WITH_BLIS (BLIS's typed API, bli_?gemm_ex / bli_?gemv_ex) or LORA_WITH_OPENBLAS (OpenBLAS's
// CBLAS): the CMake target lora::blas defines one of them and links the library, so a program that
// links only lora::lora compiles none of this and keeps Eigen's kernel. Every translation unit of a
// program must see the same definitions (link lora::blas to all of them, or to none).
//
// Threads. Eigen's kernel and BLIS (Debian's libblis4-openmp) both run on OpenMP's one pool, with
// the thread count of each call given per call (Eigen::nbThreads(), 1 inside a parallel region):
// the adapter's small products and the frozen product never run on two pools at once, so the
// cores are never oversubscribed. OpenBLAS (pthread build) keeps its own pool; lora sets its size
// to Eigen::nbThreads() before each call where it differs, so both pools have the same width and
// are never busy at the same time (one product runs at a time per layer).
#pragma once

#include "lora/detail/check.hpp"
#include "lora/detail/gemm.hpp"

#include <Eigen/Core>

#include <string>
#include <type_traits>

// OpenBLAS's cblas.h before blis.h: BLIS includes a cblas.h of its own with the same include
// guard, which would hide OpenBLAS's (openblas_set_num_threads, blasint) where both are built in.
#if defined(LORA_WITH_OPENBLAS)
#include <cblas.h>
#include <mutex>
#endif
#if defined(LORA_WITH_BLIS)
#include <blis.h>
#endif
#if defined(_OPENMP)
#include <omp.h>
#endif

namespace lora {

/// The kernel that runs the products of a DenseFrozenWeight (float or double).
enum class DenseKernel {
  Auto,      ///< per product and shape, the fastest measured among those built in (Eigen if none)
  Eigen,     ///< Eigen's GEMM kernel with lora's own buffers (detail/gemm.hpp): always available
  Blis,      ///< BLIS (bli_?gemm_ex), where lora::blas is built on BLIS (LORA_WITH_BLIS)
  OpenBlas,  ///< OpenBLAS (cblas_?gemm), where lora::blas is built on OpenBLAS (LORA_WITH_OPENBLAS)
};

/// The three products of a frozen weight, as DenseFrozenWeight reports them.
enum class DenseProduct {
  Multiply,            ///< H = W X
  MultiplyAdd,         ///< H += W X
  MultiplyTransposed,  ///< dX += W^T G
};

namespace detail {

/// A short name: "Eigen", "BLIS", "OpenBLAS" (Auto: "auto").
inline const char* dense_kernel_name(DenseKernel k) {
  switch (k) {
    case DenseKernel::Eigen:
      return "Eigen";
    case DenseKernel::Blis:
      return "BLIS";
    case DenseKernel::OpenBlas:
      return "OpenBLAS";
    default:
      return "auto";
  }
}

/// True when this build can run kernel `k` (Eigen and Auto always).
inline constexpr bool dense_kernel_built(DenseKernel k) {
  switch (k) {
    case DenseKernel::Blis:
#if defined(LORA_WITH_BLIS)
      return true;
#else
      return false;
#endif
    case DenseKernel::OpenBlas:
#if defined(LORA_WITH_OPENBLAS)
      return true;
#else
      return false;
#endif
    default:
      return true;
  }
}

/// The BLAS of this build that Auto uses (OpenBLAS before BLIS: faster where both were measured),
/// or Eigen where none is built.
inline constexpr DenseKernel dense_blas_kernel() {
#if defined(LORA_WITH_OPENBLAS)
  return DenseKernel::OpenBlas;
#elif defined(LORA_WITH_BLIS)
  return DenseKernel::Blis;
#else
  return DenseKernel::Eigen;
#endif
}

/// How well the BLAS of this build suits this CPU. Both libraries pick their kernels at run time
/// from the CPU, and a release older than the CPU falls back to lesser ones (measured on a Zen 5:
/// BLIS 0.9 "generic", a fraction of Eigen's speed; OpenBLAS 0.3.21 "Haswell" AVX2 kernels, ahead
/// of Eigen's AVX-512 kernel at small batches, behind it from n = 64).
struct DenseBlasFit {
  const char* unsuitable = nullptr;  ///< why Auto must not use the BLAS at all, or nullptr
  bool small_batches_only = false;   ///< use it only for 2 <= n <= kDenseBlasSmallBatch
  const char* note = "";             ///< what the report adds
};

/// The largest n at which AVX2 kernels of a BLAS beat Eigen's AVX-512 kernel (measured: ahead at
/// n = 8, behind at n = 64).
inline constexpr Eigen::Index kDenseBlasSmallBatch = 32;

/// The fit of the BLAS of this build on this CPU, computed once.
inline const DenseBlasFit& dense_blas_fit() {
  static const DenseBlasFit fit = [] {
    DenseBlasFit f;
#if defined(LORA_WITH_OPENBLAS)
    const std::string core = openblas_get_corename();
#if defined(EIGEN_VECTORIZE_AVX512)
    if (core != "SkylakeX" && core != "Cooperlake" && core != "SapphireRapids") {
      f.small_batches_only = true;
      f.note =
          "; OpenBLAS runs AVX2 kernels on this AVX-512 CPU (OPENBLAS_CORETYPE=SkylakeX "
          "selects its AVX-512 ones)";
    }
#endif
    (void)core;
#elif defined(LORA_WITH_BLIS)
    if (std::string(bli_arch_string(bli_arch_query_id())) == "generic")
      f.unsuitable = "BLIS does not know this CPU and runs its generic kernels";
#else
    f.unsuitable = "no BLAS built in";
#endif
    return f;
  }();
  return fit;
}

/// What the built-in kernels are, with versions: "Eigen 3.4.0; BLIS 0.9.0 (zen3); ...".
inline std::string dense_kernels_report() {
  std::string out = "Eigen " + std::to_string(EIGEN_WORLD_VERSION) + "." +
                    std::to_string(EIGEN_MAJOR_VERSION) + "." + std::to_string(EIGEN_MINOR_VERSION);
#if defined(LORA_WITH_BLIS)
  out += std::string("; BLIS ") + bli_info_get_version_str() + " (" +
         bli_arch_string(bli_arch_query_id()) + ")";
#endif
#if defined(LORA_WITH_OPENBLAS)
  out += std::string("; OpenBLAS (") + openblas_get_config() + ")";
#endif
  return out;
}

/// A choice and the reason for it (a static string).
struct DenseKernelChoice {
  DenseKernel kernel;
  const char* why;
};

/// The rule of DenseKernel::Auto for a product of the d x k weight with n columns, from the
/// measurements in docs/performance.md (kernel table): the BLAS where it runs kernels fit for this
/// CPU, n >= 2 and the weight is large; Eigen otherwise: at n = 1 Eigen's GEMV already reads the
/// weight at the memory-bandwidth floor, and on small weights (under 64 KiB) the call overhead
/// dominates.
inline DenseKernelChoice choose_dense_kernel(DenseKernel wanted, DenseProduct, Eigen::Index d,
                                             Eigen::Index k, Eigen::Index n,
                                             std::size_t scalar_bytes) {
  if (wanted != DenseKernel::Auto) return {wanted, "chosen at construction"};
  constexpr DenseKernel blas = dense_blas_kernel();
  if (blas == DenseKernel::Eigen) return {DenseKernel::Eigen, "no BLAS built in"};
  const DenseBlasFit& fit = dense_blas_fit();
  if (fit.unsuitable) return {DenseKernel::Eigen, fit.unsuitable};
  if (n < 2) return {DenseKernel::Eigen, "n = 1: Eigen's GEMV reads W at the bandwidth floor"};
  if (double(d) * double(k) * double(scalar_bytes) < 65536.0)
    return {DenseKernel::Eigen, "weight under 64 KiB: the call overhead dominates"};
  if (fit.small_batches_only) {
    if (n > kDenseBlasSmallBatch)
      return {DenseKernel::Eigen,
              "n > 32: Eigen's AVX-512 kernel beats the BLAS's AVX2 kernels (measured)"};
    return {blas,
            "2 <= n <= 32 on a large weight: the BLAS's AVX2 kernels beat Eigen's (measured)"};
  }
  return {blas, "n >= 2 on a large weight: the BLAS measured fastest"};
}

/// True when products on `wanted` may allocate in steady state. BLIS's OpenMP build enters a
/// parallel region on every call, and libgomp allocates a team for a one-thread region; OpenBLAS
/// mallocs its job table on every GEMM it runs on more than one thread (measured: one per call
/// at 2 threads, none at 1). Eigen's kernel runs on lora's buffers.
inline bool dense_kernel_may_allocate(DenseKernel wanted) {
  const bool threaded = Eigen::nbThreads() > 1;
  if (wanted == DenseKernel::Auto) {
    if (dense_blas_fit().unsuitable != nullptr) return false;
    wanted = dense_blas_kernel();
  }
  return wanted == DenseKernel::Blis || (wanted == DenseKernel::OpenBlas && threaded);
}

/// The thread count of a product of `work` multiply-adds: Eigen::nbThreads(), one per 50,000
/// multiply-adds at most, and 1 inside an OpenMP parallel region.
inline int dense_threads(double work) {
  int threads = std::max(1, std::min(Eigen::nbThreads(), int(work / 50000.0)));
#if defined(_OPENMP)
  if (omp_in_parallel()) threads = 1;
#endif
  return threads;
}

/// C (+)= op(W) R on a BLAS kernel: op(W) = W (d x k) or W^T; R: depth x n; C: rows x n,
/// column-major with leading dimension ldc. accumulate = false overwrites C (beta = 0, C is
/// never read).
template <typename T>
void blas_product(DenseKernel kernel, bool transposed, const T* W, Eigen::Index d, Eigen::Index k,
                  const T* R, Eigen::Index ldr, Eigen::Index n, T* C, Eigen::Index ldc,
                  bool accumulate) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "float or double");
  const Eigen::Index rows = transposed ? k : d, depth = transposed ? d : k;
  const int threads = dense_threads(double(rows) * double(depth) * double(n));
  T one = T(1), beta = accumulate ? T(1) : T(0);
  (void)W, (void)R, (void)C, (void)ldr, (void)ldc, (void)one, (void)beta, (void)rows, (void)threads;
  if (kernel == DenseKernel::Blis) {
#if defined(LORA_WITH_BLIS)
    rntm_t rntm = BLIS_RNTM_INITIALIZER;
    bli_rntm_set_num_threads(threads, &rntm);
    const trans_t tw = transposed ? BLIS_TRANSPOSE : BLIS_NO_TRANSPOSE;
    T* w = const_cast<T*>(W);  // BLIS's typed API takes non-const inputs; it never writes them
    T* r = const_cast<T*>(R);
    if (n == 1) {
      if constexpr (std::is_same_v<T, float>)
        bli_sgemv_ex(tw, BLIS_NO_CONJUGATE, d, k, &one, w, 1, d, r, 1, &beta, C, 1, nullptr, &rntm);
      else
        bli_dgemv_ex(tw, BLIS_NO_CONJUGATE, d, k, &one, w, 1, d, r, 1, &beta, C, 1, nullptr, &rntm);
    } else if constexpr (std::is_same_v<T, float>) {
      bli_sgemm_ex(tw, BLIS_NO_TRANSPOSE, rows, n, depth, &one, w, 1, d, r, 1, ldr, &beta, C, 1,
                   ldc, nullptr, &rntm);
    } else {
      bli_dgemm_ex(tw, BLIS_NO_TRANSPOSE, rows, n, depth, &one, w, 1, d, r, 1, ldr, &beta, C, 1,
                   ldc, nullptr, &rntm);
    }
    return;
#endif
  }
  if (kernel == DenseKernel::OpenBlas) {
#if defined(LORA_WITH_OPENBLAS)
    {
      // OpenBLAS splits by its own threshold: give it the pool width, not the work-based count.
      int width = Eigen::nbThreads();
#if defined(_OPENMP)
      if (omp_in_parallel()) width = 1;
#endif
      // OpenBLAS's pool is global: resize it only when the count changes (one lock, no call).
      static std::mutex mutex;
      static int current = 0;
      std::lock_guard<std::mutex> lock(mutex);
      if (current != width) {
        openblas_set_num_threads(width);
        current = width;
      }
    }
    const CBLAS_TRANSPOSE tw = transposed ? CblasTrans : CblasNoTrans;
    const blasint id = blasint(d), in = blasint(n);
    if (n == 1) {
      if constexpr (std::is_same_v<T, float>)
        cblas_sgemv(CblasColMajor, tw, id, blasint(k), one, W, id, R, 1, beta, C, 1);
      else
        cblas_dgemv(CblasColMajor, tw, id, blasint(k), one, W, id, R, 1, beta, C, 1);
    } else if constexpr (std::is_same_v<T, float>) {
      cblas_sgemm(CblasColMajor, tw, CblasNoTrans, blasint(rows), in, blasint(depth), one, W, id, R,
                  blasint(ldr), beta, C, blasint(ldc));
    } else {
      cblas_dgemm(CblasColMajor, tw, CblasNoTrans, blasint(rows), in, blasint(depth), one, W, id, R,
                  blasint(ldr), beta, C, blasint(ldc));
    }
    return;
#endif
  }
  require(false, "lora: the dense kernel ", dense_kernel_name(kernel),
          " is not built in (link lora::blas)");
}

}  // namespace detail
}  // namespace lora
