// genie._C: the only pybind11 code. Everything here is a thin wrapper over csrc/capture.
#include <poll.h>

#include <chrono>

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
#include "bindings/dataplane.h"

namespace py = pybind11;
using namespace genie;

namespace {

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

// Note: [Python executors]
// Remote execution is written in Python (wire protocol, transports). It plugs in behind the
// same Executor interface as the local executor through this adapter, which converts the
// request to the dicts genie.graph.Node.from_core reads. The recorder calls it with its mutex
// held and the GIL released; the adapter takes the GIL for the call.
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

// Note: [Flush digests in Python]
// A client that digests flushes (it has run_digest()) gets one FlushDigest per flush: the
// fingerprint and binding computed in C++ (Note: [Program digests]), the uploads, the random
// states, the value fetched right after (Note: [Run then fetch] in remote/client.py) and the
// template fingerprint and integers (Note: [Program templates]). The node dicts and the
// template's paths are built only if the client asks for them (a program it has not seen, a
// structure it has not met), and only during the call: the request dies with it.
struct FlushDigest {
  const FlushRequest* req = nullptr;
  ProgramDigest digest;
  std::shared_ptr<bool> alive = std::make_shared<bool>(true);

  const FlushRequest& request() const {
    if (!*alive) throw std::runtime_error("genie: a flush's digest used after the flush");
    return *req;
  }
};

class PyExecutor final : public Executor {
 public:
  // An object with run_digest() gets flushes as digests first (Note: [Flush digests in
  // Python]); any other gets them as node dicts (run()), and one whose `frees_dead` is true
  // gets what is dead after the flush too: run(nodes, constants, targets, dead) (Note: [Dead
  // after the flush] in capture/recorder.cpp).
  explicit PyExecutor(py::object obj) : obj_(std::move(obj)) {
    digests_ = py::hasattr(obj_, "run_digest");
    early_ = py::hasattr(obj_, "upload_early");
    frees_dead_ = py::getattr(obj_, "frees_dead", py::bool_(false)).cast<bool>();
  }
  ~PyExecutor() override {
    py::gil_scoped_acquire gil;
    obj_ = py::object();
  }
  std::string name() const override {
    py::gil_scoped_acquire gil;
    return py::str(obj_.attr("name"));
  }
  void run(const FlushRequest& req) override {
    py::gil_scoped_acquire gil;
    if (digests_ && !req.nodes.empty()) {
      auto d = std::make_shared<FlushDigest>();
      d->req = &req;
      d->digest = digest_program(req.nodes, 0);
      if (d->digest.ok) {
        try {
          obj_.attr("run_digest")(d);
        } catch (...) {
          *d->alive = false;
          throw;
        }
        *d->alive = false;
        return;
      }
    }
    if (frees_dead_) {
      obj_.attr("run")(request_nodes_to_py(req), constants_to_py(req), req.targets, req.dead);
      return;
    }
    obj_.attr("run")(request_nodes_to_py(req), constants_to_py(req), req.targets);
  }
  at::Tensor fetch(const TensorRef& ref) override {
    py::gil_scoped_acquire gil;
    return obj_.attr("fetch")(ref_to_py(ref)).cast<at::Tensor>();
  }
  void release(const std::vector<StorageId>& ids) override {
    py::gil_scoped_acquire gil;
    obj_.attr("release")(ids);
  }
  bool has(StorageId id) const override {
    py::gil_scoped_acquire gil;
    return obj_.attr("has")(id).cast<bool>();
  }
  std::vector<c10::IValue> run_eager(const Node& node) override {
    py::gil_scoped_acquire gil;
    auto d = node_to_py(node);
    if (node.rng_state.has_value()) d["rng_state"] = *node.rng_state;
    py::list results = obj_.attr("run_eager")(d);
    std::vector<c10::IValue> out;
    for (auto r : results) out.push_back(torch::jit::toIValue(r, c10::AnyType::get()));
    return out;
  }
  void bind(const TensorRef& ref, const at::Tensor& value) override {
    py::gil_scoped_acquire gil;
    obj_.attr("bind")(ref_to_py(ref), value);
  }
  int64_t resident_count() const override {
    py::gil_scoped_acquire gil;
    return obj_.attr("resident_count")().cast<int64_t>();
  }
  int64_t resident_bytes() const override {
    py::gil_scoped_acquire gil;
    return obj_.attr("resident_bytes")().cast<int64_t>();
  }
  void upload_early(StorageId id, const at::Tensor& value) override {
    if (!early_) return;
    py::gil_scoped_acquire gil;
    try {
      obj_.attr("upload_early")(id, value);
    } catch (py::error_already_set& e) {
      // The value stays the flush's to upload (Note: [Early uploads]).
      e.discard_as_unraisable("genie: early upload");
    }
  }

 private:
  py::object obj_;
  bool digests_ = false;
  bool early_ = false;
  bool frees_dead_ = false;
};

// A Python object with `window` (an int) and on_window(bytes) as the recorder's speculation
// hook (Note: [Speculation hook]).
class PySpeculationHook final : public SpeculationHook {
 public:
  explicit PySpeculationHook(py::object obj) : obj_(std::move(obj)) { window_ = obj_.attr("window").cast<size_t>(); }
  ~PySpeculationHook() override {
    py::gil_scoped_acquire gil;
    obj_ = py::object();
  }
  size_t window() const override { return window_; }
  void on_window(const std::array<uint64_t, 2>& prefix) override {
    py::gil_scoped_acquire gil;
    try {
      obj_.attr("on_window")(fingerprint_bytes(prefix));
    } catch (py::error_already_set& e) {
      // A guess that could not be sent costs nothing but the guess.
      e.discard_as_unraisable("genie: speculation hook");
    }
  }

 private:
  py::object obj_;
  size_t window_ = 0;
};

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "genie's compiled core: the remote_accelerator backend and its local executor";
  register_dataplane(m);

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
      // Move the Python error into the C++ exception now, with the GIL held: torch restores
      // it when the exception reaches the Python boundary, on whichever thread that is.
      python_error err;
      err.persist();
      throw err;
    });
  });

  // Note: [Spinning for a reply]
  // A thread blocked in recv() on a socket that stayed quiet for milliseconds wakes up on a core
  // that may have gone to a deep sleep state: 0.1-0.2 ms after the bytes arrived, measured on a
  // GPU host, which is a few percent of a forward pass. Polling the socket for a bounded time
  // first, with the GIL released, answers as soon as the bytes are there.
  m.def("_spin_until_readable", [](int fd, int64_t max_us) {
    py::gil_scoped_release nogil;
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::microseconds(max_us);
    pollfd p{fd, POLLIN, 0};
    do {
      p.revents = 0;
      // readable, or an error or a hang-up that the blocking read that follows will report
      if (::poll(&p, 1, 0) != 0) return true;
    } while (std::chrono::steady_clock::now() < deadline);
    return false;
  }, py::arg("fd"), py::arg("max_us"),
     "Poll `fd` until it is readable or `max_us` microseconds passed; True when readable.");

  py::class_<Node, std::shared_ptr<Node>>(m, "_ProgramNode",
      "A validated program step as the C++ runner holds it (Note: [Running programs in C++]).");
  m.def("_program_node", &program_node, py::arg("op"), py::arg("args"), py::arg("inputs"),
        py::arg("outputs"), py::arg("alias"));
  py::class_<ProgramRunner, std::shared_ptr<ProgramRunner>>(m, "_ProgramRunner")
      .def(py::init([](const std::string& device, const std::vector<std::shared_ptr<Node>>& nodes,
                       int64_t nlocals, std::vector<int64_t> inputs, std::vector<int64_t> produced,
                       std::vector<int64_t> zero_steps) {
             std::vector<std::shared_ptr<const Node>> steps(nodes.begin(), nodes.end());
             return std::make_shared<ProgramRunner>(parse_device(device), std::move(steps), nlocals,
                                                    std::move(inputs), std::move(produced), zero_steps);
           }),
           py::arg("device"), py::arg("nodes"), py::arg("nlocals"), py::arg("inputs"), py::arg("produced"),
           py::arg("zero_steps") = std::vector<int64_t>())
      .def("run", [](const ProgramRunner& r, py::list storages) {
        std::vector<c10::Storage> in;
        in.reserve(storages.size());
        for (auto s : storages) {
          if (!THPStorage_Check(s.ptr())) throw py::type_error("genie: run() takes untyped storages");
          in.push_back(THPStorage_Unpack(s.ptr()));
        }
        std::vector<c10::Storage> out;
        {
          py::gil_scoped_release nogil;
          out = r.run(in);
        }
        py::list result;
        for (auto& st : out) {
          if (st) result.append(py::reinterpret_steal<py::object>(THPStorage_Wrap(std::move(st))));
          else result.append(py::none());
        }
        return result;
      }, "Run with the storages of the program's inputs; the storages of its outputs (None: not made).")
      .def("__len__", &ProgramRunner::size);

  m.def("_set_device_count", [](int n) { set_device_count(static_cast<c10::DeviceIndex>(n)); });
  m.def("_device_count", [] { return static_cast<int>(device_count()); });
  m.def("_current_device", [] { return static_cast<int>(current_device_index()); });
  m.def("_set_device", [](int i) { set_current_device_index(static_cast<c10::DeviceIndex>(i)); });

  m.def("_default_generator", [](int i) { return default_generator(static_cast<c10::DeviceIndex>(i)); });

  m.def("_set_local_executor", [](const std::string& device) {
    auto d = parse_device(device);
    set_target_device_type(d.type());
    py::gil_scoped_release nogil;
    recorder().set_executor(std::make_shared<LocalExecutor>(d));
  }, "Run flushes in this process on `device` (\"cpu\", \"cuda:0\").");
  py::class_<FlushDigest, std::shared_ptr<FlushDigest>>(m, "_FlushDigest",
                                                       "One flush as a digesting client gets it (Note: [Flush digests in Python]).")
      .def_property_readonly("fingerprint", [](const FlushDigest& d) { return fingerprint_bytes(d.digest.fingerprint); })
      .def_property_readonly("binding", [](const FlushDigest& d) { return d.digest.binding; })
      .def_property_readonly("constants", [](const FlushDigest& d) { return constants_to_py(d.request()); })
      .def_property_readonly("targets", [](const FlushDigest& d) { return d.request().targets; })
      .def_property_readonly("dead", [](const FlushDigest& d) { return d.request().dead; },
                             "What the recorder releases right after this flush (Note: [Dead after the flush]).")
      .def_property_readonly("rng", [](const FlushDigest& d) {
        py::list rng;
        for (const auto& [k, state] : d.digest.rng) rng.append(py::make_tuple(k, state));
        return rng;
      })
      .def_property_readonly("then_fetch", [](const FlushDigest& d) -> py::object {
        const auto& req = d.request();
        return req.then_fetch.has_value() ? py::object(ref_to_py(*req.then_fetch)) : py::none();
      })
      .def_property_readonly("structure", [](const FlushDigest& d) { return fingerprint_bytes(d.digest.structure); })
      .def_property_readonly("params", [](const FlushDigest& d) {
        return py::bytes(reinterpret_cast<const char*>(d.digest.params.data()), d.digest.params.size() * sizeof(int64_t));
      }, "The integers the structure leaves out, as int64 bytes (Note: [Program templates]).")
      .def("nodes", [](const FlushDigest& d) { return request_nodes_to_py(d.request()); },
           "The flush's node dicts (built now, at a cost of ~10 us a node).")
      .def("paths", [](const FlushDigest& d) { return paths_to_py(digest_program(d.request().nodes, 0, /*paths=*/true)); },
           "Where each of `params` sits in the encoded program.");
  m.def("_set_speculation_hook", [](py::object obj) {
    std::shared_ptr<SpeculationHook> hook;
    if (!obj.is_none()) hook = std::make_shared<PySpeculationHook>(std::move(obj));
    py::gil_scoped_release nogil;
    recorder().set_speculation_hook(std::move(hook));
  }, "Install the recorder's speculation hook (an object with `window` and on_window(bytes)), or None.");
  m.def("_set_python_executor", [](py::object obj, const std::string& target_device_type) {
    auto e = std::make_shared<PyExecutor>(std::move(obj));
    set_target_device_type(parse_device(target_device_type).type());
    py::gil_scoped_release nogil;
    recorder().set_executor(std::move(e));
  }, "Run flushes through a Python object with run/fetch/release/has/run_eager/bind methods\n(and run_digest(FlushDigest), if it digests flushes).");
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
  // The recorder's mutex is taken without the GIL (a flush on another thread may need it).
  m.def("_pending_nodes", [] {
    std::vector<std::shared_ptr<Node>> nodes;
    {
      py::gil_scoped_release nogil;
      nodes = recorder().pending();
    }
    return nodes_to_py(nodes);
  });
  m.def("_last_flushed_nodes", [] {
    std::vector<std::shared_ptr<Node>> nodes;
    {
      py::gil_scoped_release nogil;
      nodes = recorder().last_flushed();
    }
    return nodes_to_py(nodes);
  });
  m.def("_digest_nodes", [](bool pending, size_t prefix_nodes) -> py::object {
    // The digest of the pending program (or of the last flush) as the remote client gets it:
    // (fingerprint, prefix fingerprint, binding), or None. For tests.
    std::vector<std::shared_ptr<Node>> nodes;
    {
      py::gil_scoped_release no_gil;
      nodes = pending ? recorder().pending() : recorder().last_flushed();
    }
    auto d = digest_program(nodes, prefix_nodes, /*paths=*/true);
    if (!d.ok) return py::none();
    auto paths = paths_to_py(d);
    return py::make_tuple(fingerprint_bytes(d.fingerprint), fingerprint_bytes(d.prefix), d.binding,
                          fingerprint_bytes(d.structure), fingerprint_bytes(d.structure_prefix),
                          d.params, paths);
  }, py::arg("pending") = false, py::arg("prefix_nodes") = 4);

  m.def("_pending_constants", [] {
    std::unordered_map<StorageId, Constant> constants;
    {
      py::gil_scoped_release nogil;
      constants = recorder().pending_constants();
    }
    py::dict d;
    for (const auto& [id, c] : constants) d[py::int_(id)] = c.tensor;
    return d;
  });
  m.def("_set_context", [](int64_t id) { set_context(id); });
  m.def("_current_context", [] { return current_context(); });

  m.def("_stats", [] {
    RecorderStats s;
    size_t pending = 0;
    std::shared_ptr<Executor> e;
    {
      py::gil_scoped_release nogil;
      s = recorder().stats();
      pending = recorder().pending_count();
      e = recorder().executor();
    }
    py::dict d;
    d["nodes_recorded"] = s.nodes_recorded;
    d["nodes_executed"] = s.nodes_executed;
    d["nodes_dropped"] = s.nodes_dropped;
    d["flushes"] = s.flushes;
    d["constants_uploaded"] = s.constants_uploaded;
    d["pending_nodes"] = pending;
    d["shape_cache_hits"] = shape_cache().hits();
    d["shape_cache_misses"] = shape_cache().misses();
    d["shape_cache_size"] = shape_cache().size();
    d["live_storages"] = live_remote_storages();
    d["resident_storages"] = e ? e->resident_count() : 0;
    d["resident_bytes"] = e ? e->resident_bytes() : 0;
    return d;
  });
  m.def("_clear_shape_cache", [] { shape_cache().clear(); });
}
