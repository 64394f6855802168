#include "capture/storage.h"

#include "capture/device.h"

#include <c10/core/Device.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <mutex>

namespace genie {
namespace {

// See Note: [Storage identity]. 0xBAD0... is non-canonical on x86-64 and AArch64.
constexpr uintptr_t kBase = 0xBAD0000000000000ULL;
constexpr uintptr_t kStride = 64;  // keeps addresses 64-byte aligned for alignment checks

std::atomic<StorageId> g_next_id{1};
std::atomic<int64_t> g_live{0};
std::mutex g_released_mutex;
std::vector<StorageId>& released() {
  static auto* v = new std::vector<StorageId>();  // leaked: deleters may run at exit
  return *v;
}

void* encode(StorageId id) { return reinterpret_cast<void*>(kBase + static_cast<uintptr_t>(id) * kStride); }

void delete_remote(void* ctx) {
  auto id = static_cast<StorageId>((reinterpret_cast<uintptr_t>(ctx) - kBase) / kStride);
  g_live.fetch_sub(1, std::memory_order_relaxed);
  std::lock_guard<std::mutex> lock(g_released_mutex);
  released().push_back(id);
}

struct RemoteAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t nbytes) override {
    StorageId id = new_storage_id();
    g_live.fetch_add(1, std::memory_order_relaxed);
    void* p = encode(id);
    return {p, p, &delete_remote, c10::Device(c10::DeviceType::PrivateUse1, current_device_index())};
  }
  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    TORCH_CHECK(false, "genie: remote_accelerator storage holds no bytes on this host; "
                       "copy through .cpu() or .to()");
  }
};

RemoteAllocator g_allocator;

}  // namespace

c10::Allocator* remote_allocator() { return &g_allocator; }

StorageId new_storage_id() { return g_next_id.fetch_add(1, std::memory_order_relaxed); }

bool is_remote_storage(const c10::Storage& storage) {
  return storage.data_ptr().get_deleter() == &delete_remote;
}

StorageId storage_id(const c10::Storage& storage) {
  TORCH_INTERNAL_ASSERT(is_remote_storage(storage), "genie: not a remote_accelerator storage");
  auto p = reinterpret_cast<uintptr_t>(storage.data_ptr().get_context());
  return static_cast<StorageId>((p - kBase) / kStride);
}

std::vector<StorageId> take_released() {
  std::lock_guard<std::mutex> lock(g_released_mutex);
  std::vector<StorageId> out;
  out.swap(released());
  return out;
}

int64_t live_remote_storages() { return g_live.load(std::memory_order_relaxed); }

}  // namespace genie

// errors.h lives with the storage helpers: both are tiny and used everywhere in the core.
#include "capture/errors.h"

namespace genie {
namespace {
ErrorHook& error_hook() {
  static auto* h = new ErrorHook();
  return *h;
}
}  // namespace

void set_error_hook(ErrorHook hook) { error_hook() = std::move(hook); }

void raise_error(ErrorKind kind, const std::string& message) {
  if (error_hook()) error_hook()(kind, message);  // throws
  TORCH_CHECK(false, message);
}

}  // namespace genie
