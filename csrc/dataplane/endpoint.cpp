#include "dataplane/endpoint.h"

#include <rte_cycles.h>
#include <rte_ethdev.h>

#include <sched.h>

#include <algorithm>
#include <cstring>
#include <random>

#include "dataplane/endpoint_state.h"

namespace genie::dataplane {

namespace {

constexpr double kHelloEveryMs = 10.0;
constexpr double kLinkCheckEveryMs = 1.0;

}  // namespace

// -- IntervalSet ------------------------------------------------------------------------------

void IntervalSet::add(uint64_t start, uint64_t end) {
  if (start >= end) return;
  auto it = ranges_.upper_bound(start);
  if (it != ranges_.begin()) {
    auto prev = std::prev(it);
    if (prev->second >= start) {
      start = prev->first;
      end = std::max(end, prev->second);
      it = ranges_.erase(prev);
    }
  }
  while (it != ranges_.end() && it->first <= end) {
    end = std::max(end, it->second);
    it = ranges_.erase(it);
  }
  ranges_.emplace(start, end);
}

void IntervalSet::remove(uint64_t start, uint64_t end) {
  if (start >= end) return;
  auto it = ranges_.upper_bound(start);
  if (it != ranges_.begin()) --it;
  while (it != ranges_.end() && it->first < end) {
    uint64_t s = it->first, e = it->second;
    if (e <= start) {
      ++it;
      continue;
    }
    it = ranges_.erase(it);
    if (s < start) ranges_.emplace(s, start);
    if (e > end) {
      ranges_.emplace(end, e);
      break;
    }
  }
}

bool IntervalSet::contains(uint64_t start, uint64_t end) const {
  if (start >= end) return true;
  auto it = ranges_.upper_bound(start);
  if (it == ranges_.begin()) return false;
  --it;
  return it->first <= start && it->second >= end;
}

uint64_t IntervalSet::prefix() const {
  if (ranges_.empty() || ranges_.begin()->first != 0) return 0;
  return ranges_.begin()->second;
}

bool IntervalSet::front(uint64_t* start, uint64_t* end) const {
  if (ranges_.empty()) return false;
  *start = ranges_.begin()->first;
  *end = ranges_.begin()->second;
  return true;
}

void IntervalSet::holes(uint64_t limit, size_t max, std::vector<NackRange>* out) const {
  uint64_t at = 0;
  for (const auto& [s, e] : ranges_) {
    if (out->size() >= max || s >= limit) break;
    if (s > at) out->push_back({at, s});
    at = e;
  }
  if (at < limit && out->size() < max) out->push_back({at, limit});
}

// -- life cycle -------------------------------------------------------------------------------

Status Endpoint::create(const EndpointConfig& cfg, const PortConfig& pcfg,
                        std::unique_ptr<Endpoint>* out) {
  std::unique_ptr<Endpoint> ep(new Endpoint());
  ep->cfg_ = cfg;
  Status s = Port::open(pcfg, cfg.chunk_bytes, cfg.window_bytes, cfg.burst, &ep->port_);
  if (!s) return s;
  ep->chunk_ = ep->port_->chunk_bytes();
  ep->tsc_ms_ = static_cast<double>(rte_get_tsc_hz()) / 1000.0;
  std::random_device rd;
  ep->session_ = rd() | 1u;
  ep->rng_.seed(cfg.loss_seed);
  ep->yield_every_ = cfg.yield_after_polls;
  ep->last_heard_ = ep->now_ms();
  *out = std::move(ep);
  return Status::ok();
}

Endpoint::~Endpoint() {
  for (auto* q : {&ctrlq_, &dataq_}) {
    for (auto* m : *q) rte_pktmbuf_free(m);
    q->clear();
  }
  if (port_) port_->close();
}

double Endpoint::now_ms() const {
  return static_cast<double>(rte_get_tsc_cycles()) / tsc_ms_;
}

void Endpoint::fail(Code code, const std::string& message) {
  if (broken_.is_ok()) broken_ = Status(code, message);
}

Status Endpoint::check_health() {
  if (closed_) return {Code::Closed, "genie: this data-plane endpoint is closed"};
  return broken_;
}

bool Endpoint::operation_active() const {
  return (out_ && !out_->complete) || (in_ && !in_->complete);
}

bool Endpoint::idle() const {
  return !operation_active() && ctrlq_.empty() && dataq_.empty() && zombies_.empty();
}

Status Endpoint::connect(double timeout_ms) {
  if (timeout_ms < 0) timeout_ms = cfg_.connect_timeout_ms;
  double start = now_ms(), last_hello = -1e9;
  while (!(have_peer_ && hello_acked_)) {
    Status h = check_health();
    if (!h) return h;
    double now = now_ms();
    if (port_->link_up() && now - last_hello >= kHelloEveryMs) {
      send_hello(PacketType::Hello);
      last_hello = now;
    }
    if (!poll() && yield_every_) sched_yield();
    if (now - start > timeout_ms) {
      return {Code::PeerTimeout, std::string("genie: no data-plane peer on ") + port_->name() +
                                     " after " + std::to_string(static_cast<int>(timeout_ms)) +
                                     " ms (" +
                                     (port_->link_up() ? "link up, no hello" : "link down") + ")"};
    }
  }
  connected_ = true;
  last_heard_ = now_ms();
  return Status::ok();
}

Status Endpoint::close(CloseReason reason) {
  if (closed_) return Status::ok();
  if (connected_ && broken_.is_ok() && port_->link_up()) {
    double start = now_ms(), last = -1e9;
    while (!close_acked_ && !peer_closed_ && now_ms() - start < cfg_.close_timeout_ms) {
      if (now_ms() - last > cfg_.close_timeout_ms / 4) {
        send_simple(PacketType::Close, 0, static_cast<uint32_t>(reason), 0);
        last = now_ms();
      }
      poll();
      if (!port_->link_up()) break;
    }
  }
  closed_ = true;
  for (auto* q : {&ctrlq_, &dataq_}) {
    for (auto* m : *q) rte_pktmbuf_free(m);
    q->clear();
  }
  port_->close();
  return Status::ok();
}

// -- packets ----------------------------------------------------------------------------------

rte_mbuf* Endpoint::new_control(PacketType type, uint64_t msg, uint32_t payload_len) {
  rte_mbuf* m = rte_pktmbuf_alloc(port_->header_pool());
  if (!m) return nullptr;
  size_t len = kEtherHeader + sizeof(PacketHeader) + payload_len;
  char* p = rte_pktmbuf_append(m, static_cast<uint16_t>(len));
  if (!p) {
    rte_pktmbuf_free(m);
    return nullptr;
  }
  auto* eth = reinterpret_cast<rte_ether_hdr*>(p);
  if (have_peer_ && type != PacketType::Hello) {
    rte_ether_addr_copy(&peer_mac_, &eth->dst_addr);
  } else {
    std::memset(&eth->dst_addr, 0xff, sizeof(eth->dst_addr));
  }
  rte_ether_addr_copy(&port_->mac(), &eth->src_addr);
  eth->ether_type = rte_cpu_to_be_16(kEtherType);
  auto* h = reinterpret_cast<PacketHeader*>(p + kEtherHeader);
  std::memset(h, 0, sizeof(*h));
  h->magic = kMagic;
  h->version = kWireVersion;
  h->type = static_cast<uint8_t>(type);
  h->session = session_;
  h->msg_id = msg;
  h->length = payload_len;
  return m;
}

void Endpoint::queue_control(rte_mbuf* m, PacketHeader* h) {
  seal_header(h);
  ctrlq_.push_back(m);
}

void Endpoint::send_simple(PacketType type, uint64_t msg, uint32_t aux, uint32_t payload_len) {
  rte_mbuf* m = new_control(type, msg, payload_len);
  if (!m) return;  // the pool is dry: a retry (timer, peer's probe) will come
  auto* h = rte_pktmbuf_mtod_offset(m, PacketHeader*, kEtherHeader);
  h->aux = aux;
  if (payload_len) std::memset(h + 1, 0x5a, payload_len);
  queue_control(m, h);
}

void Endpoint::send_hello(PacketType type) {
  rte_mbuf* m = new_control(type, 0, sizeof(HelloBody));
  if (!m) return;
  auto* h = rte_pktmbuf_mtod_offset(m, PacketHeader*, kEtherHeader);
  h->aux = chunk_;
  auto* body = reinterpret_cast<HelloBody*>(h + 1);
  std::memcpy(body->mac, port_->mac().addr_bytes, 6);
  body->reserved = 0;
  body->chunk_bytes = chunk_;
  body->window_bytes = cfg_.window_bytes;
  queue_control(m, h);
}

void Endpoint::send_probe(uint64_t msg, uint64_t sent_upto) {
  rte_mbuf* m = new_control(PacketType::Probe, msg, 0);
  if (!m) return;
  auto* h = rte_pktmbuf_mtod_offset(m, PacketHeader*, kEtherHeader);
  h->offset = sent_upto;
  queue_control(m, h);
  ++stats_.probes_sent;
}

// STATUS for the active incoming message: acknowledgement, grant and the holes still open.
void Endpoint::handle(rte_mbuf* m, double now) {
  uint32_t need = kEtherHeader + sizeof(PacketHeader);
  if (m->pkt_len < need) {
    ++stats_.bad_packets;
    return;
  }
  rte_ether_hdr eth_copy;
  const auto* eth = rte_pktmbuf_read(m, 0, sizeof(eth_copy), &eth_copy);
  if (!eth || rte_be_to_cpu_16(static_cast<const rte_ether_hdr*>(eth)->ether_type) != kEtherType) {
    return;  // not ours (a NIC sees other traffic)
  }
  PacketHeader hcopy;
  const void* hp = rte_pktmbuf_read(m, kEtherHeader, sizeof(hcopy), &hcopy);
  if (hp != &hcopy) std::memcpy(&hcopy, hp, sizeof(hcopy));
  const PacketHeader& h = hcopy;
  if (!header_valid(&h)) {
    ++stats_.bad_packets;
    return;
  }
  auto type = static_cast<PacketType>(h.type);
  if (type == PacketType::Hello || type == PacketType::HelloAck) {
    if (have_peer_ && h.session != peer_session_) {
      fail(Code::PeerGone,
           "genie: the data-plane peer restarted (new session) during a connection");
      return;
    }
    HelloBody body;
    const void* bp = rte_pktmbuf_read(m, need, sizeof(body), &body);
    if (!bp) {
      ++stats_.bad_packets;
      return;
    }
    if (bp != &body) std::memcpy(&body, bp, sizeof(body));
    if (!have_peer_) {
      peer_session_ = h.session;
      std::memcpy(peer_mac_.addr_bytes, body.mac, 6);
      have_peer_ = true;
      if (body.chunk_bytes && body.chunk_bytes < chunk_) chunk_ = body.chunk_bytes;
    }
    if (type == PacketType::Hello)
      send_hello(PacketType::HelloAck);
    else
      hello_acked_ = true;
    last_heard_ = now;
    return;
  }
  if (!have_peer_ || h.session != peer_session_) {
    ++stats_.bad_packets;  // from a previous or foreign peer
    return;
  }
  last_heard_ = now;
  switch (type) {
    case PacketType::Data: on_data(h, m, now); break;
    case PacketType::Status: on_status(h, m, now); break;
    case PacketType::Probe: on_probe(h, now); break;
    case PacketType::Close:
      peer_closed_ = true;
      send_simple(PacketType::CloseAck, 0, 0, 0);
      fail(Code::PeerGone,
           h.aux == static_cast<uint32_t>(CloseReason::OwnerExited)
               ? "genie: the peer's process exited (its data-plane agent closed the connection)"
               : "genie: the data-plane peer closed the connection");
      break;
    case PacketType::CloseAck: close_acked_ = true; break;
    case PacketType::Ping: send_simple(PacketType::Pong, h.msg_id, h.aux, h.length); break;
    case PacketType::Pong:
      pong_token_ = h.aux;
      pong_len_ = h.length;
      break;
    default: ++stats_.bad_packets;
  }
}

// -- the engine -------------------------------------------------------------------------------

void Endpoint::timers(double now) {
  if (!connected_ || closed_) return;
  if (now - last_link_check_ >= kLinkCheckEveryMs) {
    last_link_check_ = now;
    if (!port_->link_up()) {
      fail(Code::PeerGone,
           "genie: the data-plane link to the peer went down (did the peer process exit?)");
      return;
    }
  }
  if (!operation_active()) return;
  if (now - last_heard_ > cfg_.peer_timeout_ms) {
    fail(Code::PeerTimeout, "genie: the data-plane peer has been silent for " +
                                std::to_string(static_cast<int>(now - last_heard_)) + " ms");
    return;
  }
  if (out_ && !out_->complete) {
    OutMsg& out = *out_;
    bool all_sent = out.resend.empty() && out.next >= std::min({out.granted, out.provided,
                                                                out.acked + cfg_.window_bytes});
    // Unacknowledged data may be lost: probe after an RTO. Waiting for a grant only means the
    // receiver's owner has not posted yet: the keepalive below is enough.
    if (all_sent && out.next > out.acked && now - out.last_progress >= cfg_.rto_ms &&
        now - out.last_probe >= cfg_.rto_ms) {
      send_probe(out.id, out.next);
      out.last_probe = now;
    }
  }
  if (in_ && !in_->complete) {
    InMsg& in = *in_;
    for (const auto& [start, when] : in.nacked) {
      if (now - when >= cfg_.rto_ms) {
        in.status_due = true;
        break;
      }
    }
    if (in.granted > in.done && now - in.last_status >= cfg_.keepalive_ms) in.status_due = true;
  }
  if (now - last_keepalive_ >= cfg_.keepalive_ms && now - last_heard_ >= cfg_.keepalive_ms) {
    send_probe(out_ && !out_->complete ? out_->id : 0, out_ && !out_->complete ? out_->next : 0);
    last_keepalive_ = now;
  }
}

bool Endpoint::poll() {
  if (closed_) return false;
  double now = now_ms();
  bool worked = false;
  // Drain RX first, even (especially) when TX is refused (Note: [Draining while blocked]).
  rte_mbuf* pkts[64];
  uint16_t want = std::min<uint16_t>(cfg_.burst, 64);
  uint16_t n = port_->rx(pkts, want);
  if (n) {
    worked = true;
    if (tx_blocked_) stats_.drained_while_tx_full += n;
    for (uint16_t i = 0; i < n; ++i) handle(pkts[i], now);
    rte_pktmbuf_free_bulk(pkts, n);
  }
  if (in_ && in_->status_due) send_status(*in_, false);
  timers(now);
  size_t queued = ctrlq_.size() + dataq_.size();
  if (dataq_.empty()) pump_sender(now);
  if (ctrlq_.size() + dataq_.size() != queued) worked = true;
  size_t before = ctrlq_.size() + dataq_.size();
  if (before) {
    flush_tx();
    if (ctrlq_.size() + dataq_.size() != before) worked = true;
  }
  // A zero-copy ring releases what it sent only inside a later tx_burst (Note: [memif zero
  // copy] in port.cpp): make one while caller memory is still referenced, so acknowledged
  // memory goes back without delay (not always: each call writes the ring's head, a cache
  // line the peer polls).
  if (port_->zero_copy() && before == 0 && out_) {
    for (const auto& p : out_->parts) {
      if (p->referenced()) {
        port_->tx_done_cleanup();
        break;
      }
    }
  }
  if (!zombies_.empty()) reap_parts();
  return worked;
}

void Endpoint::reap_parts() {
  port_->tx_done_cleanup();
  zombies_.erase(
      std::remove_if(zombies_.begin(), zombies_.end(),
                     [](const std::unique_ptr<SendPart>& p) { return !p->referenced(); }),
      zombies_.end());
}

// Note: [Polling on shared cores]
// Both peers busy-poll. On a machine with fewer free cores than pollers (two cores shared with
// torch, tests and a second peer) two pollers can land on one core, and then every exchange
// waits for a scheduler tick (~8 ms per round trip, FIELD-NOTES.md; measured here: p99 of a
// 64-byte ping 12 ms without yielding, 20 us with). A poller that found nothing
// `yield_after_polls` times in a row yields the core: free when no one else wants it, and the
// peer runs at once when it does.
Status Endpoint::wait_until(double timeout_ms, const char* what,
                            bool (Endpoint::*done)(uint64_t, uint64_t), uint64_t msg,
                            uint64_t upto) {
  double start = now_ms();
  uint32_t spins = 0;
  while (true) {
    if ((this->*done)(msg, upto)) return Status::ok();
    Status h = check_health();
    if (!h) return h;
    if (!poll()) {
      if ((++spins & 1023) == 0 && out_ && !out_->complete) port_->tx_done_cleanup();
      if (yield_every_ && spins % yield_every_ == 0) sched_yield();
    } else {
      spins = 0;
    }
    if (timeout_ms >= 0 && now_ms() - start > timeout_ms) {
      return {Code::Timeout, std::string("genie: timed out ") + what + " " + msg_name(msg) +
                                 " after " + std::to_string(static_cast<int>(timeout_ms)) + " ms"};
    }
  }
}

// -- helpers ----------------------------------------------------------------------------------

Status Endpoint::send(uint64_t msg, const void* data, uint64_t len, double timeout_ms) {
  Status s = send_begin(msg, len);
  if (!s) return s;
  s = send_provide(msg, 0, data, len);
  if (!s) return s;
  return send_wait(msg, len, timeout_ms);
}

Status Endpoint::recv(uint64_t msg, void* dst, uint64_t len, double timeout_ms) {
  Status s = recv_begin(msg, len);
  if (!s) return s;
  s = recv_post(msg, 0, dst, len);
  if (!s) return s;
  return recv_wait(msg, len, timeout_ms);
}

Status Endpoint::ping(uint32_t payload, double timeout_ms, double* rtt_us) {
  Status h = check_health();
  if (!h) return h;
  uint32_t token = ++ping_token_;
  uint64_t t0 = rte_get_tsc_cycles();
  send_simple(PacketType::Ping, 0, token, payload);
  flush_tx();
  double start = now_ms();
  uint32_t spins = 0;
  while (pong_token_ != token) {
    if (!poll() && yield_every_ && ++spins % yield_every_ == 0) sched_yield();
    h = check_health();
    if (!h) return h;
    if (now_ms() - start > timeout_ms) {
      return {Code::Timeout, "genie: no answer to a data-plane ping in " +
                                 std::to_string(static_cast<int>(timeout_ms)) + " ms"};
    }
  }
  *rtt_us = static_cast<double>(rte_get_tsc_cycles() - t0) / (tsc_ms_ / 1000.0);
  return Status::ok();
}

}  // namespace genie::dataplane
