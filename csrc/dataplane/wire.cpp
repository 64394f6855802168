#include "dataplane/wire.h"

#include <cstring>

#include <rte_hash_crc.h>

namespace genie::dataplane {

namespace {

// CRC32C of the header with header_csum taken as zero, word by word: the header is copied into
// uint64_t words first (rte_hash_crc on a struct pointer type-puns, and the compiler may reorder
// the store that zeroes the field past the loads).
uint32_t header_crc(const PacketHeader* h) {
  static_assert(sizeof(PacketHeader) == 7 * sizeof(uint64_t), "header is seven words");
  uint64_t w[7];
  std::memcpy(w, h, sizeof(w));
  w[6] &= 0x00000000FFFFFFFFull;  // header_csum is the last four bytes (little-endian)
  uint32_t crc = 0xFFFFFFFFu;
  for (uint64_t x : w) crc = rte_hash_crc_8byte(x, crc);
  return crc;
}

}  // namespace

void seal_header(PacketHeader* h) {
  h->header_csum = header_crc(h);
}

bool header_valid(const PacketHeader* h) {
  if (h->magic != kMagic || h->version != kWireVersion) return false;
  return header_crc(h) == h->header_csum;
}

uint64_t payload_sum(const void* data, size_t len, uint64_t pos, uint64_t seed) {
  const auto* p = static_cast<const uint8_t*>(data);
  uint64_t s = seed;
  // Bytes until the stream position is word-aligned go into their lanes one by one.
  while (len && (pos & 3)) {
    s += static_cast<uint64_t>(*p++) << (8 * (pos & 3));
    ++pos;
    --len;
  }
  size_t words = len / 4;
  uint64_t a = 0, b = 0;
  size_t i = 0;
  for (; i + 1 < words; i += 2) {
    uint32_t w0, w1;
    std::memcpy(&w0, p + 4 * i, 4);
    std::memcpy(&w1, p + 4 * i + 4, 4);
    a += w0;
    b += w1;
  }
  if (i < words) {
    uint32_t w;
    std::memcpy(&w, p + 4 * i, 4);
    a += w;
  }
  s += a + b;
  p += 4 * words;
  len -= 4 * words;
  for (size_t k = 0; k < len; ++k) s += static_cast<uint64_t>(p[k]) << (8 * k);
  return s;
}

}  // namespace genie::dataplane
