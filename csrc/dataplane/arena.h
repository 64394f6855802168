#pragma once
// Note: [Arena heap]
// The arena is the memfd that the user's process and its data-plane agent both map (Note:
// [Data-plane agent] in agent_protocol.h). It has two parts:
//   [ send slots | receive slots ][ heap ........................................ ]
//   <------- copy_bytes -------->  <----------------- heap_bytes ----------------->
// The slots are the pipelined copy path for memory the agent cannot see. The heap hands out
// blocks that become torch storages (csrc/bindings/dataplane.cpp): a payload received into a
// heap block is written there by the agent and never copied again; a heap block sent is read
// by the agent in place. A block lives as long as its storage: the storage's deleter returns it,
// and the mapping itself lives until the last storage and the agent client are gone, so a
// tensor outlives the connection that delivered it.
//
// Heap pages stay resident after a block is freed (a cache, like torch's caching allocators:
// punching them out would make the next 1 GB payload fault 262144 pages back in), so a
// connection holds at most `heap_bytes` of memory it touched; the memfd goes with the last
// mapping. The heap is virtual until touched, so a large heap costs nothing unused.
//
// Allocation is first fit over free ranges kept by offset, coalesced on free; blocks are
// page-aligned (the agent's extmem registration and DMA work in pages).
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include "dataplane/status.h"

namespace genie::dataplane {

class Arena {
 public:
  struct Stats {
    uint64_t heap_bytes = 0;
    uint64_t heap_used = 0;   // bytes in live blocks
    uint64_t heap_peak = 0;   // the most bytes ever in live blocks at once
    uint64_t blocks = 0;      // live blocks
    uint64_t allocations = 0;
    uint64_t refused = 0;     // allocations that did not fit
  };

  // Maps `copy_bytes + heap_bytes` of `fd` from `offset` (MAP_SHARED). On failure, health()
  // says why.
  Arena(int fd, size_t copy_bytes, size_t heap_bytes, uint64_t offset = 0);
  ~Arena();
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;

  const Status& health() const { return health_; }
  uint8_t* base() const { return base_; }
  size_t bytes() const { return copy_bytes_ + heap_bytes_; }
  size_t copy_bytes() const { return copy_bytes_; }
  size_t heap_bytes() const { return heap_bytes_; }
  uint8_t* heap() const { return base_ + copy_bytes_; }

  // A heap block of at least `n` bytes (n > 0), or nullptr when none is free.
  void* allocate(size_t n);
  // Returns a block from allocate().
  void release(void* p);
  // Whether [p, p + n) lies inside one live heap block; *offset gets p's arena offset.
  bool in_heap(const void* p, size_t n, uint64_t* offset) const;
  Stats stats() const;

  // Run before the mapping goes (a registration of the heap must end before munmap).
  void on_unmap(std::function<void()> fn);

 private:
  uint8_t* base_ = nullptr;
  size_t copy_bytes_ = 0;
  size_t heap_bytes_ = 0;
  Status health_;
  mutable std::mutex mu_;
  std::map<uint64_t, uint64_t> free_;   // heap offset -> length
  std::map<uint64_t, uint64_t> live_;   // heap offset -> length
  Stats stats_;
  std::vector<std::function<void()>> on_unmap_;
};

}  // namespace genie::dataplane
