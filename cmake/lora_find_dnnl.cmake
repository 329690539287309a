# Finds oneDNN (Debian: libdnnl-dev) and defines the imported target lora_dnnl::dnnl. Used twice:
# by lora's own CMakeLists.txt and by the installed loraConfig.cmake, so that an installed
# lora::onednn finds oneDNN on the consumer's machine exactly as lora's build found it.
#
# Found directly rather than with find_package(dnnl): Debian 12's dnnl-config.cmake fails without
# the OpenCL development files of oneDNN's GPU runtime, which a CPU build never uses.
# Sets LORA_DNNL_FOUND.
if(TARGET lora_dnnl::dnnl)
  set(LORA_DNNL_FOUND TRUE)
  return()
endif()
find_path(LORA_DNNL_INCLUDE_DIR oneapi/dnnl/dnnl.hpp)
find_library(LORA_DNNL_LIBRARY NAMES dnnl)
if(LORA_DNNL_INCLUDE_DIR AND LORA_DNNL_LIBRARY)
  # GLOBAL: visible to the parent project when lora comes in through add_subdirectory.
  add_library(lora_dnnl::dnnl UNKNOWN IMPORTED GLOBAL)
  set_target_properties(lora_dnnl::dnnl PROPERTIES IMPORTED_LOCATION "${LORA_DNNL_LIBRARY}"
    INTERFACE_INCLUDE_DIRECTORIES "${LORA_DNNL_INCLUDE_DIR}")
  set(LORA_DNNL_FOUND TRUE)
else()
  set(LORA_DNNL_FOUND FALSE)
endif()
