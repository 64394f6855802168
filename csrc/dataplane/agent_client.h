#pragma once
// The user's side of a data-plane agent (Note: [Data-plane agent] in agent_protocol.h): sends
// and receives messages through the agent, copying between the caller's buffers and the shared
// arena slot by slot. No DPDK in here: it is linked into genie._C, which never starts an EAL.
//
// Calls are serialised by one mutex; each blocks until its message (or its part of one) is done,
// the deadline passes, the agent reports an error or the agent exits. Errors are sticky.
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "dataplane/agent_protocol.h"
#include "dataplane/status.h"

namespace genie::dataplane {

struct ConstBuffer {
  const void* data;
  size_t len;
};
struct MutableBuffer {
  void* data;  // nullptr: receive and discard
  size_t len;
};

class AgentClient {
 public:
  // Takes ownership of `sock` (the client's end of the socket pair) and maps `arena_fd`
  // (`arena_bytes`, shared with the agent): the first half holds send slots, the second half
  // receive slots, each `slot_bytes`.
  AgentClient(int sock, int arena_fd, size_t arena_bytes, size_t slot_bytes);
  ~AgentClient();
  AgentClient(const AgentClient&) = delete;
  AgentClient& operator=(const AgentClient&) = delete;

  // Waits for PortUp or Ready; *value gets the event's value (chunk bytes).
  Status wait_for(AgentEventType type, double timeout_ms, uint64_t* value = nullptr);
  // One whole message of the buffers' total length.
  Status send(uint64_t msg, const std::vector<ConstBuffer>& bufs, double timeout_ms);
  // Bytes [offset, offset + sum(len)) of message `msg` (`total` bytes); offset 0 begins it.
  Status recv(uint64_t msg, uint64_t total, uint64_t offset, const std::vector<MutableBuffer>& bufs,
              double timeout_ms);
  Status ping(uint32_t payload, double timeout_ms, double* rtt_us);
  Status stats(std::string* text, double timeout_ms);
  // Graceful close of the agent's endpoint; the agent exits afterwards.
  Status close(double timeout_ms);

  const Status& health() const { return broken_; }
  uint8_t* arena() const { return arena_; }
  size_t arena_bytes() const { return arena_bytes_; }
  size_t slot_bytes() const { return slot_bytes_; }
  size_t slots() const { return slots_; }

 private:
  Status command(const AgentCommand& c);
  // Next event (any type); Timeout when none in time; errors/EOF become Status.
  Status next_event(double deadline_ms, AgentEvent* ev);
  Status expect(AgentEventType type, double deadline_ms, AgentEvent* ev);
  Status fail(Status s);
  double now_ms() const;
  double deadline(double timeout_ms) const;

  std::mutex mu_;
  int sock_ = -1;
  uint8_t* arena_ = nullptr;
  size_t arena_bytes_ = 0;
  size_t slot_bytes_ = 0;
  size_t slots_ = 0;
  Status broken_;
};

}  // namespace genie::dataplane
