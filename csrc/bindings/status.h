#pragma once
// A data-plane Status as a genie exception: the one place a failed Status is translated
// (csrc/bindings/dataplane.cpp's header lists the mapping).
#include <pybind11/pybind11.h>

#include "dataplane/status.h"

namespace genie::bindings {

[[noreturn]] inline void raise_status(const genie::dataplane::Status& s) {
  const char* cls = "GenieError";
  switch (s.code()) {
    case genie::dataplane::Code::PeerTimeout:
    case genie::dataplane::Code::PeerGone:
    case genie::dataplane::Code::LinkDown:
    case genie::dataplane::Code::Closed:
    case genie::dataplane::Code::AgentDied:
    case genie::dataplane::Code::Timeout: cls = "TransportError"; break;
    case genie::dataplane::Code::BadPacket: cls = "ProtocolError"; break;
    case genie::dataplane::Code::Unavailable:
    case genie::dataplane::Code::Unsupported: cls = "UnsupportedOperationError"; break;
    default: break;
  }
  pybind11::object exc = pybind11::module_::import("genie.errors").attr(cls)(s.to_string());
  PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(exc.ptr())), exc.ptr());
  throw pybind11::error_already_set();
}

inline void check(const genie::dataplane::Status& s) {
  if (!s.is_ok()) raise_status(s);
}

}  // namespace genie::bindings
