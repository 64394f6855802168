// Conversions between csrc/capture's core types and the Python objects genie._C hands out
// (the dicts genie.graph.Node.from_core reads) or takes (_program_node).

#include <torch/csrc/Dtype.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/Storage.h>
#include <torch/csrc/jit/python/pybind_utils.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/python.h>

#include "capture/device.h"
#include "capture/digest.h"
#include "capture/errors.h"
#include "capture/executor.h"
#include "capture/kernels.h"
#include "capture/program_runner.h"
#include "capture/recorder.h"
#include "capture/shape_cache.h"
#include "capture/storage.h"
#include "bindings/convert.h"

namespace py = pybind11;
using namespace genie;

namespace genie::bindings {

py::dict ref_to_py(const TensorRef& r) {
  py::dict d;
  d["storage"] = r.storage;
  d["dtype"] = py::reinterpret_borrow<py::object>(reinterpret_cast<PyObject*>(torch::getTHPDtype(r.dtype)));
  d["shape"] = std::vector<int64_t>(r.sizes.begin(), r.sizes.end());
  d["stride"] = std::vector<int64_t>(r.strides.begin(), r.strides.end());
  d["offset"] = r.offset;
  d["storage_nbytes"] = r.storage_nbytes;
  d["device"] = r.device;
  d["requires_grad"] = r.requires_grad;
  return d;
}

py::dict node_to_py(const Node& n) {
  py::dict d;
  d["id"] = n.id;
  d["op"] = n.name();
  py::list args;
  for (const auto& a : n.args) {
    switch (a.kind) {
      case Arg::Kind::Value:
        args.append(py::make_tuple("value", torch::jit::toPyObject(a.value)));
        break;
      case Arg::Kind::Tensor:
        args.append(py::make_tuple("tensor", a.refs[0]));
        break;
      case Arg::Kind::TensorList:
        args.append(py::make_tuple("tensor_list", a.refs));
        break;
      case Arg::Kind::OptionalTensorList:
        args.append(py::make_tuple("optional_tensor_list", a.refs));
        break;
    }
  }
  d["args"] = args;
  py::list ins, outs;
  for (const auto& r : n.inputs) ins.append(ref_to_py(r));
  for (const auto& r : n.outputs) outs.append(ref_to_py(r));
  d["inputs"] = ins;
  d["outputs"] = outs;
  d["output_alias"] = n.output_alias;
  d["writes"] = n.writes;
  d["fresh"] = n.fresh;
  d["context"] = n.context;
  d["eager"] = n.eager;
  d["random"] = n.rng_state.has_value();
  d["empty_factory"] = n.empty_factory;
  return d;
}

py::list nodes_to_py(const std::vector<std::shared_ptr<Node>>& nodes) {
  py::list l;
  for (const auto& n : nodes) l.append(node_to_py(*n));
  return l;
}

c10::Device parse_device(const std::string& s) { return c10::Device(s); }

// -- checked programs as C++ nodes (Note: [Running programs in C++]) ------------------------
// The server hands over steps it has validated: (local, dtype, shape, stride, offset, nbytes)
// references and [kind, value] arguments, values converted by the op's schema types.
TensorRef ref_from_py(py::handle h) {
  auto t = py::reinterpret_borrow<py::sequence>(h);
  if (t.size() != 6) throw py::value_error("genie: a reference has 6 fields");
  TensorRef r;
  r.storage = t[0].cast<int64_t>();
  PyObject* dt = t[1].ptr();
  if (!THPDtype_Check(dt)) throw py::type_error("genie: a reference's dtype must be a torch.dtype");
  r.dtype = reinterpret_cast<THPDtype*>(dt)->scalar_type;
  for (auto x : py::reinterpret_borrow<py::sequence>(t[2])) r.sizes.push_back(x.cast<int64_t>());
  for (auto x : py::reinterpret_borrow<py::sequence>(t[3])) r.strides.push_back(x.cast<int64_t>());
  if (r.sizes.size() != r.strides.size()) throw py::value_error("genie: sizes and strides differ in rank");
  r.offset = t[4].cast<int64_t>();
  r.storage_nbytes = t[5].cast<int64_t>();
  return r;
}

bool is_tensor_type(const c10::TypePtr& declared) {
  c10::TypePtr t = declared;
  if (t->kind() == c10::TypeKind::OptionalType) t = t->castRaw<c10::OptionalType>()->getElementType();
  return t->kind() == c10::TypeKind::TensorType;
}

c10::IValue value_from_py(py::handle v, const c10::Argument& a) {
  if (v.is_none()) return c10::IValue();
  if (is_tensor_type(a.type())) {
    // A Python number where the schema wants a tensor: a wrapped scalar, as eager makes one.
    at::Tensor t;
    if (PyBool_Check(v.ptr())) t = at::scalar_to_tensor(c10::Scalar(v.cast<bool>()));
    else if (PyLong_Check(v.ptr())) t = at::scalar_to_tensor(c10::Scalar(v.cast<int64_t>()));
    else if (PyFloat_Check(v.ptr())) t = at::scalar_to_tensor(c10::Scalar(v.cast<double>()));
    else if (PyComplex_Check(v.ptr())) t = at::scalar_to_tensor(c10::Scalar(v.cast<c10::complex<double>>()));
    else throw py::type_error("genie: an unexpected value for tensor argument " + a.name());
    t.unsafeGetTensorImpl()->set_wrapped_number(true);
    return t;
  }
  return torch::jit::toIValue(v, a.type());
}

std::shared_ptr<Node> program_node(const std::string& op_name, py::list args, py::list inputs, py::list outputs,
                                   std::vector<int32_t> alias) {
  auto dot = op_name.rfind('.');
  if (dot == std::string::npos) throw py::value_error("genie: " + op_name + " is not an op overload name");
  std::string overload = op_name.substr(dot + 1);
  auto handle = c10::Dispatcher::singleton().findSchema(
      {op_name.substr(0, dot), overload == "default" ? std::string() : overload});
  if (!handle.has_value()) throw py::value_error("genie: no op " + op_name);
  auto n = std::make_shared<Node>();
  n->op = *handle;
  const auto& schema_args = handle->schema().arguments();
  if (args.size() > schema_args.size()) throw py::value_error("genie: too many arguments for " + op_name);
  for (size_t i = 0; i < args.size(); ++i) {
    auto a = py::reinterpret_borrow<py::sequence>(args[i]);
    int kind = a[0].cast<int>();
    Arg arg;
    if (kind == 0) {
      arg.kind = Arg::Kind::Value;
      arg.value = value_from_py(a[1], schema_args[i]);
    } else if (kind == 1) {
      arg.kind = Arg::Kind::Tensor;
      arg.refs.push_back(a[1].cast<int32_t>());
    } else if (kind == 2 || kind == 3) {
      arg.kind = kind == 2 ? Arg::Kind::TensorList : Arg::Kind::OptionalTensorList;
      arg.refs = a[1].cast<std::vector<int32_t>>();
    } else {
      throw py::value_error("genie: an argument kind must be 0-3");
    }
    for (auto r : arg.refs)
      if (r < -1 || r >= static_cast<int32_t>(inputs.size())) throw py::value_error("genie: a tensor index out of range");
    n->args.push_back(std::move(arg));
  }
  for (auto r : inputs) n->inputs.push_back(ref_from_py(r));
  if (alias.size() != outputs.size()) throw py::value_error("genie: one alias per output");
  for (size_t i = 0; i < outputs.size(); ++i) {
    if (alias[i] == kUndefinedOutput || outputs[i].is_none()) {
      n->outputs.emplace_back();
    } else {
      n->outputs.push_back(ref_from_py(outputs[i]));
    }
  }
  n->output_alias = std::move(alias);
  return n;
}

py::bytes fingerprint_bytes(const std::array<uint64_t, 2>& f) {
  return py::bytes(reinterpret_cast<const char*>(f.data()), sizeof(uint64_t) * 2);
}

// Each parameter's path (Note: [Program templates]) as a list, without the -1 padding.
py::list paths_to_py(const ProgramDigest& d) {
  py::list out;
  for (const auto& p : d.param_paths) {
    py::list path;
    for (auto x : p)
      if (x >= 0) path.append(x);
    out.append(path);
  }
  return out;
}

py::dict constants_to_py(const FlushRequest& req) {
  py::dict constants;
  for (const auto& [id, c] : req.constants) constants[py::int_(id)] = c.tensor;
  return constants;
}

py::list request_nodes_to_py(const FlushRequest& req) {
  py::list nodes;
  for (const auto& n : req.nodes) {
    auto d = node_to_py(*n);
    if (n->rng_state.has_value()) d["rng_state"] = *n->rng_state;
    nodes.append(d);
  }
  return nodes;
}

}  // namespace genie::bindings
