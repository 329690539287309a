// The inits an adapter makes on its own, without the base weight (PEFT's `init_lora_weights`
// true, "gaussian", "orthogonal": adapter.hpp draws them), and PEFT's names for every init.
// The inits that factor the base weight (PiSSA, OLoRA, LoftQ) are in lora/init.hpp: they need
// Eigen's SVD, which costs seconds of compile time in every file that instantiates it.
//
//   Orthogonal (PEFT)          A = (N_A q_odd)^T / 10, B = N_B^T q_even / 10 with q_odd, q_even the
//                              odd and even rows of a random orthogonal r x r matrix: B A = 0.
#pragma once

#include "lora/config.hpp"
#include "lora/detail/check.hpp"
#include "lora/detail/compiled_mode.hpp"
#include "lora/random.hpp"

#include <Eigen/Core>

#include <cstdint>
#include <string>

namespace lora {

namespace detail {

template <typename T>
using InitMatrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;

/// A random orthogonal r x r matrix: the Q of X = Q R (X ~ N(0, 1) from `rng`, R with a positive
/// diagonal) by Gram-Schmidt with one reorthogonalisation, in double. (Eigen's QR would do the
/// same, at seconds of compile time in every file that builds an adapter.)
LORA_FUNC Eigen::MatrixXd random_orthogonal(int r, Rng& rng);

#if LORA_WITH_BODIES
LORA_FUNC Eigen::MatrixXd random_orthogonal(int r, Rng& rng) {
  Eigen::MatrixXd Q(r, r);
  fill_normal(Q, rng, 0.0, 1.0);
  for (int j = 0; j < r; ++j) {
    for (int pass = 0; pass < 2; ++pass)
      for (int i = 0; i < j; ++i) Q.col(j) -= Q.col(i).dot(Q.col(j)) * Q.col(i);
    Q.col(j) /= Q.col(j).norm();
  }
  return Q;
}
#endif

}  // namespace detail

/// PEFT's orthogonal init (r even): X ~ N(0, 1) r x r, Q = qr(X).Q, q_odd = Q[0::2], q_even =
/// Q[1::2]; A = (N_A q_odd)^T / 10 with N_A ~ N(0, 1) k x r/2, B = N_B^T q_even / 10 with N_B ~
/// N(0, 1) r/2 x d. Rows of q_odd and q_even are orthogonal, so B A = N_B^T (q_even q_odd^T) N_A^T
/// / 100 = 0 while A and B are not zero.
template <typename T>
void orthogonal_init(Eigen::Index d, Eigen::Index k, int r, std::uint64_t seed,
                     detail::InitMatrix<T>& A, detail::InitMatrix<T>& B) {
  detail::require(r % 2 == 0, "lora::orthogonal_init: the rank must be even, got ", r);
  using Matrix = detail::InitMatrix<T>;
  Rng rng(seed);
  const Matrix Q = detail::random_orthogonal(r, rng).cast<T>();
  Matrix NA(k, r / 2), NB(r / 2, d);
  fill_normal(NA, rng, 0.0, 1.0);
  fill_normal(NB, rng, 0.0, 1.0);
  Matrix q_odd(r / 2, r), q_even(r / 2, r);
  for (int i = 0; i < r / 2; ++i) {
    q_odd.row(i) = Q.row(2 * i);
    q_even.row(i) = Q.row(2 * i + 1);
  }
  A = (NA * q_odd).transpose() / T(10);
  B = NB.transpose() * q_even / T(10);
}

/// PEFT's `init_lora_weights` value for an init: true (KaimingUniform), "gaussian", "pissa",
/// "pissa_niter_N", "olora", "loftq", "orthogonal" (as text; `true` is returned as "true").
LORA_FUNC std::string peft_init_name(Init init, int svd_iterations = 0);

#if LORA_WITH_BODIES
LORA_FUNC std::string peft_init_name(Init init, int svd_iterations) {
  switch (init) {
    case Init::KaimingUniform:
      return "true";
    case Init::Gaussian:
      return "gaussian";
    case Init::PiSSA:
      return svd_iterations == 0 ? "pissa" : "pissa_niter_" + std::to_string(svd_iterations);
    case Init::OLoRA:
      return "olora";
    case Init::LoftQ:
      return "loftq";
    case Init::Orthogonal:
      return "orthogonal";
  }
  return "true";
}
#endif

/// The init named by PEFT's `init_lora_weights` text ("true", "false", "gaussian", "pissa",
/// "pissa_niter_N", "olora", "loftq", "orthogonal"); svd_iterations is set for pissa_niter_N.
/// Returns false for a name lora does not know ("false", PEFT's B = A = identity-free init for
/// tests, maps to KaimingUniform: the weights come from the file anyway).
LORA_FUNC bool init_from_peft_name(const std::string& name, Init& init, int& svd_iterations);

#if LORA_WITH_BODIES
LORA_FUNC bool init_from_peft_name(const std::string& name, Init& init, int& svd_iterations) {
  svd_iterations = 0;
  if (name == "true" || name == "false") {
    init = Init::KaimingUniform;
  } else if (name == "gaussian") {
    init = Init::Gaussian;
  } else if (name == "pissa") {
    init = Init::PiSSA;
  } else if (name.rfind("pissa_niter_", 0) == 0) {
    const std::string digits = name.substr(12);
    if (digits.empty() || digits.size() > 6 ||
        digits.find_first_not_of("0123456789") != std::string::npos)
      return false;
    init = Init::PiSSA;
    svd_iterations = std::stoi(digits);
  } else if (name == "olora") {
    init = Init::OLoRA;
  } else if (name == "loftq") {
    init = Init::LoftQ;
  } else if (name == "orthogonal") {
    init = Init::Orthogonal;
  } else {
    return false;
  }
  return true;
}
#endif

}  // namespace lora
