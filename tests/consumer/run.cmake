# One consumer test: gets lora the way MODE says, then configures, builds and runs the consumer
# project (tests/consumer) linking lora::TARGET.
# Variables: MODE (find_package, fetchcontent, add_subdirectory), TARGET (lora, peft, onednn, mpi),
# LORA_SOURCE_DIR, LORA_BUILD_DIR (find_package: the build tree to install), WORK_DIR, GENERATOR,
# CXX_COMPILER, and RUNNER (optional: a ;-list that runs the program, e.g. mpiexec -n 1).
file(REMOVE_RECURSE ${WORK_DIR})
set(args -DLORA_CONSUMER_MODE=${MODE} -DLORA_CONSUMER_TARGET=${TARGET}
  -DCMAKE_CXX_COMPILER=${CXX_COMPILER}
  # Unoptimised: the test checks that the target links and runs, and -O0 compiles fastest.
  -DCMAKE_BUILD_TYPE=Debug)
if(MODE STREQUAL "find_package")
  execute_process(COMMAND ${CMAKE_COMMAND} --install ${LORA_BUILD_DIR} --prefix ${WORK_DIR}/prefix
    RESULT_VARIABLE rc OUTPUT_QUIET)
  if(rc)
    message(FATAL_ERROR "installing lora failed (${rc})")
  endif()
  list(APPEND args -DCMAKE_PREFIX_PATH=${WORK_DIR}/prefix)
elseif(MODE STREQUAL "fetchcontent")
  list(APPEND args -DFETCHCONTENT_SOURCE_DIR_LORA=${LORA_SOURCE_DIR})
else()
  list(APPEND args -DLORA_SOURCE_DIR=${LORA_SOURCE_DIR})
endif()
execute_process(COMMAND ${CMAKE_COMMAND} -S ${CMAKE_CURRENT_LIST_DIR} -B ${WORK_DIR}/build
  -G ${GENERATOR} ${args} RESULT_VARIABLE rc)
if(rc)
  message(FATAL_ERROR "configuring the consumer (${MODE}, lora::${TARGET}) failed (${rc})")
endif()
execute_process(COMMAND ${CMAKE_COMMAND} --build ${WORK_DIR}/build RESULT_VARIABLE rc)
if(rc)
  message(FATAL_ERROR "building the consumer (${MODE}, lora::${TARGET}) failed (${rc})")
endif()
execute_process(COMMAND ${RUNNER} ${WORK_DIR}/build/consumer WORKING_DIRECTORY ${WORK_DIR}
  RESULT_VARIABLE rc)
if(rc)
  message(FATAL_ERROR "the consumer (${MODE}, lora::${TARGET}) ran but failed (${rc})")
endif()
