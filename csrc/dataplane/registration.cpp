#include "dataplane/registration.h"

#include <chrono>

#include "dataplane/build_config.h"

namespace genie::dataplane {

Status NullBackend::register_region(Region* r) {
  ++registered;
  r->iova = r->addr;
  return Status::ok();
}

void NullBackend::unregister_region(const Region& r) {
  ++unregistered;
  log.emplace_back(r.addr, r.len);
}

std::unique_ptr<RegistrationBackend> make_backend(const std::string& name, Status* why) {
  if (name == "null") return std::make_unique<NullBackend>();
  if (name == "cuda-host" || name == "cuda") return make_cuda_host_backend(why);
  if (name == "dpdk" || name == "gpudev") {
    *why = {Code::Unavailable,
            "genie: the " + name +
                " registration backend needs DPDK's EAL, which lives in the data-plane agent "
                "process (genie-dpdk-agent), not in this one"};
    return nullptr;
  }
  *why = {Code::InvalidArgument, "genie: unknown registration backend '" + name +
                                     "' (known: null, cuda-host, dpdk, gpudev)"};
  return nullptr;
}

#if !GENIE_CUDA_ENABLED
std::string cuda_runtime_source() { return ""; }

std::unique_ptr<RegistrationBackend> make_cuda_host_backend(Status* why) {
  *why = {Code::Unavailable,
          "genie: the cuda-host registration backend is unavailable: genie was built without "
          "CUDA (the CUDA toolkit was not found at build time; rebuild with -DGENIE_WITH_CUDA=ON "
          "on a machine that has it)"};
  return nullptr;
}
#endif

RegistrationCache::RegistrationCache(std::unique_ptr<RegistrationBackend> backend, Options opts,
                                     Clock clock)
    : backend_(std::move(backend)), opts_(opts), clock_(std::move(clock)) {
  if (!clock_) {
    clock_ = [] {
      return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
          .count();
    };
  }
}

RegistrationCache::~RegistrationCache() {
  clear();
}

void RegistrationCache::drop(List::iterator it, uint64_t* counter) {
  index_.erase(Key{it->region.addr, it->region.len});
  if (counter) ++*counter;
  if (it->pins) {
    it->stale = true;
    stale_.splice(stale_.end(), lru_, it);
    return;
  }
  if (it->region.owned) backend_->unregister_region(it->region);
  stats_.registered_bytes -= it->region.len;
  lru_.erase(it);
}

void RegistrationCache::trim() {
  double t = now();
  // The back of the list is the least recently used, hence the oldest.
  while (!lru_.empty() && t - lru_.back().last_used > opts_.max_age_s && !lru_.back().pins) {
    drop(std::prev(lru_.end()), &stats_.expirations);
  }
  auto it = lru_.end();
  while (lru_.size() > opts_.capacity && it != lru_.begin()) {
    --it;
    if (it->pins) continue;
    auto victim = it++;
    drop(victim, &stats_.evictions);
  }
}

Status RegistrationCache::acquire(const void* addr, size_t len, Region* out, bool pin) {
  Key key{reinterpret_cast<uintptr_t>(addr), len};
  std::lock_guard<std::mutex> lock(mu_);
  double t = now();
  auto found = index_.find(key);
  if (found != index_.end()) {
    auto it = found->second;
    if (t - it->last_used <= opts_.max_age_s || it->pins) {
      ++stats_.hits;
      it->last_used = t;
      if (pin) ++it->pins;
      if (it != lru_.begin()) lru_.splice(lru_.begin(), lru_, it);
      *out = it->region;
      // One comparison in the common case: the least recently used entry is the oldest.
      if (t - lru_.back().last_used > opts_.max_age_s) trim();
      return Status::ok();
    }
    drop(it, &stats_.expirations);
  }
  ++stats_.misses;
  Entry e;
  e.region.addr = key.addr;
  e.region.len = len;
  e.last_used = t;
  Status s = backend_->register_region(&e.region);
  if (!s) {
    ++stats_.failures;
    return s;
  }
  if (pin) e.pins = 1;
  lru_.push_front(e);
  index_[key] = lru_.begin();
  stats_.registered_bytes += len;
  *out = e.region;
  trim();
  return Status::ok();
}

void RegistrationCache::unpin(const void* addr, size_t len) {
  Key key{reinterpret_cast<uintptr_t>(addr), len};
  std::lock_guard<std::mutex> lock(mu_);
  auto found = index_.find(key);
  if (found != index_.end()) {
    if (found->second->pins) --found->second->pins;
    trim();
    return;
  }
  for (auto it = stale_.begin(); it != stale_.end(); ++it) {
    if (it->region.addr == key.addr && it->region.len == len && it->pins) {
      if (--it->pins == 0) {
        if (it->region.owned) backend_->unregister_region(it->region);
        stats_.registered_bytes -= it->region.len;
        stale_.erase(it);
      }
      return;
    }
  }
}

size_t RegistrationCache::invalidate(const void* addr, size_t len) {
  uintptr_t a = reinterpret_cast<uintptr_t>(addr), b = a + len;
  std::lock_guard<std::mutex> lock(mu_);
  size_t n = 0;
  // At most `capacity` entries: a scan is cheaper than keeping an interval index, and storage
  // frees are rare next to lookups.
  for (auto it = lru_.begin(); it != lru_.end();) {
    auto next = std::next(it);
    uintptr_t s = it->region.addr, e = s + it->region.len;
    if (s < b && a < e) {
      drop(it, &stats_.invalidations);
      ++n;
    }
    it = next;
  }
  return n;
}

size_t RegistrationCache::expire() {
  std::lock_guard<std::mutex> lock(mu_);
  uint64_t before = stats_.expirations;
  double t = now();
  for (auto it = lru_.begin(); it != lru_.end();) {
    auto next = std::next(it);
    if (t - it->last_used > opts_.max_age_s && !it->pins) drop(it, &stats_.expirations);
    it = next;
  }
  return static_cast<size_t>(stats_.expirations - before);
}

void RegistrationCache::clear() {
  std::lock_guard<std::mutex> lock(mu_);
  for (auto& e : lru_) {
    if (e.region.owned) backend_->unregister_region(e.region);
  }
  for (auto& e : stale_) {
    if (e.region.owned) backend_->unregister_region(e.region);
  }
  lru_.clear();
  stale_.clear();
  index_.clear();
  stats_.registered_bytes = 0;
}

RegistrationCache::Stats RegistrationCache::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  Stats s = stats_;
  s.entries = lru_.size();
  s.pinned = stale_.size();
  for (const auto& e : lru_) s.pinned += e.pins ? 1 : 0;
  return s;
}

std::vector<std::pair<uintptr_t, size_t>> RegistrationCache::keys() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<std::pair<uintptr_t, size_t>> out;
  for (const auto& e : lru_) out.emplace_back(e.region.addr, e.region.len);
  return out;
}

bool RegistrationCache::contains(const void* addr, size_t len) const {
  std::lock_guard<std::mutex> lock(mu_);
  return index_.count(Key{reinterpret_cast<uintptr_t>(addr), len}) != 0;
}

size_t RegistrationCache::capacity() const {
  std::lock_guard<std::mutex> lock(mu_);
  return opts_.capacity;
}

double RegistrationCache::max_age() const {
  std::lock_guard<std::mutex> lock(mu_);
  return opts_.max_age_s;
}

void RegistrationCache::set_capacity(size_t capacity) {
  std::lock_guard<std::mutex> lock(mu_);
  opts_.capacity = capacity;
  trim();
}

void RegistrationCache::set_max_age(double seconds) {
  std::lock_guard<std::mutex> lock(mu_);
  opts_.max_age_s = seconds;
  trim();
}

}  // namespace genie::dataplane
