// Hot swap (PEFT's hotswap_adapter): replace an adapter's tensors in place, from a file or from
// memory, without reallocating them, so that workspaces, optimizer views (ParameterView) and
// anything else holding the adapter's buffers stay valid. The layer's adapter is created once with
// the largest rank it will ever need (PEFT's prepare_model_for_compiled_hotswap(target_rank=...));
// an incoming adapter of a smaller rank r is zero-padded to it:
//   A' = [A; 0]  (R x k),   B' = [B, 0]  (d x R),   s' = s,
// and B' A' = B A exactly (the padded terms are products with zero), so the layer computes exactly
// what the incoming adapter computes.
#pragma once

#include "lora/adapter.hpp"
#include "lora/detail/check.hpp"
#include "lora/multi_lora_linear.hpp"
#include "lora/peft/adapter_io.hpp"

#include <Eigen/Core>

#include <cmath>
#include <map>
#include <string>
#include <utility>

namespace lora::peft {

/// `a` padded with zeros to rank `max_rank` (>= a.rank()): the same s B A, bit for bit, and the
/// same scaling (its alpha is chosen so that the scaling in T is a.scaling() exactly). Gradients
/// are zero. Throws std::invalid_argument when max_rank < a.rank() or exceeds min(d, k).
template <typename T>
LoRAAdapter<T> pad_adapter(const LoRAAdapter<T>& a, int max_rank) {
  using Matrix = typename LoRAAdapter<T>::Matrix;
  lora::detail::require(max_rank >= a.rank(), "pad_adapter: the adapter has rank ", a.rank(),
                        ", above the maximum ", max_rank);
  LoRAConfig cfg = a.config();
  cfg.rank = max_rank;
  cfg.use_rslora = false;
  // alpha = s R, nudged by an ulp or two where the round trip alpha / R does not give s back.
  const double s = static_cast<double>(a.scaling());
  double alpha = s * max_rank;
  for (int step = 0; step < 8 && static_cast<T>(alpha / max_rank) != a.scaling(); ++step)
    alpha = std::nextafter(alpha,
                           static_cast<T>(alpha / max_rank) < a.scaling() ? HUGE_VAL : -HUGE_VAL);
  cfg.alpha = alpha;
  LoRAAdapter<T> out(a.out_features(), a.in_features(), cfg);
  lora::detail::require(out.scaling() == a.scaling(),
                        "pad_adapter: cannot express the scaling exactly at rank ", max_rank);
  Matrix A = Matrix::Zero(max_rank, a.in_features());
  Matrix B = Matrix::Zero(a.out_features(), max_rank);
  A.topRows(a.rank()) = a.A();
  B.leftCols(a.rank()) = a.B();
  out.set_weights(A, B);
  if (a.has_lora_bias()) out.set_lora_bias(a.lora_bias());
  if (a.uses_dora()) out.set_magnitude(a.magnitude());
  return out;
}

/// Replaces adapter `name` of `layer` by `incoming` in place: incoming is padded to the layer
/// adapter's rank (its declared maximum), then copied into the existing buffers, so parameter
/// views and workspaces stay valid. Throws std::invalid_argument (nothing changed) when incoming
/// has a larger rank or another shape, or when it would change which tensors exist (a lora bias,
/// DoRA); std::logic_error when that adapter is merged.
template <typename T, typename F>
void hotswap_adapter(MultiLoRALinear<T, F>& layer, const std::string& name,
                     const LoRAAdapter<T>& incoming) {
  const LoRAAdapter<T>& current = std::as_const(layer).adapter(name);
  lora::detail::require(incoming.rank() <= current.rank(), "hotswap_adapter: adapter \"", name,
                        "\" was created with rank ", current.rank(),
                        " (the most it can take in place); the incoming adapter has rank ",
                        incoming.rank());
  lora::detail::require(incoming.has_lora_bias() == current.has_lora_bias() &&
                            incoming.uses_dora() == current.uses_dora(),
                        "hotswap_adapter: adapter \"", name,
                        "\": the incoming adapter must have the same tensors (lora bias, DoRA "
                        "magnitude) as the one it replaces");
  layer.replace_adapter(name, pad_adapter(incoming, static_cast<int>(current.rank())));
}

/// Hot swaps adapter `name` of every layer in `layers` (module path -> layer) with the PEFT
/// adapter directory `dir`, in place. All-or-nothing: every module is checked (present in the
/// file and in `layers`, rank within the layer's, same tensors) before any layer changes; a
/// mismatch throws FormatError or std::invalid_argument. Returns the config read.
template <typename T, typename F>
AdapterConfig hotswap_adapter(const std::string& dir,
                              const std::map<std::string, MultiLoRALinear<T, F>*>& layers,
                              const std::string& name, const ReadOptions& options = {}) {
  AdapterFile<T> file = read_adapter<T>(dir, options);
  std::map<std::string, LoRAAdapter<T>> padded;
  for (const auto& [path, layer] : layers) {
    const auto it = file.modules.find(path);
    if (it == file.modules.end())
      throw FormatError("hotswap_adapter: \"" + dir + "\" has no adapter for module \"" + path +
                        "\"");
    const LoRAAdapter<T>& current = std::as_const(*layer).adapter(name);
    const LoRAAdapter<T>& in = it->second;
    lora::detail::require(
        in.out_features() == current.out_features() && in.in_features() == current.in_features() &&
            in.rank() <= current.rank() && in.has_lora_bias() == current.has_lora_bias() &&
            in.uses_dora() == current.uses_dora(),
        "hotswap_adapter: module \"", path, "\" of \"", dir, "\" (rank ", in.rank(), ", ",
        lora::detail::shape_string(in.out_features(), in.in_features()),
        ") does not fit adapter \"", name, "\" in place (rank ", current.rank(), ", ",
        lora::detail::shape_string(current.out_features(), current.in_features()),
        ", the same lora bias and DoRA)");
    lora::detail::require_state(
        !(layer->has_active() && layer->active_name() == name && layer->is_merged()),
        "hotswap_adapter: module \"", path, "\": adapter \"", name,
        "\" is merged; call unmerge() first");
    padded.emplace(path, pad_adapter(in, static_cast<int>(current.rank())));
  }
  for (const auto& [path, layer] : layers) layer->replace_adapter(name, padded.at(path));
  return file.config;
}

}  // namespace lora::peft
