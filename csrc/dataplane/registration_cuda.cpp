// The CUDA host-registration backend (built only with GENIE_WITH_CUDA): page-locks host memory
// with cudaHostRegister so that host-to-device copies from it run at pinned speed (55 GB/s vs
// 21 GB/s pageable on an H100, FIELD-NOTES.md) without a staging copy.
//
// Note: [One CUDA runtime]
// genie._C links the CUDA runtime statically (so that it imports without libcudart on its
// rpath), but torch brings its own libcudart, and two runtime instances in one process keep two
// sets of state (current device, sticky errors, their own view of contexts). The backend calls
// the runtime torch already loaded, found by soname with RTLD_NOLOAD, and the static one only
// when no other is loaded; `cuda_runtime_source()` says which. (Tensor.is_pinned() is no test
// of a registration: in torch 2.11 it knows only torch's own pinned allocator; the driver's
// pointer attributes do, see tests/test_dataplane.py.)
#include <cuda_runtime.h>
#include <dlfcn.h>

#include <string>

#include "dataplane/build_config.h"
#include "dataplane/registration.h"

namespace genie::dataplane {

namespace {

struct CudaApi {
  decltype(&cudaHostRegister) host_register = &cudaHostRegister;
  decltype(&cudaHostUnregister) host_unregister = &cudaHostUnregister;
  decltype(&cudaGetDeviceCount) device_count = &cudaGetDeviceCount;
  decltype(&cudaGetLastError) last_error = &cudaGetLastError;
  decltype(&cudaGetErrorName) error_name = &cudaGetErrorName;
  decltype(&cudaGetErrorString) error_string = &cudaGetErrorString;
  std::string source = "the CUDA runtime linked into genie._C";
};

template <typename F>
bool resolve(void* lib, const char* name, F* out) {
  void* f = dlsym(lib, name);
  if (!f) return false;
  *out = reinterpret_cast<F>(f);
  return true;
}

const CudaApi& api() {
  static const CudaApi a = [] {
    CudaApi x;
    for (const char* soname :
         {"libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0", "libcudart.so"}) {
      void* lib = dlopen(soname, RTLD_NOW | RTLD_NOLOAD);  // only one already loaded
      if (!lib) continue;
      CudaApi y;
      if (resolve(lib, "cudaHostRegister", &y.host_register) &&
          resolve(lib, "cudaHostUnregister", &y.host_unregister) &&
          resolve(lib, "cudaGetDeviceCount", &y.device_count) &&
          resolve(lib, "cudaGetLastError", &y.last_error) &&
          resolve(lib, "cudaGetErrorName", &y.error_name) &&
          resolve(lib, "cudaGetErrorString", &y.error_string)) {
        y.source = std::string(soname) + ", already loaded in this process";
        return y;
      }
    }
    return x;
  }();
  return a;
}

std::string cuda_error(const char* what, cudaError_t e) {
  return std::string("genie: ") + what + " failed: " + api().error_name(e) + " (" +
         api().error_string(e) + ")";
}

class CudaHostBackend : public RegistrationBackend {
 public:
  std::string name() const override { return "cuda-host"; }

  Status available() const override {
    int n = 0;
    cudaError_t e = api().device_count(&n);
    if (e != cudaSuccess) {
      api().last_error();
      return {Code::Unavailable, cuda_error("cudaGetDeviceCount", e)};
    }
    if (n == 0) return {Code::Unavailable, "genie: no CUDA device on this machine"};
    return Status::ok();
  }

  Status register_region(Region* r) override {
    // Portable: pinned for every context, not only the current one.
    cudaError_t e = api().host_register(reinterpret_cast<void*>(r->addr), r->len,
                                        cudaHostRegisterPortable);
    if (e == cudaErrorHostMemoryAlreadyRegistered) {
      // Pinned already (torch's pinned allocator, or a registration sharing its pages): usable
      // as is, and not ours to unregister.
      api().last_error();
      r->owned = false;
      return Status::ok();
    }
    if (e != cudaSuccess) {
      api().last_error();
      return {Code::RegistrationFailed, cuda_error("cudaHostRegister", e)};
    }
    r->owned = true;
    return Status::ok();
  }

  void unregister_region(const Region& r) override {
    if (!r.owned) return;
    if (api().host_unregister(reinterpret_cast<void*>(r.addr)) != cudaSuccess) api().last_error();
  }
};

}  // namespace

std::unique_ptr<RegistrationBackend> make_cuda_host_backend(Status* why) {
  auto b = std::make_unique<CudaHostBackend>();
  Status s = b->available();
  if (!s) {
    *why = s;
    return nullptr;
  }
  return b;
}

std::string cuda_runtime_source() { return api().source; }

}  // namespace genie::dataplane
