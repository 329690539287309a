// Header-only or compiled mode, for lora's non-template functions (see lora/extern_templates.hpp
// for the templates). Header-only (the default): their bodies are here and `inline`. Compiled mode
// (LORA_EXTERN_TEMPLATES, set by linking lora::compiled): a file sees their declarations only and
// calls the bodies compiled once in that library (src/lora_compiled.cpp, which defines
// LORA_COMPILED_INSTANTIATE), as fmt's FMT_FUNC does. A header uses the pair so:
//
//   LORA_FUNC AdapterConfig read_adapter_config(const std::string& path);  // the declaration
//   ...
//   #if LORA_WITH_BODIES
//   LORA_FUNC AdapterConfig read_adapter_config(const std::string& path) { ... }
//   #endif
//
// Only headers that src/lora_compiled.cpp includes may hide bodies this way; small functions that
// hot loops must inline (a bf16 conversion, a kernel) stay inline in every mode.
#pragma once

#if defined(LORA_COMPILED_INSTANTIATE)
#define LORA_FUNC
#define LORA_WITH_BODIES 1
#elif defined(LORA_EXTERN_TEMPLATES)
#define LORA_FUNC
#define LORA_WITH_BODIES 0
#else
#define LORA_FUNC inline
#define LORA_WITH_BODIES 1
#endif
