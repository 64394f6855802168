#pragma once
// Note: [Data-plane agent]
// The DPDK endpoint does not run in the user's process. `genie-dpdk-agent` (agent_main.cpp),
// a small process started per connection, owns the EAL, the port and the endpoint; the user's
// process talks to it over a SOCK_SEQPACKET socket pair (commands one way, events the other)
// and shares payload memory with it through a memfd mapped by both (the *arena*). Why:
//   - memif's sender can crash when its receiver dies (FIELD-NOTES.md: the PMD unmaps the
//     shared rings under a running tx_burst). In the agent that crash ends the agent; the user's
//     process reads EOF on the socket and raises TransportError. Any other fault in the PMD or
//     the EAL is contained the same way.
//   - EAL can be initialised once per process, never after a fork, and pins the thread that
//     starts it; none of that touches the user's process, which may fork, use torch threads and
//     open any number of connections.
//   - The agent answers the peer (keepalives, acknowledgements) while the user's process is
//     busy computing, so liveness never depends on Python being scheduled.
// Inside the agent the endpoint is zero-copy: chunks are mbufs attached to arena memory, which
// is registered once as DPDK external memory (a memif client's agent instead reserves the arena
// in its EAL memory, which its zero-copy ring shares: Note: [Arena in EAL memory] in eal.h). Tensors whose storage is a block of the arena's
// heap (Note: [Arena heap] in arena.h) travel as they are; any other memory costs one copy per
// side between the caller's buffers and the arena's slots, pipelined (a slot is copied while
// the agent moves the previous one) and counted (Note: [In place or copied]).
//
// Note: [In-process endpoint]
// For a real NIC the last copy matters and the isolation may not: with `in_process=1`
// (GENIE_DPDK_IN_PROCESS=1) the same loop runs on a thread of the user's process
// (inprocess.cpp, a library genie._C loads only then), still driven through the socket pair and
// still with an arena, but commands may name the caller's own memory (kAgentPointer): nothing
// is copied on either side. A buffer sent is registered (DPDK external memory + DMA mapping)
// on first send through a registration cache and hits on later sends; freeing its storage
// invalidates the entry. What is given up: a crash in the PMD or the EAL takes the user's
// process down, EAL is initialised once in that process (the first connection's EAL options
// win), and a process that forked after that cannot use DPDK again.
//
// Commands (client -> agent) and events (agent -> client) are fixed-size structs; one message
// per datagram.
#include <sys/socket.h>

#include <cstdint>

namespace genie::dataplane {

constexpr uint32_t kAgentProtocol = 1;

enum class AgentOp : uint32_t {
  SendBegin = 1,    // msg, len = total
  SendProvide = 2,  // msg, offset, arena_offset, len, cookie -> Sent(cookie) when released
  RecvBegin = 3,    // msg, len = total
  RecvPost = 4,     // msg, offset, arena_offset, len, cookie -> Received(cookie) when placed
  Stats = 5,        // -> Stats (text)
  Ping = 6,         // len = payload bytes -> Pong (value = round trip, ns)
  Close = 7,        // graceful close -> Closed, then the agent exits
};

// AgentCommand::reserved flag: arena_offset is the address of the caller's memory (in-process
// agents only; a process agent refuses what lies outside its arena).
constexpr uint32_t kAgentPointer = 1;

struct AgentCommand {
  uint32_t op;
  uint32_t reserved;
  uint64_t msg;
  uint64_t offset;
  uint64_t arena_offset;
  uint64_t len;
  uint64_t cookie;
};

enum class AgentEventType : uint32_t {
  PortUp = 1,    // the port exists (a memif server socket listens); value = chunk bytes
  Ready = 2,     // the peer said hello; value = chunk bytes
  Sent = 3,      // msg, value = bytes released, cookie
  Received = 4,  // msg, value = bytes placed, cookie
  Error = 5,     // code = Code, text
  Stats = 6,     // text = "key=value ..."
  Pong = 7,      // value = round trip in ns
  Closed = 8,
  Arena = 9,  // value = offset of the arena in the descriptor sent with it (SCM_RIGHTS), first
              // of all events when the arena lives in EAL memory (Note: [Arena in EAL memory])
};

struct AgentEvent {
  uint32_t type;
  int32_t code;
  uint64_t msg;
  uint64_t value;
  uint64_t cookie;
  char text[1000];
};

// One event with room for one file descriptor beside it (SCM_RIGHTS): how the Arena event
// travels. The message header is set up here once for both sides, agent_loop.cpp's sendmsg and
// agent_client.cpp's recvmsg; it points into the object, which therefore stays where it is.
struct EventWithFd {
  AgentEvent ev{};
  iovec iov{&ev, sizeof(ev)};
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
  msghdr mh{};

  EventWithFd() {
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    mh.msg_control = control;
    mh.msg_controllen = sizeof(control);
  }
  EventWithFd(const EventWithFd&) = delete;
  EventWithFd& operator=(const EventWithFd&) = delete;
};

}  // namespace genie::dataplane
