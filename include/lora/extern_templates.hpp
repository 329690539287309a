// Compiled mode (opt-in): `extern template` declarations of the instantiations lora ships, so that
// a file including lora does not instantiate and optimise them again. Define LORA_EXTERN_TEMPLATES
// (linking the CMake target lora::compiled does it) and link the static library that target
// builds, which instantiates them once (src/lora_compiled.cpp). Without the macro this header
// declares nothing and lora stays header-only (lora/detail/compiled_mode.hpp does the same for
// the non-template functions). The library must be built with the same
// architecture flags as its users (its CMake target passes them on).
//
// Covered: the layers (LoRALinear, MultiLoRALinear and their core AdapterLayer) over float and
// double dense storages and the float bf16 and NF4 storages, the adapters, the storages and their
// bases, the workspaces, SGD and AdamW, clip_grad_norm and zero_grad, combine_adapters, PEFT
// adapter I/O, optimizer state, and the GEMM kernel driver every product goes through. Other
// instantiations (another scalar, a user's own storage) are instantiated in the user's file as
// usual.
#pragma once

#include "lora/detail/compiled_mode.hpp"
#include "lora/lora.hpp"

#if defined(LORA_EXTERN_TEMPLATES) || defined(LORA_COMPILED_INSTANTIATE)

// LORA_COMPILED_INSTANTIATE (set by src/lora_compiled.cpp only) turns each declaration into the
// explicit instantiation definition that the library compiles once.
#if defined(LORA_COMPILED_INSTANTIATE)
#define LORA_TEMPLATE template
#else
#define LORA_TEMPLATE extern template
#endif

// The layers and everything they own, for each shipped storage.
#define LORA_LAYER_TEMPLATES(T, F)              \
  LORA_TEMPLATE class lora::AdapterLayer<T, F>; \
  LORA_TEMPLATE class lora::LoRALinear<T, F>;   \
  LORA_TEMPLATE class lora::MultiLoRALinear<T, F>;

// The storages' shared bases (a class's explicit instantiation does not instantiate its bases).
LORA_TEMPLATE class lora::detail::FrozenStorageBase<lora::DenseFrozenWeight<float>, float>;
LORA_TEMPLATE class lora::detail::FrozenStorageBase<lora::DenseFrozenWeight<double>, double>;
LORA_TEMPLATE class lora::detail::FrozenStorageBase<lora::Bf16FrozenWeight, float>;
LORA_TEMPLATE class lora::detail::FrozenStorageBase<lora::Nf4FrozenWeight, float>;
LORA_TEMPLATE class lora::detail::PanelStorage<lora::Nf4FrozenWeight>;
LORA_TEMPLATE class lora::detail::FrozenStorageBase<lora::GgmlFrozenWeight, float>;
LORA_TEMPLATE class lora::detail::PanelStorage<lora::GgmlFrozenWeight>;

LORA_LAYER_TEMPLATES(float, lora::DenseFrozenWeight<float>)
LORA_LAYER_TEMPLATES(double, lora::DenseFrozenWeight<double>)
LORA_LAYER_TEMPLATES(float, lora::Bf16FrozenWeight)
LORA_LAYER_TEMPLATES(float, lora::Nf4FrozenWeight)

#define LORA_SCALAR_TEMPLATES(T)                                                               \
  LORA_TEMPLATE class lora::LoRAAdapter<T>;                                                    \
  LORA_TEMPLATE class lora::DenseFrozenWeight<T>;                                              \
  LORA_TEMPLATE class lora::Workspace<T>;                                                      \
  LORA_TEMPLATE class lora::SGD<T>;                                                            \
  LORA_TEMPLATE class lora::AdamW<T>;                                                          \
  LORA_TEMPLATE T lora::clip_grad_norm<T>(const std::vector<lora::ParameterView<T>>&, T);      \
  LORA_TEMPLATE void lora::zero_grad<T>(const std::vector<lora::ParameterView<T>>&);           \
  LORA_TEMPLATE lora::LoRAAdapter<T> lora::combine_adapters<T>(                                \
      const std::vector<const lora::LoRAAdapter<T>*>&, const std::vector<double>&,             \
      lora::Combination, int);                                                                 \
  LORA_TEMPLATE lora::LoRAAdapter<T> lora::combine_adapters<T>(                                \
      const std::vector<const lora::LoRAAdapter<T>*>&, const std::vector<double>&,             \
      lora::Combination, const lora::CombineOptions&);                                         \
  LORA_TEMPLATE lora::peft::AdapterFile<T> lora::peft::read_adapter<T>(                        \
      const std::string&, const lora::peft::ReadOptions&);                                     \
  LORA_TEMPLATE lora::peft::AdapterConfig lora::peft::write_adapter<T>(                        \
      const std::string&, const std::map<std::string, const lora::LoRAAdapter<T>*>&,           \
      const lora::peft::SaveOptions&);                                                         \
  LORA_TEMPLATE void lora::save_optimizer_state<T>(const std::string&, const lora::AdamW<T>&); \
  LORA_TEMPLATE void lora::load_optimizer_state<T>(const std::string&, lora::AdamW<T>&);

// The GEMM driver (detail/gemm.hpp), whose Eigen kernels are most of a file's optimisation time.
#if !defined(LORA_GEMM_USE_EIGEN_PRODUCTS)
#define LORA_GEMM_TEMPLATES(T) LORA_GEMM_SPLIT_TEMPLATES(LORA_TEMPLATE, T)
#else
#define LORA_GEMM_TEMPLATES(T)
#endif

LORA_SCALAR_TEMPLATES(float)
LORA_SCALAR_TEMPLATES(double)
LORA_GEMM_TEMPLATES(float)
LORA_GEMM_TEMPLATES(double)

#undef LORA_GEMM_TEMPLATES
#undef LORA_SCALAR_TEMPLATES
#undef LORA_LAYER_TEMPLATES
#undef LORA_TEMPLATE

#endif
