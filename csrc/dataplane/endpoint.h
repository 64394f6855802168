#pragma once
// The data-plane endpoint: one port, one peer, messages in both directions.
//
// Note: [Grants and acknowledgements]
// A message is a byte stream of known length with a caller-chosen id (ids increase by one per
// message in each direction). The receiver drives it:
//   - recv_begin(msg, total), then recv_post(msg, offset, dst, len) for consecutive ranges:
//     each post extends the *grant* (bytes the receiver has a place for) and sends a STATUS;
//   - the sender provides consecutive ranges of source memory (send_provide) and transmits a
//     chunk only inside min(grant, provided, acked + window): data never arrives before the
//     receiver has a place for it, so it is reassembled straight into the destination and no
//     mbuf is held waiting for a buffer;
//   - the receiver acknowledges the contiguous prefix it holds (STATUS.offset) at least every
//     ack_every_bytes, at the end of each grant and at the end of the message (the per-message
//     acknowledgement, flag kFlagComplete);
//   - a chunk that lands past a hole makes the receiver NACK the hole at once (memif and a
//     single NIC queue deliver in order, so a hole is a loss); a sender that has sent all it
//     may and hears nothing for rto_ms PROBEs, and the receiver answers with its STATUS and
//     every hole still open: retransmission is selective, by byte range;
//   - while an operation waits on the peer, keepalives go out every keepalive_ms and a peer
//     silent for peer_timeout_ms, a link that goes down, or a CLOSE make every later call
//     fail with PeerTimeout / PeerGone (never a hang).
// A STATUS for message m+1 implies m is complete (the receiver takes messages in order), so a
// lost final acknowledgement costs nothing.
//
// Note: [Draining while blocked]
// One poll() does both directions: it flushes queued control packets and data chunks, and
// whatever the TX ring refuses stays queued while the same iteration receives. A sender facing
// a full ring therefore keeps draining its RX queue, and two endpoints sending to each other
// cannot deadlock (FIELD-NOTES.md).
//
// Threading: an Endpoint is used by one thread at a time (the data-plane agent's loop, or a
// caller holding its own lock). Payload memory given to send_provide/recv_post must stay valid
// until send_wait/recv_wait report those bytes done.
#include <rte_mbuf.h>

#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <random>
#include <vector>

#include "dataplane/config.h"
#include "dataplane/port.h"
#include "dataplane/wire.h"

namespace genie::dataplane {

constexpr uint64_t kNoIova = ~0ull;

struct EndpointStats {
  uint64_t messages_sent = 0;
  uint64_t messages_received = 0;
  uint64_t bytes_sent = 0;      // payload bytes acknowledged by the peer
  uint64_t bytes_received = 0;  // payload bytes placed in destinations
  uint64_t bytes_staged = 0;    // payload copied into mbufs (Note: [memif zero copy], port.cpp)
  uint64_t chunks_sent = 0;     // data packets handed to the port (first transmissions)
  uint64_t chunks_received = 0;
  uint64_t chunks_retransmitted = 0;
  uint64_t chunks_dropped = 0;  // injected losses (EndpointConfig::loss_rate)
  uint64_t duplicates = 0;
  uint64_t checksum_errors = 0;
  uint64_t bad_packets = 0;
  uint64_t nacks_sent = 0;
  uint64_t nack_ranges_received = 0;
  uint64_t probes_sent = 0;
  uint64_t status_sent = 0;
  uint64_t tx_full = 0;                // polls in which the TX ring refused packets
  uint64_t drained_while_tx_full = 0;  // packets received while the TX ring was full
};

// Disjoint, merged [start, end) byte ranges.
class IntervalSet {
 public:
  void add(uint64_t start, uint64_t end);
  void remove(uint64_t start, uint64_t end);
  bool contains(uint64_t start, uint64_t end) const;
  // End of the range that starts at 0 (0 if none).
  uint64_t prefix() const;
  bool empty() const { return ranges_.empty(); }
  size_t size() const { return ranges_.size(); }
  void clear() { ranges_.clear(); }
  // The first range, or false.
  bool front(uint64_t* start, uint64_t* end) const;
  // Gaps in [0, limit) not covered, at most `max` of them.
  void holes(uint64_t limit, size_t max, std::vector<NackRange>* out) const;

 private:
  std::map<uint64_t, uint64_t> ranges_;
};

class Endpoint {
 public:
  // EAL must be up (Eal::ensure). Opens the port and sizes its pools for `cfg`.
  static Status create(const EndpointConfig& cfg, const PortConfig& port,
                       std::unique_ptr<Endpoint>* out);
  ~Endpoint();
  Endpoint(const Endpoint&) = delete;
  Endpoint& operator=(const Endpoint&) = delete;

  // Waits for link up and the peer's hello (timeout < 0: connect_timeout_ms).
  Status connect(double timeout_ms = -1);
  bool connected() const { return connected_; }

  // -- sending ------------------------------------------------------------------------------
  Status send_begin(uint64_t msg, uint64_t total);
  // Source bytes [offset, offset + len) of `msg`; consecutive calls, in order. `iova` is the
  // DMA address of `data` (kNoIova: looked up, and required only by ports that DMA).
  Status send_provide(uint64_t msg, uint64_t offset, const void* data, uint64_t len,
                      uint64_t iova = kNoIova);
  // Bytes of `msg` the peer has acknowledged and whose memory the port no longer references.
  uint64_t send_released(uint64_t msg);
  Status send_wait(uint64_t msg, uint64_t upto, double timeout_ms);

  // -- receiving ----------------------------------------------------------------------------
  Status recv_begin(uint64_t msg, uint64_t total);
  Status recv_post(uint64_t msg, uint64_t offset, void* dst, uint64_t len);
  uint64_t recv_done(uint64_t msg) const;
  Status recv_wait(uint64_t msg, uint64_t upto, double timeout_ms);

  // -- one-shot helpers (used by benchmarks and tests) ---------------------------------------
  Status send(uint64_t msg, const void* data, uint64_t len, double timeout_ms);
  Status recv(uint64_t msg, void* dst, uint64_t len, double timeout_ms);
  // One PING of `payload` bytes and its PONG; the round trip in microseconds.
  Status ping(uint32_t payload, double timeout_ms, double* rtt_us);

  // One iteration of the engine; true when it moved a packet.
  bool poll();
  // Ok, or the error that broke this endpoint (sticky).
  const Status& health() const { return broken_; }
  // No message in flight either way and nothing queued.
  bool idle() const;
  // Graceful close: tells the peer why, waits briefly for its acknowledgement, stops the port.
  enum class CloseReason : uint32_t { Closed = 0, OwnerExited = 1 };
  Status close(CloseReason reason = CloseReason::Closed);

  const EndpointStats& stats() const { return stats_; }
  const EndpointConfig& config() const { return cfg_; }
  uint32_t chunk_bytes() const { return chunk_; }
  Port& port() { return *port_; }
  const Port& port() const { return *port_; }

 private:
  struct SendPart;
  struct OutMsg;
  struct InMsg;
  struct Dest {
    uint64_t offset;
    uint64_t len;
    uint8_t* data;
  };

  Endpoint() = default;
  double now_ms() const;
  void fail(Code code, const std::string& message);
  Status check_health();

  // packet construction
  rte_mbuf* new_control(PacketType type, uint64_t msg, uint32_t payload_len);
  void queue_control(rte_mbuf* m, PacketHeader* h);
  void send_hello(PacketType type);
  void send_status(InMsg& in, bool complete_only_for_old, uint64_t old_msg = 0);
  void send_probe(uint64_t msg, uint64_t sent_upto);
  void send_simple(PacketType type, uint64_t msg, uint32_t aux, uint32_t payload_len);
  bool build_chunk(OutMsg& out, uint64_t offset, uint64_t len, bool retransmit, rte_mbuf** pkt);

  // engine
  void flush_tx();
  bool inject_loss();  // EndpointConfig::loss_rate / drop_chunks
  void pump_sender(double now);
  void timers(double now);
  void handle(rte_mbuf* m, double now);
  void on_data(const PacketHeader& h, rte_mbuf* m, double now);
  void on_status(const PacketHeader& h, rte_mbuf* m, double now);
  void on_probe(const PacketHeader& h, double now);
  void reap_parts();
  bool operation_active() const;
  Status wait_until(double timeout_ms, const char* what, bool (Endpoint::*done)(uint64_t, uint64_t),
                    uint64_t msg, uint64_t upto);
  bool send_done(uint64_t msg, uint64_t upto);
  bool recv_done_at(uint64_t msg, uint64_t upto);

  EndpointConfig cfg_;
  std::unique_ptr<Port> port_;
  uint32_t chunk_ = 0;
  uint32_t session_ = 0;
  uint32_t peer_session_ = 0;
  rte_ether_addr peer_mac_{};
  bool have_peer_ = false;
  bool hello_acked_ = false;
  bool connected_ = false;
  bool closed_ = false;
  Status broken_;
  double tsc_ms_ = 1.0;        // TSC cycles per millisecond
  uint32_t yield_every_ = 64;  // Note: [Polling on shared cores] in endpoint.cpp

  std::unique_ptr<OutMsg> out_;
  std::unique_ptr<InMsg> in_;
  uint64_t last_out_done_ = 0;  // highest message id fully acknowledged
  uint64_t last_in_done_ = 0;   // highest message id fully received
  bool any_out_done_ = false;
  bool any_in_done_ = false;
  std::map<uint64_t, uint64_t> early_grants_;       // msg -> granted, before send_begin
  std::vector<std::unique_ptr<SendPart>> zombies_;  // parts the port still references

  std::deque<rte_mbuf*> ctrlq_;
  std::deque<rte_mbuf*> dataq_;
  bool tx_blocked_ = false;

  double last_heard_ = 0;
  double last_keepalive_ = 0;
  double last_link_check_ = 0;
  uint32_t ping_token_ = 0;
  uint32_t pong_token_ = 0;
  uint32_t pong_len_ = 0;
  bool close_acked_ = false;
  bool peer_closed_ = false;
  std::mt19937_64 rng_;
  uint64_t data_transmissions_ = 0;
  EndpointStats stats_;
};

}  // namespace genie::dataplane
