#include "dataplane/arena.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <iterator>
#include <string>

namespace genie::dataplane {

namespace {

size_t page_size() {
  static const size_t p = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return p;
}

}  // namespace

Arena::Arena(int fd, size_t copy_bytes, size_t heap_bytes, uint64_t offset)
    : copy_bytes_(copy_bytes), heap_bytes_(heap_bytes) {
  const size_t page = page_size();
  if (copy_bytes % page != 0 || heap_bytes % page != 0) {
    health_ = {Code::InvalidArgument,
               "genie: the data-plane arena's parts must be whole pages (" +
                   std::to_string(page) + " bytes)"};
    return;
  }
  void* p = mmap(nullptr, bytes(), PROT_READ | PROT_WRITE, MAP_SHARED, fd,
                 static_cast<off_t>(offset));
  if (p == MAP_FAILED) {
    health_ = {Code::NoMemory,
               std::string("genie: cannot map the data-plane arena: ") + std::strerror(errno)};
    return;
  }
  base_ = static_cast<uint8_t*>(p);
  if (heap_bytes_) free_[0] = heap_bytes_;
  stats_.heap_bytes = heap_bytes_;
}

Arena::~Arena() {
  for (auto& fn : on_unmap_) fn();
  if (base_) munmap(base_, bytes());
}

void Arena::on_unmap(std::function<void()> fn) {
  std::lock_guard<std::mutex> lock(mu_);
  on_unmap_.push_back(std::move(fn));
}

void* Arena::allocate(size_t n) {
  if (n == 0 || !base_) return nullptr;
  const size_t page = page_size();
  uint64_t len = (n + page - 1) / page * page;
  std::lock_guard<std::mutex> lock(mu_);
  for (auto it = free_.begin(); it != free_.end(); ++it) {
    if (it->second < len) continue;
    uint64_t off = it->first;
    uint64_t rest = it->second - len;
    free_.erase(it);
    if (rest) free_[off + len] = rest;
    live_[off] = len;
    stats_.heap_used += len;
    stats_.heap_peak = std::max(stats_.heap_peak, stats_.heap_used);
    ++stats_.blocks;
    ++stats_.allocations;
    return heap() + off;
  }
  ++stats_.refused;
  return nullptr;
}

void Arena::release(void* p) {
  std::lock_guard<std::mutex> lock(mu_);
  uint64_t off = static_cast<uint64_t>(static_cast<uint8_t*>(p) - heap());
  auto it = live_.find(off);
  if (it == live_.end()) return;  // not ours: unreachable through the bindings
  uint64_t len = it->second;
  live_.erase(it);
  stats_.heap_used -= len;
  --stats_.blocks;
  // Coalesce with the free neighbours on both sides.
  auto next = free_.lower_bound(off);
  if (next != free_.end() && next->first == off + len) {
    len += next->second;
    next = free_.erase(next);
  }
  if (next != free_.begin()) {
    auto prev = std::prev(next);
    if (prev->first + prev->second == off) {
      prev->second += len;
      return;
    }
  }
  free_[off] = len;
}

bool Arena::in_heap(const void* p, size_t n, uint64_t* offset) const {
  const auto* b = static_cast<const uint8_t*>(p);
  if (!base_ || b < heap() || n > heap_bytes_ || b + n > heap() + heap_bytes_) return false;
  uint64_t off = static_cast<uint64_t>(b - heap());
  std::lock_guard<std::mutex> lock(mu_);
  auto it = live_.upper_bound(off);
  if (it == live_.begin()) return false;
  --it;
  if (off + n > it->first + it->second) return false;
  *offset = copy_bytes_ + off;
  return true;
}

Arena::Stats Arena::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

}  // namespace genie::dataplane
