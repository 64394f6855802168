// Messages: sending (chunks of external buffers inside the receiver's grant and the window,
// retransmission of NACKed ranges) and receiving (reassembly into the posted destinations,
// acknowledgements, NACKs). Note: [Grants and acknowledgements] in endpoint.h.
#include <emmintrin.h>
#include <rte_memcpy.h>
#include <rte_memory.h>

#include <algorithm>
#include <cstring>
#include <random>

#include "dataplane/endpoint_state.h"

namespace genie::dataplane {

namespace {

constexpr size_t kMaxSegmentsPerChunk = 8;

void no_free(void*, void*) {}

// Note: [Streaming stores]
// A message larger than the last-level cache is written once and read later by someone else:
// caching it on the way only evicts the memif ring (which must stay cached, see
// kMemifDefaultLog2Ring) and costs a read for ownership of every destination line. Such
// messages are placed with non-temporal stores; smaller ones with rte_memcpy, so that the
// caller finds them in cache.
constexpr uint64_t kStreamingBytes = 32ull << 20;

void place(uint8_t* dst, const uint8_t* src, size_t n, bool streaming) {
  if (!streaming || n < 256) {
    rte_memcpy(dst, src, n);
    return;
  }
  size_t head = (16 - (reinterpret_cast<uintptr_t>(dst) & 15)) & 15;
  std::memcpy(dst, src, head);
  dst += head;
  src += head;
  n -= head;
  size_t blocks = n / 64;
  for (size_t i = 0; i < blocks; ++i) {
    __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
    __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 16));
    __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 32));
    __m128i e = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 48));
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst), a);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + 16), b);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + 32), c);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + 48), e);
    src += 64;
    dst += 64;
  }
  std::memcpy(dst, src, n - blocks * 64);
  _mm_sfence();  // ordered before whatever reports these bytes as placed
}

}  // namespace

// -- acknowledgements -------------------------------------------------------------------------

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
  auto it = std::upper_bound(
      out.parts.begin(), out.parts.end(), offset,
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
    return {Code::InvalidArgument,
            "genie: send_provide for " + msg_name(msg) + ", which is not being sent"};
  }
  OutMsg& out = *out_;
  if (offset != out.provided || offset + len > out.total) {
    return {Code::InvalidArgument, "genie: " + msg_name(msg) +
                                       ": source bytes must come in order within its " +
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

bool Endpoint::send_done(uint64_t msg, uint64_t upto) {
  return send_released(msg) >= upto;
}

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
    if (inject_loss()) {
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
    if (inject_loss()) {
      rte_pktmbuf_free(pkt);
      ++stats_.chunks_dropped;
      continue;
    }
    dataq_.push_back(pkt);
  }
}

bool Endpoint::inject_loss() {
  ++data_transmissions_;
  for (uint64_t n : cfg_.drop_chunks) {
    if (n == data_transmissions_) return true;
  }
  return cfg_.loss_rate > 0 && std::uniform_real_distribution<double>(0, 1)(rng_) < cfg_.loss_rate;
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
    return {Code::InvalidArgument,
            "genie: " + msg_name(msg) + " posted before " + msg_name(in_->id) + " was received"};
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
    return {Code::InvalidArgument,
            "genie: recv_post for " + msg_name(msg) + ", which is not being received"};
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

bool Endpoint::recv_done_at(uint64_t msg, uint64_t upto) {
  return recv_done(msg) >= upto;
}

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
      place(d->data + (at - d->offset), src, n, in.total >= kStreamingBytes);
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
    for (auto it = in.nacked.begin(); it != in.nacked.end() && it->first < done;)
      it = in.nacked.erase(it);
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
    const void* p =
        rte_pktmbuf_read(m, static_cast<uint32_t>(hdr + i * sizeof(NackRange)), sizeof(r), &r);
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
}

}  // namespace genie::dataplane
