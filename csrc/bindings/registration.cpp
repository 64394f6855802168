// genie._C's registration-cache bindings (csrc/dataplane/registration.h) and the storage free
// hook that keeps a cache from outliving the memory it registered.
#include "bindings/registration.h"

#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/python.h>

#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "bindings/status.h"

namespace py = pybind11;
using namespace genie::dataplane;
using genie::bindings::check;
using genie::bindings::raise_status;

namespace {

// -- the storage free hook (Note: [Registration cache]) ---------------------------------------
// A registered tensor's storage gets its deleter swapped for one that first invalidates the
// storage's range in every cache that registered it, then calls the original deleter: freeing
// the storage drops the registration before the allocator can hand the address out again.

struct FreeHook {
  c10::DeleterFnPtr original = nullptr;
  uintptr_t base = 0;
  size_t nbytes = 0;
  std::vector<std::weak_ptr<RegistrationCache>> caches;
  InvalidateFn in_process = nullptr;  // in-process agents' caches (Note: [In-process endpoint])
};

std::mutex& hook_mutex() {
  static auto* m = new std::mutex;
  return *m;
}

std::unordered_map<void*, FreeHook>& hooks() {
  static auto* h = new std::unordered_map<void*, FreeHook>;  // never destroyed: frees at exit
  return *h;
}

void invalidating_delete(void* ctx) {
  FreeHook hook;
  {
    std::lock_guard<std::mutex> lock(hook_mutex());
    auto it = hooks().find(ctx);
    if (it == hooks().end()) return;  // unreachable: installed only with a record
    hook = std::move(it->second);
    hooks().erase(it);
  }
  for (auto& w : hook.caches) {
    if (auto c = w.lock()) c->invalidate(reinterpret_cast<void*>(hook.base), hook.nbytes);
  }
  if (hook.in_process) hook.in_process(reinterpret_cast<void*>(hook.base), hook.nbytes);
  hook.original(ctx);
}

py::dict region_dict(const Region& r) {
  py::dict d;
  d["address"] = r.addr;
  d["nbytes"] = r.len;
  d["iova"] = r.iova == ~0ull ? py::none() : py::cast(r.iova);
  d["owned"] = r.owned;
  return d;
}

std::shared_ptr<RegistrationCache> make_cache(const std::string& backend, size_t capacity,
                                              double max_age) {
  Status why;
  auto b = make_backend(backend, &why);
  if (!b) raise_status(why);
  return std::make_shared<RegistrationCache>(std::move(b),
                                             RegistrationCache::Options{capacity, max_age});
}

}  // namespace

// True when the storage now invalidates `cache` (or, with `in_process`, the in-process
// agents' caches) on free.
bool install_free_hook(c10::StorageImpl* impl, const std::shared_ptr<RegistrationCache>& cache,
                       InvalidateFn in_process) {
  at::DataPtr& dp = impl->mutable_data_ptr();
  void* ctx = dp.get_context();
  c10::DeleterFnPtr deleter = dp.get_deleter();
  if (!ctx || !deleter) return false;  // memory torch will never free (from_blob without deleter)
  std::lock_guard<std::mutex> lock(hook_mutex());
  if (deleter != &invalidating_delete) {
    if (!dp.compare_exchange_deleter(deleter, &invalidating_delete)) return false;
    FreeHook& h = hooks()[ctx];
    h.original = deleter;
    h.base = reinterpret_cast<uintptr_t>(dp.get());
    h.nbytes = impl->nbytes();
  }
  FreeHook& h = hooks()[ctx];
  if (cache) h.caches.push_back(cache);
  if (in_process) h.in_process = in_process;
  return true;
}


void register_registration(py::module_& m) {
  py::class_<RegistrationCache, std::shared_ptr<RegistrationCache>>(
      m, "RegistrationCache",
      "Memory registrations keyed by (address, length) with an LRU capacity and an age limit "
      "(csrc/dataplane/registration.h). Backends: 'null', 'cuda-host' (built with CUDA); the "
      "DPDK backends live in the data-plane agent.")
      .def(py::init(&make_cache), py::arg("backend") = "null", py::arg("capacity") = 500,
           py::arg("max_age") = 300.0)
      .def(
          "acquire",
          [](RegistrationCache& c, uintptr_t addr, size_t n, bool pin) {
            Region r;
            Status s;
            {
              py::gil_scoped_release nogil;  // a miss may take milliseconds (cudaHostRegister)
              s = c.acquire(reinterpret_cast<void*>(addr), n, &r, pin);
            }
            check(s);
            return region_dict(r);
          },
          py::arg("address"), py::arg("nbytes"), py::arg("pin") = false)
      .def(
          "register_tensor",
          [](std::shared_ptr<RegistrationCache> c, const at::Tensor& t, bool pin) {
            c10::StorageImpl* impl = t.storage().unsafeGetStorageImpl();
            void* base = impl->mutable_data_ptr().get();
            size_t n = impl->nbytes();
            Region r;
            Status s;
            {
              py::gil_scoped_release nogil;
              s = c->acquire(base, n, &r, pin);
            }
            check(s);
            py::dict d = region_dict(r);
            d["invalidated_on_free"] = install_free_hook(impl, c);
            return d;
          },
          py::arg("tensor"), py::arg("pin") = false,
          "Register the tensor's whole storage; freeing the storage drops the entry.")
      .def("unpin", [](RegistrationCache& c, uintptr_t addr,
                       size_t n) { c.unpin(reinterpret_cast<void*>(addr), n); })
      .def("invalidate", [](RegistrationCache& c, uintptr_t addr,
                            size_t n) { return c.invalidate(reinterpret_cast<void*>(addr), n); })
      .def("expire", &RegistrationCache::expire)
      .def("clear", &RegistrationCache::clear)
      .def("contains", [](const RegistrationCache& c, uintptr_t addr,
                          size_t n) { return c.contains(reinterpret_cast<void*>(addr), n); })
      .def("keys", &RegistrationCache::keys, "(address, nbytes), most recently used first")
      .def("stats",
           [](const RegistrationCache& c) {
             auto s = c.stats();
             py::dict d;
             d["hits"] = s.hits;
             d["misses"] = s.misses;
             d["evictions"] = s.evictions;
             d["expirations"] = s.expirations;
             d["invalidations"] = s.invalidations;
             d["failures"] = s.failures;
             d["registered_bytes"] = s.registered_bytes;
             d["entries"] = s.entries;
             d["pinned"] = s.pinned;
             return d;
           })
      .def_property("capacity", &RegistrationCache::capacity, &RegistrationCache::set_capacity)
      .def_property("max_age", &RegistrationCache::max_age, &RegistrationCache::set_max_age)
      .def_property_readonly("backend", [](RegistrationCache& c) { return c.backend().name(); });

  m.def(
      "_registration_backends",
      [] {
        py::dict d;
        for (const char* name : {"null", "cuda-host", "dpdk", "gpudev"}) {
          Status why;
          auto b = make_backend(name, &why);
          d[name] = b ? py::object(py::str("")) : py::object(py::str(why.to_string()));
        }
        return d;
      },
      "Registration backends and why each is unavailable here ('' when it is available).");
}
