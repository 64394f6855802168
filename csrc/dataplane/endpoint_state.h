#pragma once
// The endpoint's per-message state, shared by endpoint.cpp (life cycle, packets, the engine),
// endpoint_send.cpp and endpoint_recv.cpp (sending and receiving messages). Internal to
// csrc/dataplane.
#include <deque>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "dataplane/endpoint.h"

namespace genie::dataplane {

inline std::string msg_name(uint64_t msg) {
  return "message " + std::to_string(msg);
}

struct Endpoint::SendPart {
  uint64_t offset = 0;
  uint64_t len = 0;
  const uint8_t* data = nullptr;
  uint64_t iova = 0;
  bool in_ring = false;  // a zero-copy ring may name it (Note: [memif zero copy] in port.cpp)
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

}  // namespace genie::dataplane
