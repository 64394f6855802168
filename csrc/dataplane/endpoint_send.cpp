// Messages, sending: chunks of external buffers inside the receiver's grant and the window,
// retransmission of NACKed ranges, and the acknowledgements and probes that come back.
// Note: [Grants and acknowledgements] in endpoint.h.
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

}  // namespace

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
  // A zero-copy ring publishes mbufs as they are: memory outside its region rides in the
  // header mbuf (Note: [memif zero copy] in port.cpp), the copy copy-mode TX would have made.
  const bool zc = port_->zero_copy();
  const bool staged = zc && !(*it)->in_ring;
  while (staged && at < end && it != out.parts.end()) {
    SendPart& part = **it;
    uint64_t in_part = at - part.offset;
    uint64_t n = std::min(end - at, part.len - in_part);
    char* dst = rte_pktmbuf_append(m, static_cast<uint16_t>(n));
    if (!dst) break;
    const uint8_t* src = part.data + in_part;
    rte_memcpy(dst, src, n);
    if (cfg_.payload_checksum) sum = payload_sum(src, n, at - offset, sum);
    stats_.bytes_staged += n;
    at += n;
    ++it;
  }
  while (!staged && at < end && it != out.parts.end() && segs < kMaxSegmentsPerChunk) {
    SendPart& part = **it;
    if (zc && !part.in_ring) break;  // the next chunk stages it
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
  part->in_ring = port_->in_ring_region(data, len);
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
  // Each chunk built spends one unit of the burst; an injected loss drops it here.
  auto queue = [&](rte_mbuf* pkt) {
    --budget;
    if (inject_loss()) {
      rte_pktmbuf_free(pkt);
      ++stats_.chunks_dropped;
    } else {
      dataq_.push_back(pkt);
    }
  };
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
    queue(pkt);
  }
  uint64_t limit = std::min({out.granted, out.provided, out.acked + cfg_.window_bytes});
  while (budget && out.next < limit) {
    uint64_t n = std::min<uint64_t>(chunk, limit - out.next);
    rte_mbuf* pkt;
    if (!build_chunk(out, out.next, n, false, &pkt)) break;
    out.next += rte_pktmbuf_mtod_offset(pkt, PacketHeader*, kEtherHeader)->length;
    ++stats_.chunks_sent;
    queue(pkt);
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
