// The adapters that let Python objects stand behind the recorder's C++ interfaces: a
// Python executor (the remote client, the multi-device executor, the reference executor)
// and a speculation hook; and the FlushDigest a digesting client gets.

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
#include "bindings/python_executor.h"

namespace py = pybind11;
using namespace genie;
using namespace genie::bindings;

namespace {

// Note: [Python executors]
// Remote execution is written in Python (wire protocol, transports). It plugs in behind the
// same Executor interface as the local executor through this adapter, which converts the
// request to the dicts genie.graph.Node.from_core reads. The recorder calls it with its mutex
// held and the GIL released; the adapter takes the GIL for the call.

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

void register_python_executor(py::module_& m) {
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
}
