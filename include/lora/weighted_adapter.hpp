// Weighted combinations of LoRA adapters of one layer (PEFT's add_weighted_adapter), without ever
// forming a d x k matrix:
//   delta = sum_i w_i * s_i * B_i * A_i                          (d x k, never built)
// - Combination::Cat: the exact delta as one adapter of rank R = sum r_i,
//     A = [w_1 s_1 A_1; ...; w_n s_n A_n] (R x k),   B = [B_1, ..., B_n] (d x R),   s = 1.
//   The weights sit on A as in PEFT 0.10 and later (`loras_A.append(A * weight * scaling)`;
//   PEFT up to 0.9 put them on B: the product is the same).
// - Combination::Svd: the best rank-t approximation of delta (Eckart-Young), from the factors:
//     Bc = [w_1 s_1 B_1, ...] = Qb Rb,   Ac^T = [A_1; ...]^T = Qa Ra      (thin QR, d x R and k x
//     R) delta = Qb (Rb Ra^T) Qa^T,   Rb Ra^T = U S V^T                      (SVD of an R x R core)
//     B = Qb U_t S_t (d x t),   A = (Qa V_t)^T (t x k),   s = 1
//   as PEFT (B = U S, A = V^T), which takes the SVD of the dense delta. Cost O((d + k) R^2).
// The result has alpha = rank and no rsLoRA, so its scaling is 1 (PEFT sets lora_alpha = r). Lora
// biases combine exactly: b = sum_i w_i s_i b_i.
#pragma once

#include "lora/adapter.hpp"
#include "lora/config.hpp"
#include "lora/detail/check.hpp"

#include <Eigen/Core>
#include <Eigen/QR>
#include <Eigen/SVD>

#include <algorithm>
#include <cmath>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace lora {

/// How add_weighted_adapter / combine_adapters combine adapters.
enum class Combination {
  Cat,  ///< exact: the factors stacked, rank = sum of ranks
  Svd,  ///< the best rank-t approximation of the weighted sum, computed from the factors
};

/// One adapter equal to sum_i weights[i] * s_i * B_i * A_i (Cat), or its best approximation of rank
/// `svd_rank` (Svd; 0 means the largest input rank, PEFT's default). All adapters must be for the
/// same d x k weight. Throws std::invalid_argument for empty or mismatched inputs, a DoRA
/// adapter, a non-finite weight, or a rank the layer cannot hold (Cat: sum of ranks <= min(d, k);
/// Svd: 1 <= t <= sum of ranks), and std::domain_error when the combination is not finite in T
/// (weights too large).
template <typename T>
LoRAAdapter<T> combine_adapters(const std::vector<const LoRAAdapter<T>*>& adapters,
                                const std::vector<double>& weights, Combination how,
                                int svd_rank = 0) {
  using Matrix = typename LoRAAdapter<T>::Matrix;
  using Vector = typename LoRAAdapter<T>::Vector;
  using Index = Eigen::Index;
  const char* where = "combine_adapters";
  detail::require(!adapters.empty(), where, ": no adapters to combine");
  detail::require(weights.size() == adapters.size(), where, ": ", adapters.size(), " adapters but ",
                  weights.size(), " weights");
  Index total_rank = 0, max_rank = 0;
  bool any_bias = false;
  const Index d = adapters.front()->out_features(), k = adapters.front()->in_features();
  for (std::size_t i = 0; i < adapters.size(); ++i) {
    detail::require(adapters[i] != nullptr, where, ": adapter ", i, " is null");
    detail::require(adapters[i]->out_features() == d && adapters[i]->in_features() == k, where,
                    ": adapter ", i, " is for a ",
                    detail::shape_string(adapters[i]->out_features(), adapters[i]->in_features()),
                    " weight, adapter 0 for ", detail::shape_string(d, k));
    detail::require(std::isfinite(weights[i]), where, ": weight ", i, " is not finite");
    // The result is a plain adapter: a DoRA input's magnitude (its output's row scale) would be
    // dropped without a word, changing what the adapter computes.
    detail::require(!adapters[i]->uses_dora(), where, ": adapter ", i,
                    " is a DoRA adapter; a weighted sum of B A updates does not combine DoRA's "
                    "magnitudes (PEFT refuses it too)");
    total_rank += adapters[i]->rank();
    max_rank = std::max(max_rank, adapters[i]->rank());
    any_bias = any_bias || adapters[i]->has_lora_bias();
  }
  // w_i * s_i for each adapter, in T (as PEFT multiplies the float weight by the float scaling).
  std::vector<T> ws(adapters.size());
  for (std::size_t i = 0; i < adapters.size(); ++i)
    ws[i] = static_cast<T>(weights[i] * static_cast<double>(adapters[i]->scaling()));

  Index rank = total_rank;
  if (how == Combination::Svd) {
    rank = svd_rank == 0 ? max_rank : svd_rank;
    detail::require(rank >= 1 && rank <= total_rank, where, ": svd_rank must be between 1 and ",
                    total_rank, " (the sum of the ranks), got ", svd_rank);
  }
  detail::require(rank <= std::min(d, k), where, ": the combined rank ", rank,
                  " exceeds min(d, k) = ", std::min(d, k),
                  (how == Combination::Cat ? "; use Combination::Svd with a smaller rank" : ""));

  LoRAConfig cfg;  // alpha = rank, no rsLoRA: scaling 1, as PEFT's lora_alpha = new_rank
  cfg.rank = static_cast<int>(rank);
  cfg.alpha = static_cast<double>(rank);
  cfg.use_rslora = false;
  LoRAAdapter<T> out(d, k, cfg);

  // Bc = [w_1 s_1 B_1, ...] (d x R) and Ac = [A_1; ...] (R x k): delta = Bc * Ac.
  Matrix Ac(total_rank, k), Bc(d, total_rank);
  Index row = 0;
  for (std::size_t i = 0; i < adapters.size(); ++i) {
    const Index r = adapters[i]->rank();
    if (how == Combination::Cat) {
      Ac.middleRows(row, r) = ws[i] * adapters[i]->A();  // PEFT: A * weight * scaling
      Bc.middleCols(row, r) = adapters[i]->B();
    } else {
      Ac.middleRows(row, r) = adapters[i]->A();
      Bc.middleCols(row, r) = ws[i] * adapters[i]->B();
    }
    row += r;
  }

  if (how == Combination::Cat) {
    out.set_weights(Ac, Bc);
  } else {
    // Thin QR of both stacks: Bc = Qb Rb (Qb: d x mb), Ac^T = Qa Ra (Qa: k x ma).
    const Index mb = std::min(d, total_rank), ma = std::min(k, total_rank);
    Eigen::HouseholderQR<Matrix> qb(Bc);
    const Matrix Act = Ac.transpose();
    Eigen::HouseholderQR<Matrix> qa(Act);
    const Matrix Qb = qb.householderQ() * Matrix::Identity(d, mb);                        // d x mb
    const Matrix Qa = qa.householderQ() * Matrix::Identity(k, ma);                        // k x ma
    const Matrix Rb = qb.matrixQR().topRows(mb).template triangularView<Eigen::Upper>();  // mb x R
    const Matrix Ra = qa.matrixQR().topRows(ma).template triangularView<Eigen::Upper>();  // ma x R
    const Matrix core = Rb * Ra.transpose();  // (mb x R)(R x ma): delta = Qb core Qa^T
    Eigen::JacobiSVD<Matrix> svd(core, Eigen::ComputeThinU | Eigen::ComputeThinV);
    const Index t = std::min<Index>(rank, svd.singularValues().size());
    Matrix B = Matrix::Zero(d, rank), A = Matrix::Zero(rank, k);
    B.leftCols(t).noalias() =
        Qb * (svd.matrixU().leftCols(t) * svd.singularValues().head(t).asDiagonal());  // U S
    A.topRows(t).noalias() = (Qa * svd.matrixV().leftCols(t)).transpose();             // V^T
    out.set_weights(A, B);
  }

  if (any_bias) {
    Vector b = Vector::Zero(d);
    for (std::size_t i = 0; i < adapters.size(); ++i)
      if (adapters[i]->has_lora_bias()) b += ws[i] * adapters[i]->lora_bias();
    out.set_lora_bias(b);
  }
  // Large weights (1e300, or {1e30, -1e30} whose products cancel only in exact arithmetic)
  // overflow T somewhere above; an adapter holding inf or NaN would then be added and used.
  auto require_finite = [&](const auto& m, const char* name) {
    if (m.allFinite()) return;
    std::ostringstream w;
    for (std::size_t i = 0; i < adapters.size(); ++i)
      w << (i ? ", " : "") << weights[i] << " x " << adapters[i]->scaling();
    throw std::domain_error(
        detail::concat(where, ": the combined adapter's ", name, " is not finite in ",
                       (std::is_same_v<T, float> ? "float" : "double"),
                       " (weights x scalings: ", w.str(), "); scale the weights down"));
  };
  require_finite(out.A(), "A");
  require_finite(out.B(), "B");
  if (any_bias) require_finite(out.lora_bias(), "lora bias");
  return out;
}

}  // namespace lora
