// The registration LRU (Note: [Registration cache]): hits, eviction order, age expiry,
// invalidation (what the bindings do when a storage is freed) and pinning, against a backend
// that only records calls and a clock the test moves.
#include <vector>

#include "check.h"
#include "dataplane/registration.h"

using namespace genie::dataplane;

namespace {

struct Fixture {
  double t = 1000.0;
  NullBackend* backend;
  RegistrationCache cache;
  std::vector<char> mem = std::vector<char>(1 << 16);

  explicit Fixture(size_t capacity = 3, double max_age = 10.0)
      : backend(new NullBackend),
        cache(std::unique_ptr<RegistrationBackend>(backend), {capacity, max_age},
              [this] { return t; }) {}
  const void* at(size_t i) const { return mem.data() + 1024 * i; }
  Status get(size_t i, size_t len = 512, bool pin = false) {
    Region r;
    return cache.acquire(at(i), len, &r, pin);
  }
  uintptr_t addr(size_t i) const { return reinterpret_cast<uintptr_t>(at(i)); }
};

void hits_and_misses() {
  Fixture f;
  CHECK(f.get(0).is_ok());
  CHECK(f.get(0).is_ok());
  CHECK(f.get(0).is_ok());
  auto s = f.cache.stats();
  CHECK_EQ(s.misses, 1u);
  CHECK_EQ(s.hits, 2u);
  CHECK_EQ(f.backend->registered, 1u);
  // Same address, another length: another key.
  CHECK(f.get(0, 256).is_ok());
  CHECK_EQ(f.cache.stats().misses, 2u);
  CHECK_EQ(f.cache.stats().registered_bytes, 512u + 256u);
}

void evicts_least_recently_used() {
  Fixture f(3);
  f.get(0);
  f.get(1);
  f.get(2);
  f.get(0);  // 1 is now the least recently used
  f.get(3);  // over capacity: 1 goes
  CHECK_EQ(f.cache.stats().evictions, 1u);
  CHECK(!f.cache.contains(f.at(1), 512));
  CHECK_EQ(f.backend->log.size(), 1u);
  CHECK_EQ(f.backend->log[0].first, f.addr(1));
  auto keys = f.cache.keys();  // most recent first
  CHECK_EQ(keys.size(), 3u);
  CHECK_EQ(keys[0].first, f.addr(3));
  CHECK_EQ(keys[1].first, f.addr(0));
  CHECK_EQ(keys[2].first, f.addr(2));
  f.get(4);  // then 2
  CHECK_EQ(f.backend->log[1].first, f.addr(2));
}

void expires_by_age() {
  Fixture f(10, 10.0);
  f.get(0);
  f.t += 5;
  f.get(1);
  f.t += 6;                 // entry 0 idle for 11 s, entry 1 for 6 s
  CHECK(f.get(1).is_ok());  // a hit; the access also sweeps the expired tail
  CHECK(!f.cache.contains(f.at(0), 512));
  CHECK_EQ(f.cache.stats().expirations, 1u);
  f.t += 11;
  CHECK(f.get(1).is_ok());  // expired: unregistered and registered again
  auto s = f.cache.stats();
  CHECK_EQ(s.expirations, 2u);
  CHECK_EQ(f.backend->registered, 3u);
  f.t += 20;
  CHECK_EQ(f.cache.expire(), 1u);
  CHECK_EQ(f.cache.stats().entries, 0u);
}

void invalidation_drops_overlapping_entries() {
  Fixture f(10);
  f.get(0, 512);
  f.get(1, 512);
  f.get(2, 512);
  // A freed storage spanning entries 1 and part of 2.
  CHECK_EQ(f.cache.invalidate(f.at(1), 1024 + 8), 2u);
  CHECK(f.cache.contains(f.at(0), 512));
  CHECK(!f.cache.contains(f.at(1), 512));
  CHECK(!f.cache.contains(f.at(2), 512));
  CHECK_EQ(f.cache.stats().invalidations, 2u);
  CHECK_EQ(f.backend->unregistered, 2u);
  // The address is reused by a new allocation: a fresh registration, not a stale hit.
  CHECK(f.get(1, 512).is_ok());
  CHECK_EQ(f.backend->registered, 4u);
}

void pinned_entries_survive_eviction_and_invalidation() {
  Fixture f(1, 10.0);
  CHECK(f.get(0, 512, /*pin=*/true).is_ok());
  f.get(1);  // over capacity, but 0 is pinned: 1 (unpinned) is the victim
  CHECK(f.cache.contains(f.at(0), 512));
  f.t += 100;
  f.cache.expire();
  CHECK(f.cache.contains(f.at(0), 512));  // too old, but pinned
  f.cache.invalidate(f.at(0), 512);
  CHECK(!f.cache.contains(f.at(0), 512));
  CHECK_EQ(f.backend->unregistered, 1u);  // only entry 1 so far
  f.cache.unpin(f.at(0), 512);            // the transfer ended: now it goes
  CHECK_EQ(f.backend->unregistered, 2u);
  CHECK_EQ(f.cache.stats().registered_bytes, 0u);
}

void capacity_and_age_are_configurable() {
  Fixture f(500, 300.0);
  CHECK_EQ(f.cache.capacity(), 500u);
  for (size_t i = 0; i < 8; ++i) f.get(i);
  f.cache.set_capacity(4);
  CHECK_EQ(f.cache.stats().entries, 4u);
  CHECK_EQ(f.cache.stats().evictions, 4u);
  f.cache.set_max_age(0.5);
  f.t += 1;
  CHECK_EQ(f.cache.expire(), 4u);
}

}  // namespace

int main() {
  RUN(hits_and_misses);
  RUN(evicts_least_recently_used);
  RUN(expires_by_age);
  RUN(invalidation_drops_overlapping_entries);
  RUN(pinned_entries_survive_eviction_and_invalidation);
  RUN(capacity_and_age_are_configurable);
  return genie::dataplane::testing::failures() ? 1 : 0;
}
