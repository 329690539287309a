// plain_adapter: a PiSSA, OLoRA or LoftQ adapter as the equivalent plain LoRA adapter of the
// ORIGINAL base (PEFT's save_pretrained(path_initial_model_for_weight_conversion=...)).
//
// Such an adapter (A, B, started from A0, B0) was trained on the residual W_res = W0 - s B0 A0, so
//   W_res + s B A = W0 + s (B A - B0 A0) = W0 + s' B' A'   with
//   A' = [A; A0] (2r x k),  B' = [B, -B0] (d x 2r),  r' = 2r,  alpha' = 2 alpha (rsLoRA: sqrt(2)
//   alpha), so that s' = s.
// For PiSSA and OLoRA that is exact; for LoftQ the base was the 4-bit Q, not W0 - s B0 A0, and the
// plain adapter differs from the trained layer by LoftQ's remaining error W0 - Q - s B0 A0.
#pragma once

#include "lora/adapter.hpp"
#include "lora/detail/check.hpp"

#include <cmath>
#include <utility>

namespace lora {

/// The plain LoRA adapter (config().init KaimingUniform, PEFT's `init_lora_weights: true`) that
/// gives the ORIGINAL base what `a` gives its residual base (see the top of this file). An adapter
/// whose init did not change the base is returned as it is. Throws std::invalid_argument when `a`
/// changes the base but has no initial factors (it never joined a layer) or when 2r exceeds
/// min(d, k), and for a lora bias or DoRA (PEFT converts neither).
template <typename T>
LoRAAdapter<T> plain_adapter(const LoRAAdapter<T>& a) {
  if (!a.needs_residual_base()) return a;
  detail::require(a.initial_A().rows() == a.rank() && a.initial_B().cols() == a.rank(),
                  "lora::plain_adapter: the adapter has no initial factors (it never joined a "
                  "layer, or they were set by set_weights), so its residual base is unknown");
  detail::require(!a.has_lora_bias() && !a.uses_dora(),
                  "lora::plain_adapter: adapters with a lora bias or DoRA are not converted");
  const Eigen::Index r = a.rank(), d = a.out_features(), k = a.in_features();
  LoRAConfig cfg = a.config();
  cfg.init = Init::KaimingUniform;
  cfg.rank = static_cast<int>(2 * r);
  cfg.alpha = a.config().use_rslora ? std::sqrt(2.0) * a.config().alpha : 2.0 * a.config().alpha;
  detail::require(
      2 * r <= std::min(d, k), "lora::plain_adapter: the plain adapter has rank 2r = ", 2 * r,
      ", above min(out, in) = ", std::min(d, k), " of the ", detail::shape_string(d, k), " weight");
  typename LoRAAdapter<T>::Matrix A2(2 * r, k), B2(d, 2 * r);
  A2 << a.A(), a.initial_A();
  B2 << a.B(), -a.initial_B();
  LoRAAdapter<T> out(d, k, cfg);
  out.set_weights(A2, B2);
  return out;
}

/// plain_adapter of a LoRALinear's one adapter (for a MultiLoRALinear pass layer.adapter(name)).
template <typename Layer, typename = decltype(std::declval<const Layer&>().adapter())>
LoRAAdapter<typename Layer::Scalar> plain_adapter(const Layer& layer) {
  return plain_adapter(layer.adapter());
}

}  // namespace lora
