#pragma once
// Python executors and speculation hooks behind the recorder (csrc/bindings/python_executor.cpp).
#include <pybind11/pybind11.h>

void register_python_executor(pybind11::module_& m);
