// Messages, receiving: reassembly into the posted destinations, acknowledgements, NACKs.
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

}  // namespace genie::dataplane
