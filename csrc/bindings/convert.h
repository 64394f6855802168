#pragma once
// Conversions between csrc/capture's core types and Python objects (csrc/bindings/convert.cpp).
#include <array>
#include <memory>
#include <string>
#include <vector>

#include <torch/csrc/utils/pybind.h>

#include "capture/digest.h"
#include "capture/executor.h"

namespace genie::bindings {

c10::Device parse_device(const std::string& s);
pybind11::dict ref_to_py(const TensorRef& r);
pybind11::dict node_to_py(const Node& n);
pybind11::list nodes_to_py(const std::vector<std::shared_ptr<Node>>& nodes);
TensorRef ref_from_py(pybind11::handle h);
// A checked program node from Python (genie._C._program_node).
std::shared_ptr<Node> program_node(const std::string& op_name, pybind11::list args,
                                   pybind11::list inputs, pybind11::list outputs,
                                   std::vector<int32_t> alias);
pybind11::bytes fingerprint_bytes(const std::array<uint64_t, 2>& f);
pybind11::list paths_to_py(const ProgramDigest& d);
pybind11::dict constants_to_py(const FlushRequest& req);
pybind11::list request_nodes_to_py(const FlushRequest& req);

}  // namespace genie::bindings
