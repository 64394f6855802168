#include "dataplane/endpoint.h"

#include <rte_cycles.h>
#include <rte_ethdev.h>
#include <rte_memcpy.h>
#include <rte_memory.h>

#include <sched.h>

#include <algorithm>
#include <cstring>
#include <random>

namespace genie::dataplane {

namespace {

constexpr double kHelloEveryMs = 10.0;
constexpr double kLinkCheckEveryMs = 1.0;
constexpr size_t kMaxSegmentsPerChunk = 8;

void no_free(void*, void*) {}

std::string msg_name(uint64_t msg) { return "message " + std::to_string(msg); }

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

// -- state ------------------------------------------------------------------------------------

struct Endpoint::SendPart {
  uint64_t offset = 0;
  uint64_t len = 0;
  const uint8_t* data = nullptr;
  uint64_t iova = 0;
  // One reference is ours; each mbuf attached to this memory adds one (Note: [External
  // buffers] below).
  rte_mbuf_ext_shared_info shinfo{};
  bool referenced() const { return rte_mbuf_ext_refcnt_read(&shinfo) > 1; }
};

struct Endpoint::OutMsg {
  uint64_t id = 0;
  uint64_t total = 0;
  uint64_t provided = 0;
  uint64_t granted = 0;
  uint64_t next = 0;   // first byte never sent
  uint64_t acked = 0;  // contiguous prefix the receiver holds
  std::deque<std::unique_ptr<SendPart>> parts;
  IntervalSet resend;
  uint32_t seq = 0;
  double last_progress = 0;
  double last_probe = 0;
  bool complete = false;
};

struct Endpoint::InMsg {
  uint64_t id = 0;
  uint64_t total = 0;
  std::vector<Dest> dests;
  uint64_t granted = 0;
  uint64_t done = 0;
  uint64_t highest = 0;
  uint64_t acked_sent = 0;
  uint64_t granted_sent = 0;
  IntervalSet received;
  std::map<uint64_t, double> nacked;  // hole start -> when it was reported
  bool status_due = false;
  bool probed = false;  // the next STATUS answers a PROBE: report every hole
  double last_status = 0;
  bool complete = false;
};

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

double Endpoint::now_ms() const { return static_cast<double>(rte_get_tsc_cycles()) / tsc_ms_; }

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
      return {Code::PeerTimeout,
              std::string("genie: no data-plane peer on ") + port_->name() + " after " +
                  std::to_string(static_cast<int>(timeout_ms)) + " ms (" +
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
void Endpoint::send_status(InMsg& in, bool old, uint64_t old_msg) {
  if (old) {
    // A message finished earlier: tell the sender it is complete.
    rte_mbuf* m = new_control(PacketType::Status, old_msg, 0);
    if (!m) return;
    auto* h = rte_pktmbuf_mtod_offset(m, PacketHeader*, kEtherHeader);
    h->flags = kFlagComplete;
    h->offset = ~0ull;
    h->total = ~0ull;
    queue_control(m, h);
    ++stats_.status_sent;
    return;
  }
  std::vector<NackRange> holes;
  double now = now_ms();
  std::map<uint64_t, double> nacked;  // only holes still open are remembered
  if (in.highest > in.done) {
    std::vector<NackRange> all;
    in.received.holes(in.highest, kMaxNackRanges, &all);
    // A hole reported less than an RTO ago is already being resent, unless the sender asked.
    for (const auto& r : all) {
      auto it = in.nacked.find(r.start);
      if (in.probed || it == in.nacked.end() || now - it->second >= cfg_.rto_ms) {
        holes.push_back(r);
        nacked[r.start] = now;
      } else {
        nacked[r.start] = it->second;
      }
    }
  }
  in.nacked.swap(nacked);
  in.probed = false;
  rte_mbuf* m = new_control(PacketType::Status, in.id,
                            static_cast<uint32_t>(holes.size() * sizeof(NackRange)));
  if (!m) return;
  auto* h = rte_pktmbuf_mtod_offset(m, PacketHeader*, kEtherHeader);
  h->offset = in.done;
  h->total = in.granted;
  h->aux = static_cast<uint32_t>(holes.size());
  if (in.complete) h->flags = kFlagComplete;
  if (!holes.empty()) {
    std::memcpy(h + 1, holes.data(), holes.size() * sizeof(NackRange));
    ++stats_.nacks_sent;
  }
  queue_control(m, h);
  in.acked_sent = in.done;
  in.granted_sent = in.granted;
  in.status_due = false;
  in.last_status = now;
  ++stats_.status_sent;
}

// Note: [External buffers]
// A data chunk is a header mbuf chained to mbufs attached (rte_pktmbuf_attach_extbuf) to the
// caller's memory. Every attached mbuf adds a reference to its part's shared info, and the port
// drops it when it has sent the packet (memif: inside tx_burst, after copying to the ring; a
// NIC: when its DMA completes). The part's memory is released to the caller only when it is
// acknowledged and unreferenced.
bool Endpoint::build_chunk(OutMsg& out, uint64_t offset, uint64_t len, bool retransmit,
                           rte_mbuf** pkt) {
  rte_mbuf* m = new_control(PacketType::Data, out.id, 0);
  if (!m) return false;
  auto* h = rte_pktmbuf_mtod_offset(m, PacketHeader*, kEtherHeader);
  h->offset = offset;
  h->total = out.total;
  h->seq = out.seq++;
  if (retransmit) h->flags |= kFlagRetransmit;

  // Find the part holding `offset`.
  auto it = std::upper_bound(out.parts.begin(), out.parts.end(), offset,
                             [](uint64_t off, const std::unique_ptr<SendPart>& p) { return off < p->offset; });
  if (it == out.parts.begin()) {
    rte_pktmbuf_free(m);
    return false;
  }
  --it;
  uint64_t at = offset, end = offset + len;
  uint64_t sum = 0;
  rte_mbuf* last = m;
  size_t segs = 0;
  while (at < end && it != out.parts.end() && segs < kMaxSegmentsPerChunk) {
    SendPart& part = **it;
    uint64_t in_part = at - part.offset;
    uint64_t n = std::min(end - at, part.len - in_part);
    rte_mbuf* e = rte_pktmbuf_alloc(port_->ext_pool());
    if (!e) break;
    const uint8_t* src = part.data + in_part;
    rte_pktmbuf_attach_extbuf(e, const_cast<uint8_t*>(src), part.iova + in_part,
                              static_cast<uint16_t>(n), &part.shinfo);
    rte_mbuf_ext_refcnt_update(&part.shinfo, 1);
    e->data_len = static_cast<uint16_t>(n);
    e->pkt_len = static_cast<uint32_t>(n);
    if (cfg_.payload_checksum) sum = payload_sum(src, n, at - offset, sum);
    last->next = e;
    last = e;
    m->nb_segs++;
    m->pkt_len += static_cast<uint32_t>(n);
    at += n;
    ++segs;
    ++it;
  }
  if (at == offset) {  // no carrier mbuf: the pool is dry
    rte_pktmbuf_free(m);
    return false;
  }
  h->length = static_cast<uint32_t>(at - offset);
  if (cfg_.payload_checksum) {
    h->payload_csum = fold_sum(sum);
    h->flags |= kFlagChecksummed;
  }
  seal_header(h);
  *pkt = m;
  return true;
}

// -- sending ----------------------------------------------------------------------------------

Status Endpoint::send_begin(uint64_t msg, uint64_t total) {
  Status hs = check_health();
  if (!hs) return hs;
  if (out_ && !out_->complete) {
    return {Code::InvalidArgument, "genie: " + msg_name(msg) + " started before " +
                                       msg_name(out_->id) + " was acknowledged"};
  }
  if (any_out_done_ && msg <= last_out_done_) {
    return {Code::InvalidArgument, "genie: message ids must increase (" + std::to_string(msg) +
                                       " after " + std::to_string(last_out_done_) + ")"};
  }
  if (out_) {
    for (auto& p : out_->parts) {
      if (p->referenced()) zombies_.push_back(std::move(p));
    }
  }
  out_ = std::make_unique<OutMsg>();
  out_->id = msg;
  out_->total = total;
  out_->last_progress = now_ms();
  auto g = early_grants_.find(msg);
  if (g != early_grants_.end()) out_->granted = std::min(g->second, total);
  early_grants_.erase(early_grants_.begin(), early_grants_.upper_bound(msg));
  last_heard_ = std::max(last_heard_, now_ms());
  if (total == 0) {
    out_->complete = true;
    last_out_done_ = msg;
    any_out_done_ = true;
    ++stats_.messages_sent;
  }
  return Status::ok();
}

Status Endpoint::send_provide(uint64_t msg, uint64_t offset, const void* data, uint64_t len,
                              uint64_t iova) {
  if (!out_ || out_->id != msg) {
    return {Code::InvalidArgument, "genie: send_provide for " + msg_name(msg) + ", which is not being sent"};
  }
  OutMsg& out = *out_;
  if (offset != out.provided || offset + len > out.total) {
    return {Code::InvalidArgument, "genie: " + msg_name(msg) + ": source bytes must come in order within its " +
                                       std::to_string(out.total) + " bytes"};
  }
  if (len == 0) return Status::ok();
  if (iova == kNoIova) {
    if (port_->needs_iova()) {
      rte_iova_t found = rte_mem_virt2iova(data);
      if (found == RTE_BAD_IOVA) {
        return {Code::RegistrationFailed,
                "genie: port " + port_->name() +
                    " does DMA and this memory is not registered with DPDK (use the "
                    "registration cache before sending)"};
      }
      iova = found;
    } else {
      iova = reinterpret_cast<uintptr_t>(data);  // memif copies with the CPU: unused
    }
  }
  auto part = std::make_unique<SendPart>();
  part->offset = offset;
  part->len = len;
  part->data = static_cast<const uint8_t*>(data);
  part->iova = iova;
  part->shinfo.free_cb = no_free;
  part->shinfo.fcb_opaque = nullptr;
  rte_mbuf_ext_refcnt_set(&part->shinfo, 1);
  out.parts.push_back(std::move(part));
  out.provided += len;
  return Status::ok();
}

uint64_t Endpoint::send_released(uint64_t msg) {
  if (!out_ || out_->id != msg) {
    return (any_out_done_ && msg <= last_out_done_) ? ~0ull : 0;
  }
  uint64_t upto = out_->complete ? out_->total : out_->acked;
  for (const auto& p : out_->parts) {
    if (p->offset >= upto) break;
    if (p->referenced()) return p->offset;
  }
  return upto;
}

bool Endpoint::send_done(uint64_t msg, uint64_t upto) { return send_released(msg) >= upto; }

Status Endpoint::send_wait(uint64_t msg, uint64_t upto, double timeout_ms) {
  return wait_until(timeout_ms, "sending", &Endpoint::send_done, msg, upto);
}

void Endpoint::pump_sender(double now) {
  if (!out_ || out_->complete || !connected_) return;
  OutMsg& out = *out_;
  uint32_t chunk = chunk_;
  uint16_t budget = cfg_.burst;
  while (budget && !out.resend.empty()) {
    uint64_t s, e;
    out.resend.front(&s, &e);
    if (e <= out.acked) {
      out.resend.remove(s, e);
      continue;
    }
    s = std::max(s, out.acked);
    uint64_t n = std::min<uint64_t>({chunk, e - s, out.provided > s ? out.provided - s : 0});
    if (n == 0) break;
    rte_mbuf* pkt;
    if (!build_chunk(out, s, n, true, &pkt)) break;
    uint64_t sent = rte_pktmbuf_mtod_offset(pkt, PacketHeader*, kEtherHeader)->length;
    out.resend.remove(s, s + sent);
    ++stats_.chunks_retransmitted;
    --budget;
    if (cfg_.loss_rate > 0 && std::uniform_real_distribution<double>(0, 1)(rng_) < cfg_.loss_rate) {
      rte_pktmbuf_free(pkt);
      ++stats_.chunks_dropped;
      continue;
    }
    dataq_.push_back(pkt);
  }
  uint64_t limit = std::min({out.granted, out.provided, out.acked + cfg_.window_bytes});
  while (budget && out.next < limit) {
    uint64_t n = std::min<uint64_t>(chunk, limit - out.next);
    rte_mbuf* pkt;
    if (!build_chunk(out, out.next, n, false, &pkt)) break;
    out.next += rte_pktmbuf_mtod_offset(pkt, PacketHeader*, kEtherHeader)->length;
    ++stats_.chunks_sent;
    --budget;
    if (cfg_.loss_rate > 0 && std::uniform_real_distribution<double>(0, 1)(rng_) < cfg_.loss_rate) {
      rte_pktmbuf_free(pkt);
      ++stats_.chunks_dropped;
      continue;
    }
    dataq_.push_back(pkt);
  }
}

void Endpoint::flush_tx() {
  tx_blocked_ = false;
  rte_mbuf* pkts[64];
  for (auto* q : {&ctrlq_, &dataq_}) {
    while (!q->empty()) {
      uint16_t n = static_cast<uint16_t>(std::min<size_t>(q->size(), 64));
      for (uint16_t i = 0; i < n; ++i) pkts[i] = (*q)[i];
      uint16_t sent = port_->tx(pkts, n);
      q->erase(q->begin(), q->begin() + sent);
      if (sent < n) {
        tx_blocked_ = true;
        ++stats_.tx_full;
        return;
      }
    }
  }
}

// -- receiving --------------------------------------------------------------------------------

Status Endpoint::recv_begin(uint64_t msg, uint64_t total) {
  Status hs = check_health();
  if (!hs) return hs;
  if (in_ && !in_->complete) {
    return {Code::InvalidArgument, "genie: " + msg_name(msg) + " posted before " +
                                       msg_name(in_->id) + " was received"};
  }
  if (any_in_done_ && msg <= last_in_done_) {
    return {Code::InvalidArgument, "genie: message ids must increase (" + std::to_string(msg) +
                                       " after " + std::to_string(last_in_done_) + ")"};
  }
  in_ = std::make_unique<InMsg>();
  in_->id = msg;
  in_->total = total;
  last_heard_ = std::max(last_heard_, now_ms());
  if (total == 0) {
    in_->complete = true;
    last_in_done_ = msg;
    any_in_done_ = true;
    ++stats_.messages_received;
  }
  return Status::ok();
}

Status Endpoint::recv_post(uint64_t msg, uint64_t offset, void* dst, uint64_t len) {
  if (!in_ || in_->id != msg) {
    return {Code::InvalidArgument, "genie: recv_post for " + msg_name(msg) + ", which is not being received"};
  }
  InMsg& in = *in_;
  if (offset != in.granted || offset + len > in.total) {
    return {Code::InvalidArgument, "genie: " + msg_name(msg) +
                                       ": destinations must come in order within its " +
                                       std::to_string(in.total) + " bytes"};
  }
  if (len == 0) return Status::ok();
  in.dests.push_back({offset, len, static_cast<uint8_t*>(dst)});
  in.granted += len;
  in.status_due = true;  // the grant goes out with the next poll
  return Status::ok();
}

uint64_t Endpoint::recv_done(uint64_t msg) const {
  if (in_ && in_->id == msg) return in_->done;
  return (any_in_done_ && msg <= last_in_done_) ? ~0ull : 0;
}

bool Endpoint::recv_done_at(uint64_t msg, uint64_t upto) { return recv_done(msg) >= upto; }

Status Endpoint::recv_wait(uint64_t msg, uint64_t upto, double timeout_ms) {
  return wait_until(timeout_ms, "receiving", &Endpoint::recv_done_at, msg, upto);
}

void Endpoint::on_data(const PacketHeader& h, rte_mbuf* m, double now) {
  if (!in_ || h.msg_id != in_->id) {
    if (any_in_done_ && h.msg_id <= last_in_done_) {
      ++stats_.duplicates;
      InMsg dummy;
      send_status(dummy, true, h.msg_id);  // the sender missed our final acknowledgement
    } else {
      ++stats_.bad_packets;  // data nobody granted
    }
    return;
  }
  InMsg& in = *in_;
  uint64_t off = h.offset, len = h.length;
  uint64_t hdr = kEtherHeader + sizeof(PacketHeader);
  if (len == 0 || off + len > in.granted || hdr + len > m->pkt_len) {
    ++stats_.bad_packets;
    return;
  }
  if (in.received.contains(off, off + len)) {
    ++stats_.duplicates;  // a spurious retransmit; the sender learns from the next STATUS
    return;
  }
  if (h.flags & kFlagChecksummed) {
    uint64_t sum = 0, pos = 0, skip = hdr;
    for (rte_mbuf* s = m; s && pos < len; s = s->next) {
      uint64_t dl = s->data_len;
      if (skip >= dl) {
        skip -= dl;
        continue;
      }
      uint64_t n = std::min(dl - skip, len - pos);
      sum = payload_sum(rte_pktmbuf_mtod_offset(s, uint8_t*, skip), n, pos, sum);
      pos += n;
      skip = 0;
    }
    if (fold_sum(sum) != h.payload_csum) {
      ++stats_.checksum_errors;  // treated as lost: the hole is NACKed
      return;
    }
  }
  // Scatter the payload into the destinations (Note: [Grants and acknowledgements]).
  auto d = std::upper_bound(in.dests.begin(), in.dests.end(), off,
                            [](uint64_t o, const Dest& x) { return o < x.offset; });
  --d;
  uint64_t at = off, skip = hdr;
  for (rte_mbuf* s = m; s && at < off + len; s = s->next) {
    uint64_t dl = s->data_len;
    if (skip >= dl) {
      skip -= dl;
      continue;
    }
    const uint8_t* src = rte_pktmbuf_mtod_offset(s, uint8_t*, skip);
    uint64_t avail = std::min(dl - skip, off + len - at);
    skip = 0;
    while (avail) {
      while (at >= d->offset + d->len) ++d;
      uint64_t n = std::min(avail, d->offset + d->len - at);
      rte_memcpy(d->data + (at - d->offset), src, n);
      src += n;
      at += n;
      avail -= n;
    }
  }
  ++stats_.chunks_received;
  stats_.bytes_received += len;
  if (off > in.highest) {
    in.status_due = true;  // a hole: report it now
  }
  in.highest = std::max(in.highest, off + len);
  in.received.add(off, off + len);
  uint64_t done = in.received.prefix();
  if (done > in.done) {
    in.done = done;
    for (auto it = in.nacked.begin(); it != in.nacked.end() && it->first < done;) it = in.nacked.erase(it);
  }
  if (in.done == in.total) {
    in.complete = true;
    last_in_done_ = in.id;
    any_in_done_ = true;
    ++stats_.messages_received;
    in.status_due = true;
  } else if (in.done - in.acked_sent >= cfg_.ack_every_bytes || in.done == in.granted) {
    in.status_due = true;
  }
  (void)now;
}

void Endpoint::on_status(const PacketHeader& h, rte_mbuf* m, double now) {
  if (!out_) {
    bool old = any_out_done_ && h.msg_id <= last_out_done_;
    if (!old && !(h.flags & kFlagComplete)) early_grants_[h.msg_id] = h.total;
    return;
  }
  OutMsg& out = *out_;
  if (h.msg_id > out.id) {
    // The receiver moved on: it holds all of out (Note: [Grants and acknowledgements]).
    if (!out.complete) {
      out.acked = out.total;
      out.complete = true;
      last_out_done_ = out.id;
      any_out_done_ = true;
      ++stats_.messages_sent;
      stats_.bytes_sent += out.total;
    }
    if (!(h.flags & kFlagComplete)) early_grants_[h.msg_id] = h.total;
    return;
  }
  if (h.msg_id < out.id || out.complete) return;
  bool progress = false;
  if (h.flags & kFlagComplete) {
    stats_.bytes_sent += out.total - out.acked;
    out.acked = out.total;
    out.complete = true;
    last_out_done_ = out.id;
    any_out_done_ = true;
    ++stats_.messages_sent;
    return;
  }
  if (h.total > out.granted) {
    out.granted = std::min(h.total, out.total);
    progress = true;
  }
  if (h.offset > out.acked) {
    stats_.bytes_sent += std::min(h.offset, out.total) - out.acked;
    out.acked = std::min(h.offset, out.total);
    progress = true;
  }
  uint32_t n = h.aux;
  uint64_t hdr = kEtherHeader + sizeof(PacketHeader);
  if (n > kMaxNackRanges || hdr + uint64_t(n) * sizeof(NackRange) > m->pkt_len) {
    ++stats_.bad_packets;
    n = 0;
  }
  for (uint32_t i = 0; i < n; ++i) {
    NackRange r;
    const void* p = rte_pktmbuf_read(m, static_cast<uint32_t>(hdr + i * sizeof(NackRange)), sizeof(r), &r);
    if (!p) break;
    if (p != &r) std::memcpy(&r, p, sizeof(r));
    uint64_t s = std::max(r.start, out.acked), e = std::min(r.end, out.next);
    if (s < e) {
      out.resend.add(s, e);
      ++stats_.nack_ranges_received;
    }
  }
  if (progress) out.last_progress = now;
}

void Endpoint::on_probe(const PacketHeader& h, double now) {
  if (in_ && h.msg_id == in_->id) {
    InMsg& in = *in_;
    // The sender says it sent up to h.offset: everything missing below is a hole.
    in.highest = std::max(in.highest, std::min(h.offset, in.granted));
    in.status_due = true;
    in.probed = true;
  } else if (any_in_done_ && h.msg_id <= last_in_done_) {
    InMsg dummy;
    send_status(dummy, true, h.msg_id);
  } else {
    // A keepalive, or a message we have not begun: answer so the sender knows we live.
    send_simple(PacketType::Pong, h.msg_id, 0, 0);
  }
  (void)now;
}

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
      fail(Code::PeerGone, "genie: the data-plane peer restarted (new session) during a connection");
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
    if (type == PacketType::Hello) send_hello(PacketType::HelloAck);
    else hello_acked_ = true;
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
      fail(Code::PeerGone, h.aux == static_cast<uint32_t>(CloseReason::OwnerExited)
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
      fail(Code::PeerGone, "genie: the data-plane link to the peer went down (did the peer process exit?)");
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
    bool all_sent = out.resend.empty() &&
                    out.next >= std::min({out.granted, out.provided, out.acked + cfg_.window_bytes});
    bool waiting_on_peer = out.next > out.acked || out.granted < out.provided;
    if (all_sent && waiting_on_peer && now - out.last_progress >= cfg_.rto_ms &&
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
  if (!zombies_.empty()) reap_parts();
  return worked;
}

void Endpoint::reap_parts() {
  port_->tx_done_cleanup();
  zombies_.erase(std::remove_if(zombies_.begin(), zombies_.end(),
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
                            bool (Endpoint::*done)(uint64_t, uint64_t), uint64_t msg, uint64_t upto) {
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
