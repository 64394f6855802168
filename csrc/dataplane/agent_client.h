#pragma once
// The user's side of a data-plane agent (Note: [Data-plane agent] in agent_protocol.h): sends
// and receives messages through the agent. A buffer that lies in a live block of the arena's
// heap (Note: [Arena heap] in arena.h) is handed to the agent in place; any other buffer is
// copied through the arena's slots, slot by slot, and counted as copied. No DPDK in here: it is
// linked into genie._C, which never starts an EAL.
//
// Calls are serialised by one mutex; each blocks until its message (or its part of one) is done,
// the deadline passes, the agent reports an error or the agent exits. Errors are sticky.
#include <cstddef>
#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "dataplane/agent_protocol.h"
#include "dataplane/arena.h"
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

// Bytes that went through this client, by path (the copy path or in place).
struct AgentCounters {
  std::atomic<uint64_t> copied_out{0};         // caller's memory -> a send slot
  std::atomic<uint64_t> copied_in{0};          // a receive slot -> caller's memory
  std::atomic<uint64_t> sent_in_place{0};      // heap blocks the agent read directly
  std::atomic<uint64_t> received_in_place{0};  // heap blocks the agent wrote directly
};

class AgentClient {
 public:
  // Takes ownership of `sock` (the client's end of the socket pair) and maps `arena_fd`
  // (`copy_bytes + heap_bytes`, shared with the agent): the first half of `copy_bytes` holds
  // send slots, the second half receive slots, each `slot_bytes`; the heap follows.
  // `arena_fd` < 0: the agent makes the arena and sends it first (Note: [Arena in EAL memory]
  // in eal.h); the constructor waits for it, up to `arena_timeout_ms`.
  AgentClient(int sock, int arena_fd, size_t copy_bytes, size_t slot_bytes, size_t heap_bytes = 0,
              double arena_timeout_ms = 30000);
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
  // The mapping, shared with the storages made from its heap (they may outlive this client).
  const std::shared_ptr<Arena>& shared_arena() const { return shared_; }
  const AgentCounters& counters() const { return counters_; }
  // The agent runs in this process (Note: [In-process endpoint]): every buffer goes to it in
  // place, by address.
  void set_in_process(bool on) { in_process_ = on; }
  bool in_process() const { return in_process_; }
  size_t slot_bytes() const { return slot_bytes_; }
  size_t slots() const { return slots_; }

 private:
  Status command(const AgentCommand& c);
  // The Arena event and the descriptor that comes with it.
  Status receive_arena(double timeout_ms, int* fd, uint64_t* offset);
  // Next event (any type); Timeout when none in time; errors/EOF become Status.
  Status next_event(double deadline_ms, AgentEvent* ev);
  Status expect(AgentEventType type, double deadline_ms, AgentEvent* ev);
  Status fail(Status s);
  double now_ms() const;
  double deadline(double timeout_ms) const;

  // One step of a transfer: a heap block in place, or one slot's worth of copied bytes.
  struct Span {
    uint8_t* data;  // nullptr: discarded (a skip)
    uint64_t len;
  };
  struct Piece {
    bool direct;
    uint64_t arena_offset;  // direct pieces: an arena offset, or an address when `pointer`
    uint64_t len;
    std::vector<Span> spans;  // copied pieces: where the slot's bytes come from / go to
    bool pointer = false;
  };
  std::vector<Piece> plan(const std::vector<Span>& bufs) const;

  std::mutex mu_;
  int sock_ = -1;
  std::shared_ptr<Arena> shared_;
  AgentCounters counters_;
  bool in_process_ = false;
  uint8_t* arena_ = nullptr;
  size_t arena_bytes_ = 0;  // the copy part: slots
  size_t slot_bytes_ = 0;
  size_t slots_ = 0;
  Status broken_;
};

}  // namespace genie::dataplane
