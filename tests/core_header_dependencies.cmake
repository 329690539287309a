# Fails when lora/core.hpp (directly or through what it includes) pulls in a header of a dependency
# other than Eigen and the standard library. Variables: CXX, INCLUDE_DIR, EIGEN_DIRS.
set(flags -std=c++17 -M -x c++ -I${INCLUDE_DIR})
foreach(dir IN LISTS EIGEN_DIRS)
  list(APPEND flags -I${dir})
endforeach()
file(WRITE ${CMAKE_CURRENT_BINARY_DIR}/core_header_dependencies.cpp "#include <lora/core.hpp>\n")
execute_process(COMMAND ${CXX} ${flags} ${CMAKE_CURRENT_BINARY_DIR}/core_header_dependencies.cpp
  OUTPUT_VARIABLE deps RESULT_VARIABLE rc)
if(rc)
  message(FATAL_ERROR "preprocessing lora/core.hpp failed (${rc})")
endif()
foreach(forbidden nlohmann/ "/regex[ \n\\]" "/unistd\\.h" "/fcntl\\.h" "sys/stat\\.h" "/mpi\\.h"
        oneapi/dnnl "/fstream[ \n\\]" "/omp\\.h")
  if(deps MATCHES "${forbidden}")
    message(FATAL_ERROR "lora/core.hpp includes a header matching '${forbidden}'; it must need "
                        "Eigen alone (move the include behind an opt-in header)")
  endif()
endforeach()
message(STATUS "lora/core.hpp: Eigen and the standard library only")
