# llama.cpp's own prebuilt CPU libraries as imported targets, for lora's tests only (never a
# dependency of an installed lora target): they are the reference that GGUF files and quantized
# blocks are checked against. scripts/fetch_llama_cpp puts them in LORA_LLAMA_CPP_DIR.
#   lora_llama_cpp::llama       libllama (+ libggml, libggml-base) and llama.h
#   lora_llama_cpp::ggml_base   libggml-base alone (ggml.h: quantizers, dequantizers, gguf.h)
# ggml loads its CPU back end at run time from a folder: LORA_LLAMA_CPP_LIB_DIR is defined for the
# code that links these targets (ggml_backend_load_all_from_path(LORA_LLAMA_CPP_LIB_DIR)).
# Sets LORA_LLAMA_CPP_FOUND.
set(LORA_LLAMA_CPP_DIR "${PROJECT_SOURCE_DIR}/build-deps/llama.cpp" CACHE PATH
  "Where scripts/fetch_llama_cpp put llama.cpp's prebuilt libraries and headers")
set(LORA_LLAMA_CPP_FOUND FALSE)
if(EXISTS "${LORA_LLAMA_CPP_DIR}/lib/libllama.v0.4.0.so"
   AND EXISTS "${LORA_LLAMA_CPP_DIR}/lib/libggml-base.so"
   AND EXISTS "${LORA_LLAMA_CPP_DIR}/include/llama.h")
  set(LORA_LLAMA_CPP_FOUND TRUE)
  if(NOT TARGET lora_llama_cpp::ggml_base)
    add_library(lora_llama_cpp::ggml_base SHARED IMPORTED GLOBAL)
    set_target_properties(lora_llama_cpp::ggml_base PROPERTIES
      IMPORTED_LOCATION "${LORA_LLAMA_CPP_DIR}/lib/libggml-base.so"
      IMPORTED_NO_SONAME TRUE
      INTERFACE_INCLUDE_DIRECTORIES "${LORA_LLAMA_CPP_DIR}/include"
      INTERFACE_COMPILE_DEFINITIONS "LORA_LLAMA_CPP_LIB_DIR=\"${LORA_LLAMA_CPP_DIR}/lib\"")
    add_library(lora_llama_cpp::ggml SHARED IMPORTED GLOBAL)
    set_target_properties(lora_llama_cpp::ggml PROPERTIES
      IMPORTED_LOCATION "${LORA_LLAMA_CPP_DIR}/lib/libggml.v0.4.0.so"
      INTERFACE_LINK_LIBRARIES lora_llama_cpp::ggml_base)
    add_library(lora_llama_cpp::llama SHARED IMPORTED GLOBAL)
    set_target_properties(lora_llama_cpp::llama PROPERTIES
      IMPORTED_LOCATION "${LORA_LLAMA_CPP_DIR}/lib/libllama.v0.4.0.so"
      INTERFACE_LINK_LIBRARIES lora_llama_cpp::ggml)
  endif()
endif()
