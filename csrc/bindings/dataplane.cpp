// genie._C's data-plane bindings: thin wrappers over csrc/dataplane. Every call that can block
// (the agent client's transfers, waits and close) releases the GIL; a failed Status becomes a
// genie exception here and nowhere else:
//   PeerTimeout, PeerGone, LinkDown, Closed, AgentDied, Timeout -> genie.errors.TransportError
//   BadPacket -> ProtocolError;  Unavailable, Unsupported -> UnsupportedOperationError
//   anything else -> GenieError
#include "bindings/dataplane.h"

#include "bindings/registration.h"
#include "bindings/status.h"

#include <dlfcn.h>
#include <unistd.h>

#include <ATen/ATen.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/StorageImpl.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/python.h>

#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

#include "dataplane/agent_client.h"
#include "dataplane/arena.h"
#include "dataplane/build_config.h"
#include "dataplane/registration.h"

namespace py = pybind11;
using namespace genie::dataplane;
using genie::bindings::check;
using genie::bindings::raise_status;

namespace {

double timeout_ms(const py::object& seconds) {
  return seconds.is_none() ? -1.0 : seconds.cast<double>() * 1000.0;
}

// -- where the agent is ----------------------------------------------------------------------

std::string module_dir() {
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(&module_dir), &info) == 0 || !info.dli_fname) return "";
  std::string path = info.dli_fname;
  auto slash = path.rfind('/');
  return slash == std::string::npos ? "." : path.substr(0, slash);
}

std::string agent_path() {
  const char* env = std::getenv("GENIE_DPDK_AGENT");
  if (env && *env) return env;
  return module_dir() + "/genie-dpdk-agent";
}

std::string unavailable_reason() {
#if GENIE_DPDK_ENABLED
  std::string path = agent_path();
  if (access(path.c_str(), X_OK) != 0) {
    return "the data-plane agent " + path +
           " is missing or not executable (reinstall genie: pip install --no-build-isolation .)";
  }
  return "";
#else
  return "genie was built without DPDK: " GENIE_DPDK_REASON;
#endif
}

// -- the in-process endpoint (Note: [In-process endpoint]) -------------------------------------

struct InProcessLib {
  int (*start)(int, int, uint64_t, const char* const*, int, char*, size_t) = nullptr;
  InvalidateFn invalidate = nullptr;
  std::string error;
};

const InProcessLib& in_process_lib() {
  static InProcessLib* lib = [] {
    auto* l = new InProcessLib;
#if GENIE_DPDK_ENABLED
    std::string path = module_dir() + "/libgenie_dpdk_inprocess.so";
    void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!h) {
      l->error = std::string("cannot load ") + path + ": " + dlerror();
      return l;
    }
    l->start = reinterpret_cast<decltype(l->start)>(dlsym(h, "genie_dataplane_start_in_process"));
    l->invalidate = reinterpret_cast<InvalidateFn>(dlsym(h, "genie_dataplane_invalidate"));
    if (!l->start || !l->invalidate) l->error = path + " lacks its entry points (reinstall genie)";
#else
    l->error = "genie was built without DPDK: " GENIE_DPDK_REASON;
#endif
    return l;
  }();
  return *lib;
}

// A torch storage made of an arena heap block (Note: [Arena heap]).
struct HeapBlock {
  std::shared_ptr<Arena> arena;
  void* p;
};

void release_heap_block(void* ctx) {
  auto* b = static_cast<HeapBlock*>(ctx);
  b->arena->release(b->p);
  delete b;
}

// -- buffers ----------------------------------------------------------------------------------

std::vector<py::buffer_info> request(const py::list& buffers, bool writable) {
  std::vector<py::buffer_info> out;
  for (auto item : buffers) {
    py::buffer b = py::reinterpret_borrow<py::buffer>(item);
    py::buffer_info info = b.request(writable);
    if (info.ndim > 1) {
      // Only contiguous memory travels; memoryview.cast("B") gives a flat view.
      bool contiguous = true;
      py::ssize_t expect = info.itemsize;
      for (py::ssize_t i = info.ndim - 1; i >= 0; --i) {
        if (info.shape[i] > 1 && info.strides[i] != expect) contiguous = false;
        expect *= info.shape[i];
      }
      if (!contiguous) throw py::value_error("genie: the data plane moves contiguous buffers only");
    } else if (info.ndim == 1 && info.shape[0] > 1 && info.strides[0] != info.itemsize) {
      throw py::value_error("genie: the data plane moves contiguous buffers only");
    }
    out.push_back(std::move(info));
  }
  return out;
}

size_t nbytes(const py::buffer_info& b) {
  return static_cast<size_t>(b.size * b.itemsize);
}

py::dict parse_stats(const std::string& text) {
  py::dict d;
  std::istringstream in(text);
  std::string kv;
  while (in >> kv) {
    auto eq = kv.find('=');
    if (eq == std::string::npos) continue;
    d[py::str(kv.substr(0, eq))] = std::stoull(kv.substr(eq + 1));
  }
  return d;
}

}  // namespace

void register_dataplane(py::module_& m) {
  m.def(
      "_dpdk_available", [] { return unavailable_reason().empty(); },
      "Whether the DPDK transport can be used: built with DPDK and its agent installed.");
  m.def("_dpdk_unavailable_reason", &unavailable_reason,
        "Why the DPDK transport cannot be used ('' when it can).");
  m.def("_dataplane_agent_path", &agent_path);
  m.def("_dataplane_build_info", [] {
    py::dict d;
    d["dpdk"] = GENIE_DPDK_ENABLED != 0;
    d["dpdk_version"] = std::string(GENIE_DPDK_VERSION);
    d["cuda"] = GENIE_CUDA_ENABLED != 0;
    d["dpdk_reason"] = std::string(GENIE_DPDK_REASON);
    d["cuda_runtime"] = cuda_runtime_source();  // Note: [One CUDA runtime]
    return d;
  });

  py::class_<AgentClient>(m, "_DataplaneAgentClient",
                          "The user's side of a genie-dpdk-agent (csrc/dataplane/agent_client.h).")
      .def(py::init([](int sock, int arena_fd, size_t arena_bytes, size_t slot_bytes,
                       size_t heap_bytes) {
             std::unique_ptr<AgentClient> c;
             {
               // An agent that makes the arena sends it once its EAL is up (~0.15 s).
               py::gil_scoped_release nogil;
               c = std::make_unique<AgentClient>(sock, arena_fd, arena_bytes, slot_bytes,
                                                 heap_bytes);
             }
             check(c->health());
             return c;
           }),
           py::arg("sock"), py::arg("arena_fd"), py::arg("arena_bytes"), py::arg("slot_bytes"),
           py::arg("heap_bytes") = 0,
           "`arena_bytes` of copy slots, then `heap_bytes` of heap (Note: [Arena heap]); "
           "`arena_fd` -1: the agent sends its own (Note: [Arena in EAL memory]).")
      .def(
          "alloc",
          [](AgentClient& c, size_t n) -> py::object {
            const auto& arena = c.shared_arena();
            void* p = (arena && n) ? arena->allocate(n) : nullptr;
            if (!p) return py::none();
            // The block goes back to the heap when the storage dies; the storage keeps the
            // mapping alive (it may outlive the connection). Resizable through torch's CPU
            // allocator: a resize moves the bytes to ordinary memory and frees the block.
            auto* holder = new HeapBlock{arena, p};
            c10::Storage storage(c10::Storage::use_byte_size_t(), n,
                                 at::DataPtr(p, holder, &release_heap_block, at::Device(at::kCPU)),
                                 c10::GetCPUAllocator(), /*resizable=*/true);
            at::Tensor t = at::empty({0}, at::TensorOptions().dtype(at::kByte).device(at::kCPU));
            t.set_(storage, 0, {static_cast<int64_t>(n)}, {1});
            return py::cast(t);
          },
          py::arg("nbytes"),
          "A uint8 CPU tensor of `nbytes` in the arena's heap, which the agent sends from and "
          "receives into in place; None when the heap has no room.")
      .def(
          "counters",
          [](const AgentClient& c) {
            py::dict d;
            const auto& k = c.counters();
            d["copied_out"] = k.copied_out.load();
            d["copied_in"] = k.copied_in.load();
            d["sent_in_place"] = k.sent_in_place.load();
            d["received_in_place"] = k.received_in_place.load();
            if (const auto& a = c.shared_arena()) {
              auto st = a->stats();
              d["heap_bytes"] = st.heap_bytes;
              d["heap_used"] = st.heap_used;
              d["heap_peak"] = st.heap_peak;
              d["heap_blocks"] = st.blocks;
              d["heap_allocations"] = st.allocations;
              d["heap_refused"] = st.refused;
            }
            return d;
          },
          "Bytes copied and moved in place by this client, and its heap's use.")
      .def_property_readonly("heap_address",
                             [](const AgentClient& c) -> uintptr_t {
                               const auto& a = c.shared_arena();
                               return a ? reinterpret_cast<uintptr_t>(a->heap()) : 0;
                             })
      .def_property_readonly("heap_bytes",
                             [](const AgentClient& c) -> size_t {
                               const auto& a = c.shared_arena();
                               return a ? a->heap_bytes() : 0;
                             })
      .def(
          "invalidate_on_unmap",
          [](AgentClient& c, std::shared_ptr<RegistrationCache> cache) {
            const auto& a = c.shared_arena();
            if (!a) return;
            std::weak_ptr<RegistrationCache> w = cache;
            uint8_t* heap = a->heap();
            size_t n = a->heap_bytes();
            a->on_unmap([w, heap, n] {
              if (auto k = w.lock()) k->invalidate(heap, n);
            });
          },
          py::arg("cache"),
          "Drop `cache`'s registrations of the heap before the arena is unmapped.")
      .def(
          "wait_for",
          [](AgentClient& c, const std::string& what, py::object timeout) {
            AgentEventType t = what == "ready" ? AgentEventType::Ready : AgentEventType::PortUp;
            uint64_t value = 0;
            Status s;
            {
              py::gil_scoped_release nogil;
              s = c.wait_for(t, timeout_ms(timeout), &value);
            }
            check(s);
            return value;
          },
          py::arg("what"), py::arg("timeout") = py::none())
      .def(
          "send",
          [](AgentClient& c, uint64_t msg, const py::list& buffers, py::object timeout) {
            auto infos = request(buffers, false);
            std::vector<ConstBuffer> bufs;
            for (auto& b : infos) bufs.push_back({b.ptr, nbytes(b)});
            Status s;
            {
              py::gil_scoped_release nogil;
              s = c.send(msg, bufs, timeout_ms(timeout));
            }
            check(s);
          },
          py::arg("msg"), py::arg("buffers"), py::arg("timeout") = py::none())
      .def(
          "recv",
          [](AgentClient& c, uint64_t msg, uint64_t total, uint64_t offset, const py::list& buffers,
             py::object timeout) {
            auto infos = request(buffers, true);
            std::vector<MutableBuffer> bufs;
            for (auto& b : infos) bufs.push_back({b.ptr, nbytes(b)});
            Status s;
            {
              py::gil_scoped_release nogil;
              s = c.recv(msg, total, offset, bufs, timeout_ms(timeout));
            }
            check(s);
          },
          py::arg("msg"), py::arg("total"), py::arg("offset"), py::arg("buffers"),
          py::arg("timeout") = py::none())
      .def(
          "skip",
          [](AgentClient& c, uint64_t msg, uint64_t total, uint64_t offset, uint64_t n,
             py::object timeout) {
            Status s;
            {
              py::gil_scoped_release nogil;
              s = c.recv(msg, total, offset, {MutableBuffer{nullptr, n}}, timeout_ms(timeout));
            }
            check(s);
          },
          py::arg("msg"), py::arg("total"), py::arg("offset"), py::arg("nbytes"),
          py::arg("timeout") = py::none())
      .def(
          "ping",
          [](AgentClient& c, uint32_t payload, py::object timeout) {
            double us = 0;
            Status s;
            {
              py::gil_scoped_release nogil;
              s = c.ping(payload, timeout_ms(timeout), &us);
            }
            check(s);
            return us;
          },
          py::arg("payload") = 64, py::arg("timeout") = 5.0,
          "One data-plane round trip between the two agents, in microseconds.")
      .def(
          "stats",
          [](AgentClient& c, py::object timeout) {
            std::string text;
            Status s;
            {
              py::gil_scoped_release nogil;
              s = c.stats(&text, timeout_ms(timeout));
            }
            check(s);
            return parse_stats(text);
          },
          py::arg("timeout") = 5.0)
      .def(
          "close",
          [](AgentClient& c, py::object timeout) {
            py::gil_scoped_release nogil;
            c.close(timeout_ms(timeout));
          },
          py::arg("timeout") = 2.0)
      .def_property_readonly("health",
                             [](const AgentClient& c) -> py::object {
                               if (c.health().is_ok()) return py::none();
                               return py::str(c.health().to_string());
                             })
      .def_property("in_process", &AgentClient::in_process, &AgentClient::set_in_process)
      .def_property_readonly("slots", &AgentClient::slots)
      .def_property_readonly("slot_bytes", &AgentClient::slot_bytes);

  m.def(
      "_dataplane_start_in_process",
      [](int sock, int arena_fd, uint64_t arena_bytes, const std::vector<std::string>& items) {
        const auto& lib = in_process_lib();
        if (!lib.start) {
          raise_status({Code::Unavailable, "genie: no in-process DPDK endpoint: " + lib.error});
        }
        std::vector<const char*> argv;
        for (const auto& s : items) argv.push_back(s.c_str());
        char err[512] = {0};
        if (lib.start(sock, arena_fd, arena_bytes, argv.data(), static_cast<int>(argv.size()), err,
                      sizeof(err)) != 0) {
          raise_status({Code::Internal, std::string("genie: in-process endpoint: ") + err});
        }
      },
      py::arg("sock"), py::arg("arena_fd"), py::arg("arena_bytes"), py::arg("items"),
      "Run the data-plane agent's loop on a thread of this process; it owns `sock` and "
      "`arena_fd` (Note: [In-process endpoint]).");
  m.def(
      "_dataplane_track_storage",
      [](const at::Tensor& t) {
        const auto& lib = in_process_lib();
        if (!lib.invalidate) return false;
        return install_free_hook(t.storage().unsafeGetStorageImpl(), nullptr, lib.invalidate);
      },
      py::arg("tensor"),
      "Freeing `tensor`'s storage drops its registrations in in-process endpoints' caches.");

  register_registration(m);
}
