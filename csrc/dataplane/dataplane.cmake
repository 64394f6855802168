# The data plane (csrc/dataplane), included from the top-level CMakeLists.txt.
#
# GENIE_WITH_DPDK / GENIE_WITH_CUDA: AUTO (default: on when found), ON (fail when missing) or
# OFF. What was decided, and why, is printed at configure time and compiled into genie._C
# (genie._C._dpdk_unavailable_reason()).
#
#   genie_dataplane_common  no DPDK: status/config, the registration LRU (+ the CUDA host
#                           backend), the client of the data-plane agent and its arena.
#                           Linked into _C.
#   genie_dataplane         DPDK: EAL, port, wire format, endpoint, DPDK/gpudev registration.
#   genie-dpdk-agent        the process that owns the DPDK endpoint (installed next to _C).
#   genie_dpdk_inprocess    the same loop as a library, for the opt-in in-process mode.

set(GENIE_WITH_DPDK AUTO CACHE STRING "DPDK data plane: AUTO, ON or OFF")
set(GENIE_WITH_CUDA AUTO CACHE STRING "CUDA host registration in the data plane: AUTO, ON or OFF")
option(GENIE_BUILD_TESTS "Build the C++ tests of the data plane (run them with ctest)" OFF)

set(GENIE_DPDK_ENABLED OFF)
set(GENIE_DPDK_REASON "")
if(GENIE_WITH_DPDK STREQUAL "OFF")
  set(GENIE_DPDK_REASON "configured with -DGENIE_WITH_DPDK=OFF")
else()
  find_package(PkgConfig QUIET)
  if(NOT PkgConfig_FOUND)
    set(GENIE_DPDK_REASON "pkg-config was not found at build time (install pkg-config and libdpdk-dev, then rebuild)")
  else()
    pkg_check_modules(DPDK QUIET IMPORTED_TARGET libdpdk)
    if(DPDK_FOUND)
      set(GENIE_DPDK_ENABLED ON)
    else()
      set(GENIE_DPDK_REASON "libdpdk was not found by pkg-config at build time (apt install libdpdk-dev dpdk, then rebuild genie)")
    endif()
  endif()
  if(GENIE_WITH_DPDK STREQUAL "ON" AND NOT GENIE_DPDK_ENABLED)
    message(FATAL_ERROR "genie: -DGENIE_WITH_DPDK=ON but ${GENIE_DPDK_REASON}")
  endif()
endif()

set(GENIE_CUDA_ENABLED OFF)
set(GENIE_CUDA_REASON "configured with -DGENIE_WITH_CUDA=OFF")
if(NOT GENIE_WITH_CUDA STREQUAL "OFF")
  find_package(CUDAToolkit QUIET)
  if(CUDAToolkit_FOUND)
    set(GENIE_CUDA_ENABLED ON)
  elseif(GENIE_WITH_CUDA STREQUAL "ON")
    message(FATAL_ERROR "genie: -DGENIE_WITH_CUDA=ON but the CUDA toolkit was not found")
  else()
    set(GENIE_CUDA_REASON "no CUDA toolkit found")
  endif()
endif()

if(GENIE_DPDK_ENABLED)
  message(STATUS "genie: GENIE_WITH_DPDK=ON (libdpdk ${DPDK_VERSION})")
else()
  message(STATUS "genie: GENIE_WITH_DPDK=OFF: ${GENIE_DPDK_REASON}")
endif()
if(GENIE_CUDA_ENABLED)
  message(STATUS "genie: GENIE_WITH_CUDA=ON (CUDA toolkit ${CUDAToolkit_VERSION})")
else()
  message(STATUS "genie: GENIE_WITH_CUDA=OFF: ${GENIE_CUDA_REASON}")
endif()

set(_dp csrc/dataplane)
add_library(genie_dataplane_common STATIC
  ${_dp}/config.cpp
  ${_dp}/registration.cpp
  ${_dp}/agent_client.cpp
  ${_dp}/arena.cpp
)
configure_file(${_dp}/build_config.h.in ${CMAKE_CURRENT_BINARY_DIR}/generated/dataplane/build_config.h)
target_include_directories(genie_dataplane_common PUBLIC csrc ${CMAKE_CURRENT_BINARY_DIR}/generated)
target_compile_options(genie_dataplane_common PRIVATE -Wall -Wextra -Wno-unused-parameter)
if(GENIE_CUDA_ENABLED)
  target_sources(genie_dataplane_common PRIVATE ${_dp}/registration_cuda.cpp)
  # Static: genie._C must import without libcudart on its rpath (torch brings its own).
  # dlopen finds torch's runtime first (Note: [One CUDA runtime] in registration_cuda.cpp).
  target_link_libraries(genie_dataplane_common PUBLIC CUDA::cudart_static ${CMAKE_DL_LIBS})
endif()

if(GENIE_DPDK_ENABLED)
  add_library(genie_dataplane STATIC
    ${_dp}/eal.cpp
    ${_dp}/port.cpp
    ${_dp}/wire.cpp
    ${_dp}/endpoint.cpp
    ${_dp}/endpoint_send.cpp
    ${_dp}/endpoint_recv.cpp
    ${_dp}/registration_dpdk.cpp
  )
  target_link_libraries(genie_dataplane PUBLIC genie_dataplane_common PkgConfig::DPDK)
  # gpudev and rte_extmem are experimental APIs in DPDK 22.11.
  target_compile_definitions(genie_dataplane PUBLIC ALLOW_EXPERIMENTAL_API)
  # DPDK's inline helpers type-pun packet memory freely.
  target_compile_options(genie_dataplane PRIVATE -Wall -Wno-unused-parameter -fno-strict-aliasing)

  set_target_properties(genie_dataplane genie_dataplane_common PROPERTIES
                        POSITION_INDEPENDENT_CODE ON)

  add_executable(genie-dpdk-agent ${_dp}/agent_main.cpp ${_dp}/agent_loop.cpp)
  target_link_libraries(genie-dpdk-agent PRIVATE genie_dataplane)
  install(TARGETS genie-dpdk-agent RUNTIME DESTINATION genie)

  # The agent's loop on a thread of the user's process (Note: [In-process endpoint]); genie._C
  # dlopens it only when asked, so that importing genie needs no DPDK library.
  add_library(genie_dpdk_inprocess SHARED ${_dp}/inprocess.cpp ${_dp}/agent_loop.cpp)
  target_link_libraries(genie_dpdk_inprocess PRIVATE genie_dataplane)
  target_compile_options(genie_dpdk_inprocess PRIVATE -fvisibility=hidden)
  # Its copies of the data-plane classes stay its own, apart from genie._C's.
  target_link_options(genie_dpdk_inprocess PRIVATE -Wl,--exclude-libs,ALL -Wl,-Bsymbolic)
  install(TARGETS genie_dpdk_inprocess LIBRARY DESTINATION genie)
endif()

if(GENIE_BUILD_TESTS)
  enable_testing()
  add_custom_target(dataplane_tests)  # every C++ test this configuration can build
  add_executable(test_dataplane_registration ${_dp}/tests/test_registration.cpp)
  target_link_libraries(test_dataplane_registration PRIVATE genie_dataplane_common)
  add_test(NAME dataplane_registration COMMAND test_dataplane_registration)
  add_dependencies(dataplane_tests test_dataplane_registration)
  if(GENIE_DPDK_ENABLED)
    add_executable(test_dataplane_wire ${_dp}/tests/test_wire.cpp)
    target_link_libraries(test_dataplane_wire PRIVATE genie_dataplane)
    add_test(NAME dataplane_wire COMMAND test_dataplane_wire)
    add_dependencies(dataplane_tests test_dataplane_wire)
    # Two endpoints over cross-connected net_ring ports, in one process.
    find_library(GENIE_RTE_NET_RING rte_net_ring)
    if(GENIE_RTE_NET_RING)
      add_executable(test_dataplane_endpoint ${_dp}/tests/test_endpoint.cpp)
      target_link_libraries(test_dataplane_endpoint PRIVATE genie_dataplane ${GENIE_RTE_NET_RING})
      add_test(NAME dataplane_endpoint COMMAND test_dataplane_endpoint)
      add_dependencies(dataplane_tests test_dataplane_endpoint)
    endif()
  endif()
endif()

if(GENIE_BUILD_BENCHMARKS AND GENIE_DPDK_ENABLED)
  add_executable(dataplane_micro bench/dataplane_micro.cpp)
  target_link_libraries(dataplane_micro PRIVATE genie_dataplane)
endif()
