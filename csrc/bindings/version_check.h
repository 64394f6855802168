// genie._C.VersionCheck: the per-call check that a compiled program's arguments are the very
// tensors, at the very versions, a target was found holding (Note: [Checking what was found]
// in python/genie/compile/residency.py).
#pragma once

#include <torch/csrc/utils/pybind.h>

namespace genie::bindings {

void register_version_check(pybind11::module_& m);

}  // namespace genie::bindings
