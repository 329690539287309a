# Finds the BLAS libraries lora's dense products can run on and defines an imported target for
# each one found:
#   lora_blas::blis      BLIS (Debian: libblis-dev, OpenMP build), typed API from blis.h
#   lora_blas::openblas  OpenBLAS (Debian: libopenblas-dev, pthread build), CBLAS from its cblas.h
# Used twice: by lora's own CMakeLists.txt and by the installed loraConfig.cmake, so that an
# installed lora::blas finds its library on the consumer's machine as lora's build found it.
# Found directly (Debian installs each under its own subdirectory, beside the alternatives that
# point libblas.so and cblas.h at one of them) so that the one asked for is the one used.
# Sets LORA_BLIS_FOUND and LORA_OPENBLAS_FOUND.
if(NOT TARGET lora_blas::blis)
  find_path(LORA_BLIS_INCLUDE_DIR blis.h
    PATH_SUFFIXES blis blis-openmp x86_64-linux-gnu/blis-openmp x86_64-linux-gnu/blis-pthread)
  find_library(LORA_BLIS_LIBRARY NAMES blis
    PATH_SUFFIXES blis-openmp x86_64-linux-gnu/blis-openmp blis-pthread x86_64-linux-gnu/blis-pthread)
  if(LORA_BLIS_INCLUDE_DIR AND LORA_BLIS_LIBRARY)
    add_library(lora_blas::blis UNKNOWN IMPORTED GLOBAL)
    set_target_properties(lora_blas::blis PROPERTIES IMPORTED_LOCATION "${LORA_BLIS_LIBRARY}"
      INTERFACE_INCLUDE_DIRECTORIES "${LORA_BLIS_INCLUDE_DIR}"
      INTERFACE_COMPILE_DEFINITIONS LORA_WITH_BLIS=1)
  endif()
endif()
if(TARGET lora_blas::blis)
  set(LORA_BLIS_FOUND TRUE)
else()
  set(LORA_BLIS_FOUND FALSE)
endif()

if(NOT TARGET lora_blas::openblas)
  find_path(LORA_OPENBLAS_INCLUDE_DIR cblas.h
    PATH_SUFFIXES openblas-pthread x86_64-linux-gnu/openblas-pthread openblas NO_DEFAULT_PATH
    PATHS /usr/include /usr/local/include ${CMAKE_PREFIX_PATH})
  find_library(LORA_OPENBLAS_LIBRARY NAMES openblas
    PATH_SUFFIXES openblas-pthread x86_64-linux-gnu/openblas-pthread)
  if(LORA_OPENBLAS_INCLUDE_DIR AND LORA_OPENBLAS_LIBRARY
     AND EXISTS "${LORA_OPENBLAS_INCLUDE_DIR}/openblas_config.h")
    add_library(lora_blas::openblas UNKNOWN IMPORTED GLOBAL)
    set_target_properties(lora_blas::openblas PROPERTIES
      IMPORTED_LOCATION "${LORA_OPENBLAS_LIBRARY}"
      INTERFACE_INCLUDE_DIRECTORIES "${LORA_OPENBLAS_INCLUDE_DIR}"
      INTERFACE_COMPILE_DEFINITIONS LORA_WITH_OPENBLAS=1)
  endif()
endif()
if(TARGET lora_blas::openblas)
  set(LORA_OPENBLAS_FOUND TRUE)
else()
  set(LORA_OPENBLAS_FOUND FALSE)
endif()
