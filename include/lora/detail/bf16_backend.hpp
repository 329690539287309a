// Which kernel a storage with bf16 products (Bf16FrozenWeight, Nf4FrozenWeight) runs: oneDNN's
// bf16 matmul where lora::onednn is linked and the CPU runs it, else the portable Eigen path.
#pragma once

#include "lora/detail/check.hpp"

#include <string>

#if defined(LORA_WITH_ONEDNN)
#include "lora/onednn/matmul.hpp"
#endif

namespace lora::detail {

/// True when this build has the oneDNN back end and the CPU runs its bf16 matmul.
inline bool onednn_bf16_available() {
#if defined(LORA_WITH_ONEDNN)
  return onednn::bf16_matmul_supported();
#else
  return false;
#endif
}

/// What the Auto back end runs here and why, e.g. "oneDNN 2.6.3, ISA avx512_core_bf16
/// (vdpbf16ps)" or "portable (built without oneDNN); CPU avx512_bf16: yes".
inline std::string bf16_backend_report() {
#if defined(LORA_WITH_ONEDNN)
  if (onednn_bf16_available()) return onednn::runtime_report();
  return "portable (oneDNN cannot run a bf16 matmul on this CPU: " + onednn::runtime_report() + ")";
#else
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
  const char* flag = __builtin_cpu_supports("avx512bf16") ? "yes" : "no";
#else
  const char* flag = "unknown";
#endif
  return std::string("portable (built without oneDNN); CPU avx512_bf16: ") + flag;
#endif
}

/// The back end to run for `wanted` (an enum with Auto, Portable and OneDnn): Auto picks oneDNN
/// when available; asking for OneDnn where it is not throws std::invalid_argument naming the
/// storage and what to do.
template <typename Backend>
Backend resolve_bf16_backend(Backend wanted, const char* storage, const char* backend_enum) {
  if (wanted == Backend::Portable) return wanted;
  if (onednn_bf16_available()) return Backend::OneDnn;
#if defined(LORA_WITH_ONEDNN)
  require(wanted == Backend::Auto, storage,
          ": the oneDNN back end was requested, but oneDNN cannot run a bf16 matmul on this CPU (",
          onednn::runtime_report(), "); use ", backend_enum, "::Auto or Portable");
#else
  require(wanted == Backend::Auto, storage,
          ": the oneDNN back end was requested, but lora was built without oneDNN; link the "
          "lora::onednn CMake target (Debian: apt-get install libdnnl-dev) or use ",
          backend_enum, "::Auto or Portable");
#endif
  return Backend::Portable;
}

}  // namespace lora::detail
