// Where PiSSA, OLoRA and LoftQ meet a layer: a pending adapter (LoRAAdapter::init_pending) takes
// its factors from the layer's W0 and the frozen storage is rebased to the residual
// (frozen_storage.hpp's rebase). The arithmetic is in lora/init.hpp.
//
// Include this header in one source file of a program that uses those inits: it compiles them
// (Eigen's SVD: seconds of compile time, which files that never use them are spared) and registers
// them with the layers of every storage lora ships (detail/base_init_hook.hpp); a layer whose
// adapter needs them throws std::logic_error in a program that does not include it. A storage of
// your own: call lora::register_base_inits<T, Storage>() once, before its layers take such an
// adapter.
#pragma once

#include "lora/adapter.hpp"
#include "lora/bf16_frozen_weight.hpp"
#include "lora/dense_frozen_weight.hpp"
#include "lora/detail/base_init_hook.hpp"
#include "lora/detail/check.hpp"
#include "lora/ggml_frozen_weight.hpp"
#include "lora/init.hpp"
#include "lora/nf4_frozen_weight.hpp"

#include <Eigen/Core>

#include <optional>
#include <stdexcept>
#include <type_traits>
#include <utility>

#if defined(LORA_WITH_ONEDNN)
#include "lora/onednn/onednn_frozen_weight.hpp"
#endif

namespace lora::detail {

/// True when the storage F can round-trip a weight through its own quantization
/// (`void round_trip(Eigen::Ref<Matrix>) const`, e.g. Nf4FrozenWeight): LoftQ needs it.
template <typename F, typename = void>
struct has_round_trip : std::false_type {};
template <typename F>
struct has_round_trip<F, std::void_t<decltype(std::declval<const F&>().round_trip(
                             std::declval<Eigen::Ref<typename F::Matrix>>()))>> : std::true_type {};

/// Takes the pending adapter `a`'s factors from W0 and rebases `frozen` to the residual:
///   PiSSA, OLoRA: W0 := W - s B A (the storage rounds or quantizes it as it stores any W0);
///   LoftQ:        W0 := the last Q of the alternation (a storage with round_trip only).
/// `original` is the full-precision weight the storage was built from, or null to factor the
/// weight as stored (frozen.weight()); `owned`, when not null, is that weight in a matrix the call
/// may overwrite (the residual is then formed in it: no further d x k matrix). LoftQ needs it: a
/// 4-bit W0 has already lost what LoftQ recovers. Throws std::logic_error while merged,
/// std::invalid_argument for LoftQ without a 4-bit storage or without `original`, or for an
/// original of another shape.
template <typename T, typename Frozen>
void apply_base_init(
    const Where& where, Frozen& frozen, LoRAAdapter<T>& a,
    const Eigen::Ref<const Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>>* original,
    Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>* owned = nullptr) {
  using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;
  if (!a.init_pending()) return;
  std::optional<Eigen::Ref<const Matrix>> owned_ref;
  if (owned) original = &owned_ref.emplace(*owned);
  require_state(!frozen.is_merged(), where,
                ": PiSSA, OLoRA and LoftQ change W0, which a merged layer does not hold; call "
                "unmerge() first");
  if (original)
    require(original->rows() == frozen.out_features() && original->cols() == frozen.in_features(),
            where, ": the original weight must be ",
            shape_string(frozen.out_features(), frozen.in_features()), ", got ",
            shape_string(original->rows(), original->cols()));
  const LoRAConfig& cfg = a.config();
  const T s = a.scaling();
  Matrix A, B;
  if (cfg.init == Init::LoftQ) {
    if constexpr (has_round_trip<Frozen>::value) {
      require(original != nullptr, where,
              ": LoftQ needs the full-precision W0 (the 4-bit storage has already rounded it "
              "away): build the layer from the matrix, or pass W0 to add_adapter");
      Matrix base;
      loftq_init<T>(
          *original, cfg, s, [&frozen](Matrix& M) { frozen.round_trip(M); }, base, A, B);
      frozen.rebase(base);  // quantizes to exactly the last Q
    } else {
      throw std::invalid_argument(
          concat(where,
                 ": LoftQ initialises an adapter against a 4-bit base; this storage keeps W0 "
                 "without quantizing it (use Nf4FrozenWeight, or PiSSA for an unquantized base)"));
    }
  } else {
    // W becomes the residual: the caller's own copy of W0 where it gave one up.
    Matrix W = owned ? std::move(*owned) : original ? Matrix(*original) : Matrix(frozen.weight());
    if (cfg.init == Init::PiSSA)
      pissa_init<T>(W, cfg, s, A, B);
    else
      olora_init<T>(W, s, cfg.rank, A, B);
    frozen.rebase(W);
  }
  a.set_initial_factors(A, B);
}

/// Sets BaseInitHook<T, Frozen> to apply_base_init<T, Frozen>; the value of an inline variable.
template <typename T, typename Frozen>
bool register_base_init() {
  BaseInitHook<T, Frozen>::function = &apply_base_init<T, Frozen>;
  return true;
}

// Registered at static initialisation in the program that includes this header (each once).
inline const bool kBaseInitsRegistered = register_base_init<float, DenseFrozenWeight<float>>() &&
                                         register_base_init<double, DenseFrozenWeight<double>>() &&
                                         register_base_init<float, Bf16FrozenWeight>() &&
                                         register_base_init<float, Nf4FrozenWeight>() &&
                                         register_base_init<float, GgmlFrozenWeight>();
#if defined(LORA_WITH_ONEDNN)
inline const bool kOneDnnBaseInitsRegistered =
    register_base_init<float, onednn::OneDnnFrozenWeight>();
#endif

}  // namespace lora::detail

namespace lora {

/// Enables PiSSA, OLoRA and LoftQ for layers of scalar T over a storage lora does not ship (its
/// own storages are registered by including this header). Call it once, before such a layer takes
/// an adapter with one of these inits.
template <typename T, typename Storage>
void register_base_inits() {
  detail::register_base_init<T, Storage>();
}

}  // namespace lora
