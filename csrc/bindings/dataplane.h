#pragma once
// The data plane's part of genie._C (csrc/bindings/dataplane.cpp).
#include <pybind11/pybind11.h>

void register_dataplane(pybind11::module_& m);
