// genie._C's module: thin wrappers over csrc/capture. The rest of the pybind11 code is in
// convert.cpp (core types <-> Python), python_executor.cpp (Python objects behind the recorder)
// and dataplane.cpp.
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
#include "bindings/convert.h"
#include "bindings/dataplane.h"
#include "bindings/python_executor.h"
#include "bindings/socket_writer.h"
#include "bindings/version_check.h"

namespace py = pybind11;
using namespace genie;
using namespace genie::bindings;

PYBIND11_MODULE(_C, m) {
  m.doc() = "genie's compiled core: the remote_accelerator backend and its local executor";
  register_dataplane(m);
  register_socket_writer(m);
  register_version_check(m);

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
  register_python_executor(m);
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
