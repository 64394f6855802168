// genie._C: the only pybind11 code. Everything here is a thin wrapper over csrc/capture.
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/jit/python/pybind_utils.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/python.h>

#include "capture/device.h"
#include "capture/errors.h"
#include "capture/executor.h"
#include "capture/kernels.h"
#include "capture/recorder.h"
#include "capture/shape_cache.h"
#include "capture/storage.h"

namespace py = pybind11;
using namespace genie;

namespace {

py::dict ref_to_py(const TensorRef& r) {
  py::dict d;
  d["storage"] = r.storage;
  d["dtype"] = py::reinterpret_borrow<py::object>(reinterpret_cast<PyObject*>(torch::getTHPDtype(r.dtype)));
  d["shape"] = r.sizes;
  d["stride"] = r.strides;
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

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "genie's compiled core: the remote_accelerator backend and its local executor";

  m.def("_register", [] {
    register_device();
    return register_direct_kernels();
  }, "Register the PrivateUse1 hooks and the direct kernels; returns how many ops got one.");

  m.def("_set_error_hook", [](py::object factory) {
    // factory(kind: str, message: str) -> BaseException instance
    auto f = std::make_shared<py::object>(std::move(factory));
    set_error_hook([f](ErrorKind kind, const std::string& msg) {
      static const char* names[] = {"execution", "unsupported", "remote", "transport", "protocol"};
      py::gil_scoped_acquire gil;
      py::object exc = (*f)(names[static_cast<int>(kind)], msg);
      PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(exc.ptr())), exc.ptr());
      throw python_error();
    });
  });

  m.def("_set_device_count", [](int n) { set_device_count(static_cast<c10::DeviceIndex>(n)); });
  m.def("_device_count", [] { return static_cast<int>(device_count()); });
  m.def("_current_device", [] { return static_cast<int>(current_device_index()); });
  m.def("_set_device", [](int i) { set_current_device_index(static_cast<c10::DeviceIndex>(i)); });

  m.def("_default_generator", [](int i) { return default_generator(static_cast<c10::DeviceIndex>(i)); });

  m.def("_set_local_executor", [](const std::string& device) {
    auto d = parse_device(device);
    recorder().set_executor(std::make_shared<LocalExecutor>(d));
    set_target_device_type(d.type());
  }, "Run flushes in this process on `device` (\"cpu\", \"cuda:0\").");
  m.def("_executor_name", [] {
    auto e = recorder().executor();
    return e ? e->name() : std::string("none");
  });

  m.def("_storage_id", [](const at::Tensor& t) {
    TORCH_CHECK(t.device().type() == c10::DeviceType::PrivateUse1, "genie: not a remote_accelerator tensor");
    return storage_id(t.storage());
  });
  m.def("_flush", [](const std::vector<at::Tensor>& ts) {
    std::vector<StorageId> ids;
    for (const auto& t : ts)
      if (t.device().type() == c10::DeviceType::PrivateUse1) ids.push_back(storage_id(t.storage()));
    py::gil_scoped_release nogil;
    recorder().flush(ids);
  });
  m.def("_flush_all", [] {
    py::gil_scoped_release nogil;
    recorder().flush_all();
  });
  m.def("_collect", [] {
    py::gil_scoped_release nogil;
    recorder().collect();
  });
  m.def("_pending_nodes", [] { return nodes_to_py(recorder().pending()); });
  m.def("_last_flushed_nodes", [] { return nodes_to_py(recorder().last_flushed()); });
  m.def("_pending_constants", [] {
    py::dict d;
    for (const auto& [id, c] : recorder().pending_constants()) d[py::int_(id)] = c.tensor;
    return d;
  });
  m.def("_set_context", [](int64_t id) { set_context(id); });
  m.def("_current_context", [] { return current_context(); });

  m.def("_stats", [] {
    auto s = recorder().stats();
    py::dict d;
    d["nodes_recorded"] = s.nodes_recorded;
    d["nodes_executed"] = s.nodes_executed;
    d["nodes_dropped"] = s.nodes_dropped;
    d["flushes"] = s.flushes;
    d["constants_uploaded"] = s.constants_uploaded;
    d["pending_nodes"] = recorder().pending_count();
    d["shape_cache_hits"] = shape_cache().hits();
    d["shape_cache_misses"] = shape_cache().misses();
    d["shape_cache_size"] = shape_cache().size();
    d["live_storages"] = live_remote_storages();
    auto e = recorder().executor();
    d["resident_storages"] = e ? e->resident_count() : 0;
    d["resident_bytes"] = e ? e->resident_bytes() : 0;
    return d;
  });
  m.def("_clear_shape_cache", [] { shape_cache().clear(); });
}
