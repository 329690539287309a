// How a layer reaches PiSSA, OLoRA and LoftQ without compiling them. Those inits need Eigen's SVD
// and QR, which cost seconds of compile time in every file that instantiates them, while most
// programs never use them. So a layer calls them through a function pointer, one per (T, storage),
// which lora/base_init.hpp fills in (at static initialisation, in whichever file of the program
// includes it); without it, an adapter with such an init is refused with a message that says so.
#pragma once

#include "lora/adapter.hpp"
#include "lora/detail/check.hpp"

#include <Eigen/Core>

#include <stdexcept>

namespace lora::detail {

/// The base init for layers of scalar T over storage Frozen (apply_base_init in
/// lora/base_init.hpp), or null until that header registers it.
template <typename T, typename Frozen>
struct BaseInitHook {
  using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;
  using Function = void (*)(const Where& where, Frozen& frozen, LoRAAdapter<T>& adapter,
                            const Eigen::Ref<const Matrix>* original, Matrix* owned);
  inline static Function function = nullptr;
};

/// Runs the registered base init for a pending adapter; throws std::logic_error when none is.
template <typename T, typename Frozen>
void run_base_init(const Where& where, Frozen& frozen, LoRAAdapter<T>& adapter,
                   const Eigen::Ref<const typename BaseInitHook<T, Frozen>::Matrix>* original,
                   typename BaseInitHook<T, Frozen>::Matrix* owned) {
  const auto function = BaseInitHook<T, Frozen>::function;
  require_state(function != nullptr, where,
                ": PiSSA, OLoRA and LoftQ are compiled only where <lora/base_init.hpp> is "
                "included (they need Eigen's SVD): include it in one source file of the program "
                "(for a storage of your own, call lora::register_base_inits<T, Storage>() there)");
  function(where, frozen, adapter, original, owned);
}

}  // namespace lora::detail
