#pragma once
// Note: [Data-plane wire format]
// Every packet is an Ethernet frame (ethertype 0x88B5, IEEE "local experimental") carrying one
// PacketHeader and, for DATA, a chunk of one message's bytes. A message is a byte stream of
// known length (`total`), cut into chunks of at most EndpointConfig::chunk_bytes; a chunk is
// named by (msg_id, offset, length), and `seq` numbers its transmissions within the message
// (retransmits get new numbers). On the sender each chunk is a header mbuf chained to mbufs
// attached to the tensor's own memory (external buffers): payload bytes are never copied into
// mbufs. The exchange is receiver-driven (Note: [Grants and acknowledgements] in endpoint.h):
//   HELLO / HELLO_ACK   session nonces, chunk size and MAC, exchanged once per connection
//   DATA     offset, length, total + payload
//   STATUS   receiver -> sender: offset = bytes received contiguously (the acknowledgement),
//            total = bytes granted (the receiver has somewhere to put them); payload = up to
//            kMaxNackRanges [start, end) byte ranges still missing below the highest received
//   PROBE    sender -> receiver: "send me a STATUS" (after an RTO, or as keepalive)
//   CLOSE / CLOSE_ACK   graceful close;  PING / PONG  round trips (benchmarks, liveness)
// The header carries a CRC32C of itself; DATA may carry a checksum of its payload.
#include <cstddef>
#include <cstdint>

namespace genie::dataplane {

constexpr uint16_t kEtherType = 0x88B5;
constexpr uint32_t kMagic = 0x31504447;  // "GDP1" little-endian
constexpr uint8_t kWireVersion = 1;
constexpr size_t kEtherHeader = 14;
constexpr size_t kMaxNackRanges = 64;

enum class PacketType : uint8_t {
  Hello = 1,
  HelloAck = 2,
  Data = 3,
  Status = 4,
  Probe = 5,
  Close = 6,
  CloseAck = 7,
  Ping = 8,
  Pong = 9,
};

enum PacketFlags : uint16_t {
  kFlagComplete = 1,     // STATUS: the whole message is in place
  kFlagRetransmit = 2,   // DATA: a retransmission
  kFlagChecksummed = 4,  // DATA: payload_csum is valid
};

struct __attribute__((packed)) PacketHeader {
  uint32_t magic;
  uint8_t version;
  uint8_t type;
  uint16_t flags;
  uint32_t session;  // the sender's session nonce
  uint32_t seq;
  uint64_t msg_id;
  uint64_t offset;
  uint64_t total;
  uint32_t length;  // payload bytes after this header
  uint32_t payload_csum;
  uint32_t aux;          // HELLO: chunk_bytes; STATUS: number of NACK ranges; PING: echo token
  uint32_t header_csum;  // CRC32C of the header with this field zero
};
static_assert(sizeof(PacketHeader) == 56, "wire header layout");

struct __attribute__((packed)) NackRange {
  uint64_t start;
  uint64_t end;
};

// HELLO payload.
struct __attribute__((packed)) HelloBody {
  uint8_t mac[6];
  uint16_t reserved;
  uint32_t chunk_bytes;
  uint64_t window_bytes;
};

void seal_header(PacketHeader* h);
bool header_valid(const PacketHeader* h);

// A fast additive checksum (vectorisable: little-endian 32-bit words summed into 64 bits,
// folded); it catches the corruption this data plane has seen (zeroed or misplaced buffers).
// A chunk arrives split into segments at arbitrary byte boundaries, so the sum is over the
// chunk's byte stream: `pos` is where `data` starts within the chunk and `seed` the sum so far.
uint64_t payload_sum(const void* data, size_t len, uint64_t pos = 0, uint64_t seed = 0);
inline uint32_t fold_sum(uint64_t s) {
  return static_cast<uint32_t>(s) ^ static_cast<uint32_t>(s >> 32);
}

}  // namespace genie::dataplane
