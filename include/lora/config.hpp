// LoRAConfig: the hyper-parameters of one adapter, validated once, held by value.
#pragma once

#include "lora/detail/check.hpp"
#include "lora/detail/compiled_mode.hpp"

#include <cmath>
#include <cstdint>

namespace lora {

/// How the adapter is initialised. Gaussian and KaimingUniform draw A and start B at zero, so the
/// adapted layer starts equal to the base. PiSSA, OLoRA and LoftQ take A and B from the base
/// weight itself and change the base to the residual when the adapter joins a layer (see
/// lora/init.hpp and docs/inits.md); Orthogonal starts A and B non-zero with B * A = 0.
enum class Init {
  /// A ~ N(0, (1/r)^2): PEFT's `init_lora_weights="gaussian"`.
  Gaussian,
  /// A ~ U(-1/sqrt(k), 1/sqrt(k)): PyTorch's kaiming_uniform_(a = sqrt(5)) with fan_in = k, as in
  /// PEFT's default (`init_lora_weights=True`) and Microsoft's loralib. The bound follows from
  /// gain = sqrt(2 / (1 + a^2)) = sqrt(1/3) and bound = sqrt(3) * gain / sqrt(fan_in).
  KaimingUniform,
  /// PiSSA (arXiv 2404.02948; PEFT's `"pissa"` / `"pissa_niter_N"`): A and B are the principal
  /// singular factors of W0 (divided by s), the base becomes W_res = W0 - s B A.
  /// LoRAConfig::svd_iterations picks an exact SVD (0) or a seeded randomized one.
  PiSSA,
  /// OLoRA (arXiv 2406.01775; PEFT's `"olora"`): Q, R = qr(W0), A = R[:r], B = Q[:, :r], the base
  /// becomes W_res = W0 - s B A.
  OLoRA,
  /// LoftQ (arXiv 2310.08659; PEFT's `"loftq"`, 4 bits): alternates NF4 quantization of the
  /// residual and a rank-r SVD, LoRAConfig::loftq_iterations times; the base is the last 4-bit Q.
  /// Needs a 4-bit storage (Nf4FrozenWeight) and the full-precision W0.
  LoftQ,
  /// PEFT's `"orthogonal"`: A and B from the odd and even rows of a random r x r orthogonal
  /// matrix, so B * A = 0 while neither is zero. Needs an even rank.
  Orthogonal,
};

/// True for the inits that change the base weight (PiSSA, OLoRA, LoftQ).
inline bool changes_base(Init init) {
  return init == Init::PiSSA || init == Init::OLoRA || init == Init::LoftQ;
}

/// Hyper-parameters of one LoRA adapter (arXiv 2106.09685).
struct LoRAConfig {
  int rank = 8;                ///< r: the adapter's rank, 1 <= r <= min(d, k).
  double alpha = 16.0;         ///< lora_alpha: the scale numerator.
  bool use_rslora = false;     ///< rsLoRA (arXiv 2312.03732): s = alpha / sqrt(r), not alpha / r.
  Init init = Init::Gaussian;  ///< How A is drawn; B is always zero.
  std::uint64_t seed = 0;      ///< Seed of A's draw: the same seed gives the same A everywhere.
  /// PiSSA's (and LoftQ's) SVD: 0 for an exact SVD, N >= 1 for a seeded randomized range finder
  /// with N power iterations (PEFT's `pissa_niter_N`, torch.svd_lowrank with q = r).
  int svd_iterations = 0;
  /// LoftQ's alternating steps T (PEFT's `loftq_iter`, default 1).
  int loftq_iterations = 1;
  /// lora_dropout: probability p in [0, 1) of zeroing an element of the adapter's input in
  /// training mode (inverted dropout: kept elements are scaled by 1 / (1 - p)). 0 turns it off.
  double dropout = 0.0;
  /// DoRA (weight-decomposed LoRA, arXiv 2402.09353; PEFT's `use_dora`): the adapter also learns a
  /// magnitude m per output feature, and the layer computes
  ///   H = (m / ||W0 + s B A||_row) .* (W0 X + s B A X) + b
  /// with the row norms held constant in backward (see docs/dora.md). m starts as the row norms of
  /// W0 when the adapter joins a layer, so the adapted layer starts equal to the base.
  bool use_dora = false;

  /// s = alpha / r, or alpha / sqrt(r) with use_rslora (Eq. 4 of the paper scales B*A by it).
  double scaling() const {
    validate();
    return use_rslora ? alpha / std::sqrt(static_cast<double>(rank))
                      : alpha / static_cast<double>(rank);
  }

  /// Throws std::invalid_argument when the settings cannot describe an adapter.
  void validate() const;

  /// As validate(), and also that the rank fits a d x k layer: r <= min(d, k).
  void validate_for(long long out_features, long long in_features) const;
};

#if LORA_WITH_BODIES

LORA_FUNC void LoRAConfig::validate() const {
  detail::require(rank >= 1, "LoRAConfig: rank must be at least 1, got ", rank);
  detail::require(std::isfinite(alpha), "LoRAConfig: alpha must be finite, got ", alpha);
  detail::require(dropout >= 0.0 && dropout < 1.0, "LoRAConfig: dropout must be in [0, 1), got ",
                  dropout);  // NaN fails both comparisons
  detail::require(svd_iterations >= 0, "LoRAConfig: svd_iterations must be >= 0, got ",
                  svd_iterations);
  detail::require(loftq_iterations >= 1, "LoRAConfig: loftq_iterations must be >= 1, got ",
                  loftq_iterations);
  detail::require(init != Init::Orthogonal || rank % 2 == 0,
                  "LoRAConfig: Init::Orthogonal needs an even rank, got ", rank);
  detail::require(!(use_dora && changes_base(init)),
                  "LoRAConfig: PiSSA, OLoRA and LoftQ change the base weight and cannot be "
                  "combined with DoRA here");
}

LORA_FUNC void LoRAConfig::validate_for(long long out_features, long long in_features) const {
  validate();
  const long long limit = out_features < in_features ? out_features : in_features;
  detail::require(rank <= limit, "LoRAConfig: rank must be at most min(out, in) = ", limit,
                  " for a ", out_features, " x ", in_features, " weight, got ", rank);
}

#endif  // LORA_WITH_BODIES

}  // namespace lora
