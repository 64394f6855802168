#pragma once
// Note: [Registration cache]
// Registering memory with a device is expensive (rte_extmem_register: 22 us for 1 MB, 2.25 ms
// for 256 MB; cudaHostRegister: 0.12 ms for 1 MB, 34 ms for 1 GB, FIELD-NOTES.md) and a tensor
// sent every decode step would pay it every step. The cache keeps registrations keyed by
// (address, length):
//   - a hit moves the entry to the front of an LRU list and costs a hash lookup;
//   - past `capacity` entries the least recently used one is unregistered (an eviction);
//   - an entry unused for `max_age_s` seconds is unregistered on the next access (an expiry),
//     so pinned memory is not held forever by tensors nobody sends any more;
//   - `invalidate(addr, len)` drops every entry overlapping the range; the bindings call it
//     when a registered tensor's storage is freed (csrc/bindings/dataplane.cpp swaps the
//     storage's deleter), so a later allocation at the same address never reuses a stale
//     registration;
//   - `acquire(..., pin=true)` pins an entry for the duration of a transfer: a pinned entry is
//     never evicted or expired, and an invalidated pinned entry is unregistered when unpinned.
// Backends do the registering: DPDK external memory + DMA mapping (registration_dpdk.h),
// CUDA host registration (registration_cuda.cpp, when built with CUDA), GPU memory through
// gpudev (when a gpudev driver exists), and `null` (registers nothing; for ports that need no
// registration, such as memif, and for tests). A backend that cannot work here says so from
// `available()`; nothing is faked.
#include <cstdint>
#include <functional>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "dataplane/status.h"

namespace genie::dataplane {

struct Region {
  uintptr_t addr = 0;
  size_t len = 0;
  uint64_t iova = ~0ull;  // DMA address of `addr`, when the backend gives one
  uintptr_t handle = 0;   // backend-private
  bool owned = true;      // false: somebody else registered it; never unregistered by us
};

class RegistrationBackend {
 public:
  virtual ~RegistrationBackend() = default;
  virtual std::string name() const = 0;
  // Ok when this backend can register memory here; otherwise Unavailable and the reason.
  virtual Status available() const = 0;
  virtual Status register_region(Region* r) = 0;
  virtual void unregister_region(const Region& r) = 0;
};

// Registers nothing, counts calls.
class NullBackend : public RegistrationBackend {
 public:
  std::string name() const override { return "null"; }
  Status available() const override { return Status::ok(); }
  Status register_region(Region* r) override;
  void unregister_region(const Region& r) override;
  uint64_t registered = 0;
  uint64_t unregistered = 0;
  std::vector<std::pair<uintptr_t, size_t>> log;  // unregistrations, in order
};

// "null" or "cuda-host" (when built with CUDA); DPDK backends are made in
// registration_dpdk.h because they need the EAL. Unknown or unavailable: nullptr and *why.
std::unique_ptr<RegistrationBackend> make_backend(const std::string& name, Status* why);
// The CUDA host-registration backend, or nullptr and *why (built without CUDA / no device).
std::unique_ptr<RegistrationBackend> make_cuda_host_backend(Status* why);
// Which CUDA runtime that backend calls (Note: [One CUDA runtime]); "" without CUDA.
std::string cuda_runtime_source();

class RegistrationCache {
 public:
  using Clock = std::function<double()>;  // seconds, monotonic

  struct Options {
    size_t capacity = 500;
    double max_age_s = 300.0;
  };

  struct Stats {
    uint64_t hits = 0;
    uint64_t misses = 0;
    uint64_t evictions = 0;
    uint64_t expirations = 0;
    uint64_t invalidations = 0;
    uint64_t failures = 0;
    uint64_t registered_bytes = 0;
    size_t entries = 0;
    size_t pinned = 0;
  };

  RegistrationCache(std::unique_ptr<RegistrationBackend> backend, Options opts, Clock clock = {});
  ~RegistrationCache();
  RegistrationCache(const RegistrationCache&) = delete;
  RegistrationCache& operator=(const RegistrationCache&) = delete;

  // The registration of exactly [addr, addr + len): a hit, or a new registration.
  Status acquire(const void* addr, size_t len, Region* out, bool pin = false);
  // Ends a pin taken by acquire(..., pin=true).
  void unpin(const void* addr, size_t len);
  // Drops every entry overlapping [addr, addr + len); returns how many.
  size_t invalidate(const void* addr, size_t len);
  // Drops entries idle longer than max_age; returns how many.
  size_t expire();
  void clear();

  Stats stats() const;
  // Keys, most recently used first (tests, diagnostics).
  std::vector<std::pair<uintptr_t, size_t>> keys() const;
  bool contains(const void* addr, size_t len) const;
  size_t capacity() const;
  double max_age() const;
  void set_capacity(size_t capacity);
  void set_max_age(double seconds);
  RegistrationBackend& backend() { return *backend_; }

 private:
  struct Key {
    uintptr_t addr;
    size_t len;
    bool operator==(const Key& o) const { return addr == o.addr && len == o.len; }
  };
  struct KeyHash {
    size_t operator()(const Key& k) const {
      uint64_t x = k.addr * 0x9E3779B97F4A7C15ull ^ (k.len + 0x632BE59BD9B4E019ull);
      return static_cast<size_t>(x ^ (x >> 29));
    }
  };
  struct Entry {
    Region region;
    double last_used = 0;
    uint32_t pins = 0;
    bool stale = false;  // invalidated while pinned
  };
  using List = std::list<Entry>;

  void drop(List::iterator it, uint64_t* counter);  // unregister + remove (mu_ held)
  void trim();                                      // capacity and age (mu_ held)
  double now() const { return clock_(); }

  std::unique_ptr<RegistrationBackend> backend_;
  Options opts_;
  Clock clock_;
  mutable std::mutex mu_;
  List lru_;  // front = most recently used
  std::unordered_map<Key, List::iterator, KeyHash> index_;
  std::list<Entry> stale_;  // invalidated while pinned
  Stats stats_;
};

}  // namespace genie::dataplane
