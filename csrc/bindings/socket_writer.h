// genie._C.SocketWriter: a native thread that writes queued frames to a socket
// (Note: [Background sends] in socket_writer.cpp).
#pragma once

#include <torch/csrc/utils/pybind.h>

namespace genie::bindings {

void register_socket_writer(pybind11::module_& m);

}  // namespace genie::bindings
