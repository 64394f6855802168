#include "capture/device.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/detail/CUDAHooksInterface.h>
#include <ATen/detail/PrivateUse1HooksInterface.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <deque>
#include <mutex>

namespace genie {
namespace {

std::atomic<c10::DeviceIndex> g_device_count{1};
thread_local c10::DeviceIndex t_current_device = 0;

struct RemoteGeneratorImpl : at::CPUGeneratorImpl {
  explicit RemoteGeneratorImpl(c10::DeviceIndex index) {
    device_ = c10::Device(c10::DeviceType::PrivateUse1, index);
    key_set_ = c10::DispatchKeySet(c10::DispatchKey::PrivateUse1);
  }
};

struct RemoteGuardImpl final : c10::impl::DeviceGuardImplInterface {
  static constexpr c10::DeviceType kType = c10::DeviceType::PrivateUse1;
  c10::DeviceType type() const override { return kType; }
  c10::Device exchangeDevice(c10::Device d) const override {
    auto old = getDevice();
    setDevice(d);
    return old;
  }
  c10::Device getDevice() const override { return {kType, t_current_device}; }
  void setDevice(c10::Device d) const override {
    TORCH_CHECK(d.type() == kType, "genie: expected a remote_accelerator device, got ", d);
    if (d.index() >= 0) {
      check_device_index(d.index());
      t_current_device = d.index();
    }
  }
  void uncheckedSetDevice(c10::Device d) const noexcept override {
    if (d.index() >= 0) t_current_device = d.index();
  }
  c10::Stream getStream(c10::Device d) const override {
    return c10::Stream(c10::Stream::DEFAULT, d);
  }
  c10::Stream exchangeStream(c10::Stream s) const override {
    return c10::Stream(c10::Stream::DEFAULT, s.device());
  }
  c10::DeviceIndex deviceCount() const noexcept override { return g_device_count.load(); }
  // Work is recorded, not launched: there is nothing to wait for at this level.
  void record(void**, const c10::Stream&, const c10::DeviceIndex, const c10::EventFlag) const override {}
  void block(void*, const c10::Stream&) const override {}
  bool queryEvent(void*) const override { return true; }
  void destroyEvent(void*, const c10::DeviceIndex) const noexcept override {}
  bool queryStream(const c10::Stream&) const override { return true; }
  void synchronizeStream(const c10::Stream&) const override {}
};

struct RemoteHooks final : at::PrivateUse1HooksInterface {
  bool isBuilt() const override { return true; }
  bool isAvailable() const override { return true; }
  bool hasPrimaryContext(c10::DeviceIndex) const override { return true; }
  const at::Generator& getDefaultGenerator(c10::DeviceIndex index) const override {
    return default_generator(index);
  }
  at::Generator getNewGenerator(c10::DeviceIndex index) const override {
    return at::make_generator<RemoteGeneratorImpl>(index < 0 ? t_current_device : index);
  }
  // Note: [Pinned memory with a PrivateUse1 backend]
  // Once PrivateUse1 is registered PyTorch treats it as *the* accelerator, so Tensor.is_pinned()
  // and pin_memory() ask these hooks. Pinned host memory matters to the local GPU (the CUDA
  // executor, genie serve, the data plane's cudaHostRegister): answer for CUDA where it exists,
  // else host memory is plain memory.
  at::Allocator* getPinnedMemoryAllocator() const override {
    const auto& cuda = at::detail::getCUDAHooks();
    return cuda.hasCUDA() ? cuda.getPinnedMemoryAllocator() : c10::GetCPUAllocator();
  }
  bool isPinnedPtr(const void* data) const override {
    const auto& cuda = at::detail::getCUDAHooks();
    return cuda.hasCUDA() && cuda.isPinnedPtr(data);
  }
  at::Device getDeviceFromPtr(void*) const override { return {c10::DeviceType::PrivateUse1, t_current_device}; }
  void resizePrivateUse1Bytes(const c10::Storage& storage, size_t newsize) const override {
    // No bytes live here; a resize only changes the size that replay will allocate.
    storage.unsafeGetStorageImpl()->set_nbytes(newsize);
  }
};

C10_REGISTER_GUARD_IMPL(PrivateUse1, RemoteGuardImpl);

std::mutex g_gen_mutex;
std::deque<at::Generator>& generators() {
  static auto* g = new std::deque<at::Generator>();
  return *g;
}

}  // namespace

void set_device_count(c10::DeviceIndex n) {
  TORCH_CHECK(n >= 1, "genie: remote_accelerator device count must be >= 1, got ", n);
  g_device_count = n;
}
c10::DeviceIndex device_count() { return g_device_count.load(); }
c10::DeviceIndex current_device_index() { return t_current_device; }
void set_current_device_index(c10::DeviceIndex index) {
  check_device_index(index);
  t_current_device = index;
}

void check_device_index(c10::DeviceIndex index) {
  TORCH_CHECK_INDEX(index >= 0 && index < g_device_count.load(), "genie: remote_accelerator:", static_cast<int>(index),
                    " is not configured; ", static_cast<int>(g_device_count.load()),
                    " device(s) exist (set GENIE_DEVICE_COUNT or genie.configure(device_count=...))");
}

const at::Generator& default_generator(c10::DeviceIndex index) {
  if (index < 0) index = t_current_device;
  check_device_index(index);
  std::lock_guard<std::mutex> lock(g_gen_mutex);
  auto& gens = generators();
  while (static_cast<c10::DeviceIndex>(gens.size()) <= index) {
    gens.push_back(at::make_generator<RemoteGeneratorImpl>(static_cast<c10::DeviceIndex>(gens.size())));
    // The same default seed as CPU's default generator, so unseeded programs agree too.
    gens.back().set_current_seed(c10::detail::getNonDeterministicRandom());
  }
  return gens[index];  // deque: references stay valid as it grows
}

void register_device() {
  static bool done = [] {
    at::RegisterPrivateUse1HooksInterface(new RemoteHooks());
    return true;
  }();
  (void)done;
}

}  // namespace genie
