// Small-batch products with a column-major bf16 weight, widened to fp32 on the fly:
//   H (+)= W Xr      W: d x k bf16 (leading dimension d),  Xr: k x n,  H: d x n
//   dX += W^T Gr     Gr: d x n,  dX: k x n
// for the few columns of a decoding step (n = 1 serves one token). There every weight is read
// once and used for n multiply-adds, so the product is memory-bound: a bf16 weight is half the
// bytes of an fp32 one and should take half the time. A blocked GEMM (oneDNN's, Eigen's) packs
// and tiles for a reuse that such a batch does not have; this reads W once, in its own order:
//  - H = W Xr walks the columns of W (each a contiguous run of d bf16), adding W(:, c) Xr(c, :)
//    into a slab of H rows that stays in cache; threads split the rows.
//  - dX = W^T Gr takes a dot product of each column of W with each column of Gr; threads split
//    the columns.
// Xr and Gr are expected already rounded to bf16 and held in fp32 (detail::round_through_bf16):
// a product of two bf16 numbers is exact in fp32, so the AVX-512 kernel and the portable one
// compute the same sums and differ only in their order (and in fused multiply-adds).
// Nothing here allocates.
#pragma once

#include "lora/detail/bf16.hpp"
#include "lora/detail/gemm.hpp"

#include <Eigen/Core>

#include <algorithm>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define LORA_BF16_GEMV_AVX512 1
#endif

namespace lora::detail {

/// True when the AVX-512 kernel is compiled in (-mavx512f -mavx512bw -mavx512vl, or
/// -march=native on such a CPU); otherwise the portable loops run.
#if defined(LORA_BF16_GEMV_AVX512)
inline constexpr bool kBf16GemvAvx512 = true;
#else
inline constexpr bool kBf16GemvAvx512 = false;
#endif

namespace gemv {

using Index = Eigen::Index;

// Rows of H one pass keeps hot: (2048 x 4) floats = 32 KiB, the L1/L2 boundary.
inline constexpr Index kRowBlock = 2048;

#if defined(LORA_BF16_GEMV_AVX512)

/// 16 bf16 at p (the first `count` of them, count <= 16) widened to fp32.
inline __m512 widen16(const bf16* p, __mmask16 m) {
  const __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 widen16(const bf16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
// How far ahead (in bf16 elements) the kernels prefetch each column they walk: the columns are
// read as C parallel streams a page or two long each, too short for the hardware prefetchers.
#if !defined(LORA_BF16_GEMV_PREFETCH)
#define LORA_BF16_GEMV_PREFETCH 512
#endif
inline constexpr Index kPrefetch = LORA_BF16_GEMV_PREFETCH;

// The sum of v's 16 lanes. (Not _mm512_reduce_add_ps: GCC 12's version trips -Wuninitialized.)
inline float hsum(__m512 v) {
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, v);
  float sum = 0.0f;
  for (float x : lanes) sum += x;
  return sum;
}

inline __mmask16 tail_mask(Index count) {
  return static_cast<__mmask16>((1u << count) - 1u);
}

/// H(i0:i1, 0:N) += W(i0:i1, c0:c0+C) Xr(c0:c0+C, 0:N), C columns at a time (C = 4 or 1).
template <int N, int C>
inline void rows_kernel(const bf16* W, Index ldw, Index i0, Index i1, Index c0, const float* X,
                        Index ldx, float* H, Index ldh) {
  __m512 x[C][N];
  for (int q = 0; q < C; ++q)
    for (int j = 0; j < N; ++j) x[q][j] = _mm512_set1_ps(X[c0 + q + j * ldx]);
  const bf16* w = W + c0 * ldw;
  Index i = i0;
  for (; i + 16 <= i1; i += 16) {
    __m512 wq[C];
    for (int q = 0; q < C; ++q) {
      _mm_prefetch(reinterpret_cast<const char*>(w + q * ldw + i + kPrefetch), _MM_HINT_T0);
      wq[q] = widen16(w + q * ldw + i);
    }
    for (int j = 0; j < N; ++j) {
      float* h = H + i + j * ldh;
      __m512 acc = _mm512_loadu_ps(h);
      for (int q = 0; q < C; ++q) acc = _mm512_fmadd_ps(wq[q], x[q][j], acc);
      _mm512_storeu_ps(h, acc);
    }
  }
  if (i < i1) {
    const __mmask16 m = tail_mask(i1 - i);
    __m512 wq[C];
    for (int q = 0; q < C; ++q) wq[q] = widen16(w + q * ldw + i, m);
    for (int j = 0; j < N; ++j) {
      float* h = H + i + j * ldh;
      __m512 acc = _mm512_maskz_loadu_ps(m, h);
      for (int q = 0; q < C; ++q) acc = _mm512_fmadd_ps(wq[q], x[q][j], acc);
      _mm512_mask_storeu_ps(h, m, acc);
    }
  }
}

template <int N>
inline void rows_block(const bf16* W, Index ldw, Index k, Index i0, Index i1, const float* X,
                       Index ldx, float* H, Index ldh) {
  Index c = 0;
  for (; c + 4 <= k; c += 4) rows_kernel<N, 4>(W, ldw, i0, i1, c, X, ldx, H, ldh);
  for (; c < k; ++c) rows_kernel<N, 1>(W, ldw, i0, i1, c, X, ldx, H, ldh);
}

/// dX(c0:c0+C, 0:N) += W(:, c0:c0+C)^T Gr(:, 0:N), for d rows.
template <int N, int C>
inline void cols_kernel(const bf16* W, Index ldw, Index d, Index c0, const float* G, Index ldg,
                        float* dX, Index ldx) {
  __m512 acc[C][N];
  for (int q = 0; q < C; ++q)
    for (int j = 0; j < N; ++j) acc[q][j] = _mm512_setzero_ps();
  const bf16* w = W + c0 * ldw;
  Index i = 0;
  for (; i + 16 <= d; i += 16) {
    __m512 wq[C];
    for (int q = 0; q < C; ++q) {
      _mm_prefetch(reinterpret_cast<const char*>(w + q * ldw + i + kPrefetch), _MM_HINT_T0);
      wq[q] = widen16(w + q * ldw + i);
    }
    for (int j = 0; j < N; ++j) {
      const __m512 g = _mm512_loadu_ps(G + i + j * ldg);
      for (int q = 0; q < C; ++q) acc[q][j] = _mm512_fmadd_ps(wq[q], g, acc[q][j]);
    }
  }
  if (i < d) {
    const __mmask16 m = tail_mask(d - i);
    __m512 wq[C];
    for (int q = 0; q < C; ++q) wq[q] = widen16(w + q * ldw + i, m);
    for (int j = 0; j < N; ++j) {
      const __m512 g = _mm512_maskz_loadu_ps(m, G + i + j * ldg);
      for (int q = 0; q < C; ++q) acc[q][j] = _mm512_fmadd_ps(wq[q], g, acc[q][j]);
    }
  }
  for (int q = 0; q < C; ++q)
    for (int j = 0; j < N; ++j) dX[c0 + q + j * ldx] += hsum(acc[q][j]);
}

template <int N>
inline void cols_block(const bf16* W, Index ldw, Index d, Index c0, Index c1, const float* G,
                       Index ldg, float* dX, Index ldx) {
  Index c = c0;
  for (; c + 4 <= c1; c += 4) cols_kernel<N, 4>(W, ldw, d, c, G, ldg, dX, ldx);
  for (; c < c1; ++c) cols_kernel<N, 1>(W, ldw, d, c, G, ldg, dX, ldx);
}

#endif  // LORA_BF16_GEMV_AVX512

/// The portable kernel of rows_add: the same order of work in plain loops (compilers vectorise
/// the inner one). Always compiled, so that it is tested on every machine.
inline void rows_add_portable(const bf16* W, Index ldw, Index k, Index i0, Index i1, const float* X,
                              Index ldx, Index n, float* H, Index ldh) {
  for (Index b0 = i0; b0 < i1; b0 += kRowBlock) {
    const Index b1 = std::min(i1, b0 + kRowBlock);
    for (Index c = 0; c < k; ++c) {
      const bf16* w = W + c * ldw;
      for (Index j = 0; j < n; ++j) {
        const float x = X[c + j * ldx];
        float* h = H + j * ldh;
        for (Index i = b0; i < b1; ++i) h[i] += widen_bf16(w[i]) * x;
      }
    }
  }
}

/// H(i0:i1, 0:n) += W(i0:i1, :) Xr, for rows [i0, i1): a row block at a time, n in chunks of 4.
inline void rows_add(const bf16* W, Index ldw, Index k, Index i0, Index i1, const float* X,
                     Index ldx, Index n, float* H, Index ldh) {
#if defined(LORA_BF16_GEMV_AVX512)
  for (Index b0 = i0; b0 < i1; b0 += kRowBlock) {
    const Index b1 = std::min(i1, b0 + kRowBlock);
    for (Index j = 0; j < n; j += 4) {
      const float* Xj = X + j * ldx;
      float* Hj = H + j * ldh;
      switch (std::min<Index>(4, n - j)) {
        case 1:
          rows_block<1>(W, ldw, k, b0, b1, Xj, ldx, Hj, ldh);
          break;
        case 2:
          rows_block<2>(W, ldw, k, b0, b1, Xj, ldx, Hj, ldh);
          break;
        case 3:
          rows_block<3>(W, ldw, k, b0, b1, Xj, ldx, Hj, ldh);
          break;
        default:
          rows_block<4>(W, ldw, k, b0, b1, Xj, ldx, Hj, ldh);
          break;
      }
    }
  }
#else
  rows_add_portable(W, ldw, k, i0, i1, X, ldx, n, H, ldh);
#endif
}

/// The portable kernel of cols_add (one fp32 accumulator per dot product, in row order).
inline void cols_add_portable(const bf16* W, Index ldw, Index d, Index c0, Index c1, const float* G,
                              Index ldg, Index n, float* dX, Index ldx) {
  for (Index c = c0; c < c1; ++c) {
    const bf16* w = W + c * ldw;
    for (Index j = 0; j < n; ++j) {
      const float* g = G + j * ldg;
      float acc = 0.0f;
      for (Index i = 0; i < d; ++i) acc += widen_bf16(w[i]) * g[i];
      dX[c + j * ldx] += acc;
    }
  }
}

/// dX(c0:c1, 0:n) += W(:, c0:c1)^T Gr, n in chunks of 4.
inline void cols_add(const bf16* W, Index ldw, Index d, Index c0, Index c1, const float* G,
                     Index ldg, Index n, float* dX, Index ldx) {
#if defined(LORA_BF16_GEMV_AVX512)
  for (Index j = 0; j < n; j += 4) {
    const float* Gj = G + j * ldg;
    float* dXj = dX + j * ldx;
    switch (std::min<Index>(4, n - j)) {
      case 1:
        cols_block<1>(W, ldw, d, c0, c1, Gj, ldg, dXj, ldx);
        break;
      case 2:
        cols_block<2>(W, ldw, d, c0, c1, Gj, ldg, dXj, ldx);
        break;
      case 3:
        cols_block<3>(W, ldw, d, c0, c1, Gj, ldg, dXj, ldx);
        break;
      default:
        cols_block<4>(W, ldw, d, c0, c1, Gj, ldg, dXj, ldx);
        break;
    }
  }
#else
  cols_add_portable(W, ldw, d, c0, c1, G, ldg, n, dX, ldx);
#endif
}

/// Splits [0, extent) into `parts` slabs, each a multiple of `quantum` long (the last shorter).
inline Index slab_size(Index extent, int parts, Index quantum) {
  return ((extent + parts - 1) / parts + quantum - 1) / quantum * quantum;
}

/// Threads worth using for `elements` weights: one per 256 Ki of them at most (below that the
/// fork and join costs more than the work).
inline int gemv_threads(Index elements, int threads) {
  return std::max(1, std::min(threads, static_cast<int>(elements / (Index(1) << 18))));
}

}  // namespace gemv

/// H (+)= W Xr.   W: d x k bf16, column-major with leading dimension d (packed);  Xr: k x n (outer
/// stride ldx), already rounded to bf16;  H: d x n (outer stride ldh), overwritten unless
/// `accumulate`. Rows are split over up to `threads` OpenMP threads (detail::parallel_for).
/// `portable` runs the plain loops even where the AVX-512 kernel is compiled in (for tests).
inline void bf16_gemv(const bf16* W, Eigen::Index d, Eigen::Index k, const float* X,
                      Eigen::Index ldx, Eigen::Index n, float* H, Eigen::Index ldh, bool accumulate,
                      int threads, bool portable = false) {
  using gemv::Index;
  if (d == 0 || n == 0) return;
  const int parts = gemv::gemv_threads(d * k, threads);
  const Index slab = gemv::slab_size(d, parts, 64);  // whole cache lines of W per thread
  parallel_for(parts, parts, [&](Index t) {
    const Index i0 = std::min(d, t * slab), i1 = std::min(d, i0 + slab);
    if (i0 >= i1) return;
    if (!accumulate)
      for (Index j = 0; j < n; ++j) std::fill(H + i0 + j * ldh, H + i1 + j * ldh, 0.0f);
    if (portable)
      gemv::rows_add_portable(W, d, k, i0, i1, X, ldx, n, H, ldh);
    else
      gemv::rows_add(W, d, k, i0, i1, X, ldx, n, H, ldh);
  });
}

/// dX += W^T Gr.   W: d x k bf16 (packed, column-major);  Gr: d x n (outer stride ldg), already
/// rounded to bf16;  dX: k x n (outer stride ldx). Columns are split over up to `threads` threads.
inline void bf16_gemv_transposed_add(const bf16* W, Eigen::Index d, Eigen::Index k, const float* G,
                                     Eigen::Index ldg, Eigen::Index n, float* dX, Eigen::Index ldx,
                                     int threads, bool portable = false) {
  using gemv::Index;
  if (k == 0 || n == 0) return;
  const int parts = gemv::gemv_threads(d * k, threads);
  const Index slab = gemv::slab_size(k, parts, 4);
  parallel_for(parts, parts, [&](Index t) {
    const Index c0 = std::min(k, t * slab), c1 = std::min(k, c0 + slab);
    if (c0 >= c1) return;
    if (portable)
      gemv::cols_add_portable(W, d, d, c0, c1, G, ldg, n, dX, ldx);
    else
      gemv::cols_add(W, d, d, c0, c1, G, ldg, n, dX, ldx);
  });
}

}  // namespace lora::detail
