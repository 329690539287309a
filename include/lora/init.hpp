// The initialisations that take the adapter from the base weight (PEFT's `init_lora_weights`):
// PiSSA, OLoRA and LoftQ, which also replace the base by a residual. Plain functions on matrices;
// a layer runs them when an adapter joins it (lora/base_init.hpp, which a program includes to
// enable them), and docs/inits.md says when to use which. The inits that need no base weight
// (Gaussian, Kaiming, orthogonal) are in lora/adapter_init.hpp.
//
//   PiSSA  (arXiv 2404.02948)  W = U S V^T (rank r), S_r /= s, A = diag(sqrt S_r) V_r^T,
//                              B = U_r diag(sqrt S_r), base W_res = W - s B A.
//   OLoRA  (arXiv 2406.01775)  Q, R = qr(W), A = R[:r], B = Q[:, :r], base W_res = W - s B A.
//   LoftQ  (arXiv 2310.08659)  res = W; T times: Q = deq(nf4(res)), (B, A) = rank-r SVD factors
//                              of (W - Q) / s, res = W - s B A. Base: the last Q (4-bit).
//
// The SVD is exact (Eigen's BDCSVD) with LoRAConfig::svd_iterations = 0, otherwise PEFT's
// randomized range finder (torch.svd_lowrank with q = r and N power iterations), seeded by
// LoRAConfig::seed, whose only d x k matrix is the weight it factors.
#pragma once

#include "lora/adapter_init.hpp"
#include "lora/config.hpp"
#include "lora/detail/check.hpp"
#include "lora/detail/gemm.hpp"
#include "lora/random.hpp"

#include <Eigen/Core>
#include <Eigen/QR>
#include <Eigen/SVD>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace lora {

namespace detail {

/// The first q columns of the Q factor of Y (m x q, m >= q): an orthonormal basis of its range.
template <typename T>
InitMatrix<T> orthonormal_basis(const InitMatrix<T>& Y) {
  Eigen::HouseholderQR<InitMatrix<T>> qr(Y);
  return qr.householderQ() * InitMatrix<T>::Identity(Y.rows(), Y.cols());
}

}  // namespace detail

/// The rank-r factors of an init, before any division by the scaling.
template <typename T>
struct LowRankFactors {
  Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic> U;  ///< d x r, orthonormal columns
  Eigen::Matrix<T, Eigen::Dynamic, 1> S;               ///< r singular values, descending
  Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic> V;  ///< k x r, orthonormal columns
};

/// The top r singular triplets of W (d x k). iterations = 0: an exact SVD (BDCSVD, O(d k min(d, k))
/// and its U, V); iterations = N >= 1: the randomized range finder of torch.svd_lowrank with q = r
/// (PEFT's `pissa_niter_N`): Y = W Omega (Omega k x r, N(0, 1) from `seed`), N power iterations
/// Q <- orth(W orth(W^T Q)), then the SVD of the r x k matrix Q^T W. The randomized path forms
/// only d x r and r x k matrices besides W.
template <typename T, typename Derived>
LowRankFactors<T> top_singular(const Eigen::MatrixBase<Derived>& W_, int r, int iterations,
                               std::uint64_t seed) {
  using Matrix = detail::InitMatrix<T>;
  const Derived& W = W_.derived();
  const Eigen::Index d = W.rows(), k = W.cols();
  detail::require(r >= 1 && r <= std::min(d, k), "lora::top_singular: rank must be in [1, ",
                  std::min(d, k), "], got ", r);
  LowRankFactors<T> f;
  if (iterations == 0) {
    Eigen::BDCSVD<Matrix> svd(W, Eigen::ComputeThinU | Eigen::ComputeThinV);
    f.U = svd.matrixU().leftCols(r);
    f.S = svd.singularValues().head(r);
    f.V = svd.matrixV().leftCols(r);
    return f;
  }
  Rng rng(seed);
  Matrix omega(k, r);
  fill_normal(omega, rng, 0.0, 1.0);
  Matrix Y = Matrix::Zero(d, r), Z(k, r);
  detail::gemm_add(Y, W, omega, T(1));  // (d x k)(k x r)
  Matrix Q = detail::orthonormal_basis<T>(Y);
  for (int i = 0; i < iterations; ++i) {
    Z.setZero();
    detail::gemm_add(Z, W.transpose(), Q, T(1));  // (k x d)(d x r)
    const Matrix Qz = detail::orthonormal_basis<T>(Z);
    Y.setZero();
    detail::gemm_add(Y, W, Qz, T(1));  // (d x k)(k x r)
    Q = detail::orthonormal_basis<T>(Y);
  }
  Matrix small = Matrix::Zero(r, k);
  detail::gemm_add(small, Q.transpose(), W, T(1));  // (r x d)(d x k)
  Eigen::BDCSVD<Matrix> svd(small, Eigen::ComputeThinU | Eigen::ComputeThinV);
  f.U.noalias() = Q * svd.matrixU();  // (d x r)(r x r)
  f.S = svd.singularValues();
  f.V = svd.matrixV();
  return f;
}

/// A = diag(sqrt(S / s)) V^T and B = U diag(sqrt(S / s)) from top singular factors: s B A equals
/// U S V^T. (PiSSA's split; LoftQ's too, where PEFT has s = 1.)
template <typename T>
void split_singular(const LowRankFactors<T>& f, T s, detail::InitMatrix<T>& A,
                    detail::InitMatrix<T>& B) {
  const Eigen::Matrix<T, Eigen::Dynamic, 1> root = (f.S / s).cwiseSqrt();
  A = root.asDiagonal() * f.V.transpose();
  B = f.U * root.asDiagonal();
}

/// PiSSA: A, B from the principal singular factors of W; W becomes W_res = W - s B A (in place:
/// no other d x k matrix with iterations >= 1).
template <typename T>
void pissa_init(detail::InitMatrix<T>& W, const LoRAConfig& cfg, T s, detail::InitMatrix<T>& A,
                detail::InitMatrix<T>& B) {
  split_singular(top_singular<T>(W, cfg.rank, cfg.svd_iterations, cfg.seed), s, A, B);
  detail::gemm_add(W, B, A, T(-s));  // W -= s B A: (d x r)(r x k)
}

/// OLoRA: Q, R = qr(W) (reduced), A = R[:r] (r x k), B = Q[:, :r] (d x r); W becomes W - s B A.
template <typename T>
void olora_init(detail::InitMatrix<T>& W, T s, int r, detail::InitMatrix<T>& A,
                detail::InitMatrix<T>& B) {
  using Matrix = detail::InitMatrix<T>;
  Eigen::HouseholderQR<Matrix> qr(W);
  B = qr.householderQ() * Matrix::Identity(W.rows(), r);
  A = qr.matrixQR().topRows(r).template triangularView<Eigen::Upper>();
  detail::gemm_add(W, B, A, T(-s));
}

/// LoftQ's alternation for a weight W (d x k, full precision), with `round_trip(M)` overwriting
/// M by what the 4-bit storage makes of it (quantize, then dequantize):
///   res = W; T times: Q = round_trip(res); (B, A) = split_singular(SVD_r(W - Q), s);
///   res = W - s B A.
/// On return `base` holds the matrix whose quantization is the last Q (W - s B A of the step
/// before the last, or W for T = 1), for the storage to quantize, and A, B the adapter; with
/// `errors` non-null, errors[t] = ||W - (Q_t + s B_t A_t)||_F. Memory: W, base and one d x k work
/// matrix (the residual W - Q).
template <typename T, typename RoundTrip, typename Derived>
void loftq_init(const Eigen::MatrixBase<Derived>& W, const LoRAConfig& cfg, T s,
                RoundTrip&& round_trip, detail::InitMatrix<T>& base, detail::InitMatrix<T>& A,
                detail::InitMatrix<T>& B, std::vector<double>* errors = nullptr) {
  using Matrix = detail::InitMatrix<T>;
  Matrix work;
  base = W;
  for (int t = 0; t < cfg.loftq_iterations; ++t) {
    if (t > 0) {  // base = W - s B A of the step before: the next matrix to quantize
      base = W;
      detail::gemm_add(base, B, A, T(-s));
    }
    work = base;
    round_trip(work);               // Q_t
    work = W - work;                // W - Q_t
    if (cfg.svd_iterations == 0) {  // exact, in double as PEFT (torch.linalg.svd on .double())
      const Eigen::MatrixXd wd = work.template cast<double>();
      const LowRankFactors<double> f = top_singular<double>(wd, cfg.rank, 0, cfg.seed);
      Eigen::MatrixXd Ad, Bd;
      split_singular<double>(f, static_cast<double>(s), Ad, Bd);
      A = Ad.template cast<T>();
      B = Bd.template cast<T>();
    } else {
      split_singular(top_singular<T>(work, cfg.rank, cfg.svd_iterations, cfg.seed + t), s, A, B);
    }
    if (errors) {
      detail::gemm_add(work, B, A, T(-s));  // W - Q_t - s B A
      errors->push_back(work.template cast<double>().norm());
    }
  }
}

}  // namespace lora
