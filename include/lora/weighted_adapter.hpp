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
#include "lora/detail/compiled_mode.hpp"
#include "lora/random.hpp"

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

// Only the bodies need Eigen's QR and SVD (about 0.5 s of parsing per file); compiled mode
// hides the bodies.
#if LORA_WITH_BODIES
#include <Eigen/QR>
#include <Eigen/SVD>

#include <numeric>
#include <sstream>
#endif

namespace lora {

/// How add_weighted_adapter / combine_adapters combine adapters: PEFT's combination_type. Cat and
/// Svd are exact (Svd up to its truncation); the others are PEFT's task-arithmetic merges (see
/// combine_adapters for their formulas).
enum class Combination {
  Cat,                ///< "cat": the factors stacked, exact, rank = sum of ranks
  Svd,                ///< "svd": the best rank-t approximation of the weighted sum
  Linear,             ///< "linear": A and B each a weighted sum (equal ranks)
  Ties,               ///< "ties": magnitude-pruned, sign-elected, disjoint mean of A and of B
  DareLinear,         ///< "dare_linear": randomly pruned (rescaled) A and B, weighted sums
  DareTies,           ///< "dare_ties": randomly pruned, sign-elected, disjoint mean
  MagnitudePrune,     ///< "magnitude_prune": magnitude-pruned A and B, weighted sums
  TiesSvd,            ///< "ties_svd": Ties on the dense deltas, then rank t by SVD
  DareLinearSvd,      ///< "dare_linear_svd": DareLinear on the dense deltas, then SVD
  DareTiesSvd,        ///< "dare_ties_svd": DareTies on the dense deltas, then SVD
  MagnitudePruneSvd,  ///< "magnitude_prune_svd": MagnitudePrune on the dense deltas, then SVD
};

/// How TIES elects the sign of each element (PEFT's majority_sign_method).
enum class MajoritySign {
  Total,      ///< "total": the sign of the sum of the (pruned) values
  Frequency,  ///< "frequency": the sign held by more adapters (ties go to +)
};

/// The options of combine_adapters and add_weighted_adapter beyond the combination itself.
struct CombineOptions {
  /// Rank of the *Svd combinations' result (0: the largest input rank, PEFT's default).
  int svd_rank = 0;
  /// Fraction of values kept by the pruning combinations (Ties, Dare*, MagnitudePrune and their
  /// Svd forms), in [0, 1]; 1 keeps everything (PEFT warns and skips the pruning). DARE needs
  /// density > 0 (it divides by it).
  double density = 1.0;
  /// TIES's sign election (Ties, DareTies and their Svd forms).
  MajoritySign majority_sign = MajoritySign::Total;
  /// Seed of DARE's random masks, drawn from lora's own generator (random.hpp): reproducible
  /// across compilers, but not the masks torch.bernoulli draws in PEFT.
  std::uint64_t seed = 0;
};

/// As below, with the options of the pruning combinations (density, sign election, seed); see the
/// overload after it for their formulas.
template <typename T>
LoRAAdapter<T> combine_adapters(const std::vector<const LoRAAdapter<T>*>& adapters,
                                const std::vector<double>& weights, Combination how,
                                const CombineOptions& options);

/// One adapter equal to sum_i weights[i] * s_i * B_i * A_i (Cat), or its best approximation of rank
/// `svd_rank` (Svd; 0 means the largest input rank, PEFT's default). All adapters must be for the
/// same d x k weight. Throws std::invalid_argument for empty or mismatched inputs, a DoRA
/// adapter, a non-finite weight, or a rank the layer cannot hold (Cat: sum of ranks <= min(d, k);
/// Svd: 1 <= t <= sum of ranks), and std::domain_error when the combination is not finite in T
/// (weights too large).
template <typename T>
LoRAAdapter<T> combine_adapters(const std::vector<const LoRAAdapter<T>*>& adapters,
                                const std::vector<double>& weights, Combination how,
                                int svd_rank = 0);

// The bodies. Compiled mode (LORA_EXTERN_TEMPLATES) hides them: LoRAAdapter<T> exists for T =
// float and double only, and lora::compiled instantiates both (lora/extern_templates.hpp).
#if LORA_WITH_BODIES

template <typename T>
LoRAAdapter<T> combine_adapters(const std::vector<const LoRAAdapter<T>*>& adapters,
                                const std::vector<double>& weights, Combination how, int svd_rank) {
  using Matrix = typename LoRAAdapter<T>::Matrix;
  using Vector = typename LoRAAdapter<T>::Vector;
  using Index = Eigen::Index;
  const char* where = "combine_adapters";
  if (how != Combination::Cat && how != Combination::Svd) {
    CombineOptions options;
    options.svd_rank = svd_rank;
    return combine_adapters<T>(adapters, weights, how, options);
  }
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

namespace detail {

/// PEFT's prune(): `density` >= 1 keeps t; magnitude keeps the int(density * size) largest |t|
/// (ties to the lower column-major index: torch.topk leaves them unspecified); random keeps
/// each element with probability density (lora's Rng, column-major order), then divides by
/// density when `rescale` (DARE).
template <typename M>
void prune_task_tensor(M& t, double density, bool random, bool rescale, Rng& rng) {
  using Scalar = typename M::Scalar;
  if (density >= 1) return;
  const Eigen::Index n = t.size();
  Scalar* v = t.data();
  if (random) {
    for (Eigen::Index i = 0; i < n; ++i) {
      const bool keep = rng.uniform() < density;  // torch.bernoulli(density)
      v[i] = keep ? (rescale ? static_cast<Scalar>(v[i] / static_cast<Scalar>(density)) : v[i])
                  : Scalar(0);
    }
    return;
  }
  const auto k = static_cast<Eigen::Index>(density * static_cast<double>(n));  // int(): truncates
  std::vector<Eigen::Index> order(static_cast<std::size_t>(n));
  std::iota(order.begin(), order.end(), Eigen::Index(0));
  const auto larger = [v](Eigen::Index a, Eigen::Index b) {
    const Scalar x = std::abs(v[a]), y = std::abs(v[b]);
    return x != y ? x > y : a < b;
  };
  if (k < n) std::nth_element(order.begin(), order.begin() + k, order.end(), larger);
  for (Eigen::Index i = k; i < n; ++i) v[order[static_cast<std::size_t>(i)]] = Scalar(0);
}

/// PEFT's merge of task tensors of one shape with `weights` (merge_utils.py): prune each (see
/// prune_task_tensor), then either the weighted sum (linear, magnitude_prune, dare_linear) or, for
/// TIES, the elected sign's disjoint mean: with e = sign(sum_i t_i) (Total) or
/// sign(sum_i sign(t_i)) (Frequency), 0 counted as +, and M_i = [sign(t_i) == e],
///   out = sum_i w_i t_i M_i / max(1, sum_i M_i).
template <typename Matrix>
Matrix merge_task_tensors(std::vector<Matrix> tensors, const std::vector<double>& weights,
                          Combination how, const CombineOptions& options, Rng& rng) {
  using Scalar = typename Matrix::Scalar;
  const bool random = how == Combination::DareLinear || how == Combination::DareTies ||
                      how == Combination::DareLinearSvd || how == Combination::DareTiesSvd;
  const bool magnitude = how == Combination::Ties || how == Combination::MagnitudePrune ||
                         how == Combination::TiesSvd || how == Combination::MagnitudePruneSvd;
  const bool ties = how == Combination::Ties || how == Combination::DareTies ||
                    how == Combination::TiesSvd || how == Combination::DareTiesSvd;
  if (random || magnitude)
    for (auto& t : tensors) prune_task_tensor(t, options.density, random, random, rng);
  Matrix out = Matrix::Zero(tensors.front().rows(), tensors.front().cols());
  if (!ties) {
    for (std::size_t i = 0; i < tensors.size(); ++i)
      out += static_cast<Scalar>(weights[i]) * tensors[i];
    return out;
  }
  const auto sign = [](Scalar x) { return x > 0 ? 1 : (x < 0 ? -1 : 0); };
  for (Eigen::Index j = 0; j < out.cols(); ++j)
    for (Eigen::Index r = 0; r < out.rows(); ++r) {
      Scalar total = 0;
      int votes = 0;
      for (const auto& t : tensors) {
        total += t(r, j);
        votes += sign(t(r, j));
      }
      const int elected =
          (options.majority_sign == MajoritySign::Total ? total >= 0 : votes >= 0) ? 1 : -1;
      Scalar sum = 0;
      int kept = 0;
      for (std::size_t i = 0; i < tensors.size(); ++i) {
        if (sign(tensors[i](r, j)) != elected) continue;
        sum += static_cast<Scalar>(weights[i]) * tensors[i](r, j);
        ++kept;
      }
      out(r, j) = sum / static_cast<Scalar>(std::max(kept, 1));
    }
  return out;
}

}  // namespace detail

/// PEFT's add_weighted_adapter for every combination_type, on bare adapters. Cat and Svd as the
/// overload above (svd_rank from options). The others follow PEFT's code (tuners/lora/model.py and
/// utils/merge_utils.py):
/// - Linear, Ties, DareLinear, DareTies, MagnitudePrune need equal ranks r (the result has rank r)
///   and merge A and B *separately*: with v_i = sqrt(weights[i] * s_i) (which must be >= 0),
///   A = merge_i(v_i, A_i) and B = merge_i(v_i, B_i). For Linear that is
///   B A = (sum v_i B_i)(sum v_i A_i), which carries the cross terms v_i v_j B_i A_j: the
///   weighted sum of the deltas only when one adapter is combined (PEFT then uses Linear whatever
///   was asked; so does lora) or the cross terms vanish. Use Cat or Svd for the exact sum.
/// - TiesSvd, DareLinearSvd, DareTiesSvd, MagnitudePruneSvd merge the dense deltas
///   D_i = s_i B_i A_i (d x k each: these four form d x k matrices) with weights[i], then keep the
///   best rank-t approximation (t = svd_rank, or the largest rank): B = U_t S_t, A = V_t^T.
///   PEFT multiplies the scaling in a second time there (weight * scaling times
///   get_delta_weight); lora does not, as its Svd does not: the two agree where every s_i = 1,
///   and weights w_i s_i reproduce PEFT's numbers otherwise.
/// Pruning: see CombineOptions (density; DARE's masks are lora's, seeded, not torch's). The merge
/// of each tensor: prune, then the weighted sum (Linear, DareLinear, MagnitudePrune) or TIES's
/// elected-sign disjoint mean (detail::merge_task_tensors). The result has alpha = rank and no
/// rsLoRA (scaling 1, PEFT's lora_alpha = r). Throws std::invalid_argument for empty or
/// mismatched inputs, unequal ranks, a negative weight * scaling (PEFT's math.sqrt fails too),
/// a density outside [0, 1] (or 0 for DARE), a rank out of range, and adapters with a lora bias
/// (PEFT's merges drop it: use Cat or Svd); std::domain_error for a non-finite result.
template <typename T>
LoRAAdapter<T> combine_adapters(const std::vector<const LoRAAdapter<T>*>& adapters,
                                const std::vector<double>& weights, Combination how,
                                const CombineOptions& options) {
  using Matrix = typename LoRAAdapter<T>::Matrix;
  using Index = Eigen::Index;
  if (how == Combination::Cat || how == Combination::Svd)
    return combine_adapters<T>(adapters, weights, how, options.svd_rank);
  const char* where = "combine_adapters";
  detail::require(!adapters.empty(), where, ": no adapters to combine");
  detail::require(weights.size() == adapters.size(), where, ": ", adapters.size(), " adapters but ",
                  weights.size(), " weights");
  detail::require(std::isfinite(options.density) && options.density >= 0, where,
                  ": density must be in [0, 1], got ", options.density);
  for (std::size_t i = 0; i < adapters.size(); ++i) {
    detail::require(adapters[i] != nullptr, where, ": adapter ", i, " is null");
    detail::require(std::isfinite(weights[i]), where, ": weight ", i, " is not finite");
    detail::require(!adapters[i]->has_lora_bias(), where, ": adapter ", i,
                    " has a lora bias, which PEFT's pruning merges do not combine; use "
                    "Combination::Cat or Combination::Svd");
  }
  const Index d = adapters.front()->out_features(), k = adapters.front()->in_features();
  Index max_rank = 0;
  for (std::size_t i = 0; i < adapters.size(); ++i) {
    detail::require(adapters[i]->out_features() == d && adapters[i]->in_features() == k, where,
                    ": adapter ", i, " is for a ",
                    detail::shape_string(adapters[i]->out_features(), adapters[i]->in_features()),
                    " weight, adapter 0 for ", detail::shape_string(d, k));
    max_rank = std::max(max_rank, adapters[i]->rank());
  }
  // PEFT: "if there is only one adapter, we can only use linear merging".
  if (adapters.size() == 1) how = Combination::Linear;
  const bool svd = how == Combination::TiesSvd || how == Combination::DareLinearSvd ||
                   how == Combination::DareTiesSvd || how == Combination::MagnitudePruneSvd;
  const bool dare = how == Combination::DareLinear || how == Combination::DareTies ||
                    how == Combination::DareLinearSvd || how == Combination::DareTiesSvd;
  detail::require(!dare || options.density > 0, where,
                  ": DARE's density must be > 0 (it rescales by 1 / density), got 0");
  Rng rng(options.seed);

  Index rank = max_rank;
  if (svd) {
    rank = options.svd_rank == 0 ? max_rank : options.svd_rank;
    detail::require(rank >= 1 && rank <= std::min(d, k), where,
                    ": svd_rank must be between 1 and min(d, k) = ", std::min(d, k), ", got ",
                    options.svd_rank);
  } else {
    for (std::size_t i = 0; i < adapters.size(); ++i)
      detail::require(adapters[i]->rank() == rank, where,
                      ": this combination needs adapters of one rank (PEFT's rule), but adapter ",
                      i, " has rank ", adapters[i]->rank(), " and another ", rank,
                      "; use Combination::Cat or an Svd combination");
  }
  LoRAConfig cfg;  // alpha = rank, no rsLoRA: scaling 1, as PEFT's lora_alpha = new_rank
  cfg.rank = static_cast<int>(rank);
  cfg.alpha = static_cast<double>(rank);
  cfg.use_rslora = false;
  LoRAAdapter<T> out(d, k, cfg);

  if (!svd) {
    std::vector<double> v(adapters.size());
    for (std::size_t i = 0; i < adapters.size(); ++i) {
      const double ws = weights[i] * static_cast<double>(adapters[i]->scaling());
      detail::require(ws >= 0, where, ": weight ", i, " times the adapter's scaling is ", ws,
                      "; this combination takes its square root (as PEFT), so it must be >= 0");
      v[i] = std::sqrt(ws);
    }
    std::vector<Matrix> As, Bs;
    for (const auto* a : adapters) {
      As.push_back(a->A());
      Bs.push_back(a->B());
    }
    const Matrix A = detail::merge_task_tensors(std::move(As), v, how, options, rng);
    const Matrix B = detail::merge_task_tensors(std::move(Bs), v, how, options, rng);
    out.set_weights(A, B);
  } else {
    std::vector<Matrix> deltas;
    for (const auto* a : adapters) deltas.push_back(a->scaling() * a->B() * a->A());  // d x k
    const Matrix delta = detail::merge_task_tensors(std::move(deltas), weights, how, options, rng);
    Eigen::BDCSVD<Matrix> svd_of(delta, Eigen::ComputeThinU | Eigen::ComputeThinV);
    const Matrix B =
        svd_of.matrixU().leftCols(rank) * svd_of.singularValues().head(rank).asDiagonal();  // U S
    const Matrix A = svd_of.matrixV().leftCols(rank).transpose();                           // V^T
    out.set_weights(A, B);
  }
  if (!out.A().allFinite() || !out.B().allFinite())
    throw std::domain_error(detail::concat(where, ": the combined adapter is not finite in ",
                                           (std::is_same_v<T, float> ? "float" : "double"),
                                           "; scale the weights down"));
  return out;
}

#endif  // LORA_WITH_BODIES

}  // namespace lora
