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

// lora::compiled is built on lora::peft alone: its bodies know neither oneDNN nor a BLAS. A file
// that sees LORA_WITH_ONEDNN or a BLAS would lay out and run the same classes differently from the
// library (an ODR violation, silently wrong): such a program stays header-only.
#if defined(LORA_EXTERN_TEMPLATES) && !defined(LORA_COMPILED_INSTANTIATE) && \
    (defined(LORA_WITH_ONEDNN) || defined(LORA_WITH_BLIS) || defined(LORA_WITH_OPENBLAS))
#error \
    "lora::compiled is built without oneDNN and BLAS: a program linking lora::onednn or lora::blas links lora::peft (header-only) instead of lora::compiled"
#endif
