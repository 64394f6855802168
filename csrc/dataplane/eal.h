#pragma once
// Note: [EAL lifetime]
// DPDK's Environment Abstraction Layer is process-wide state that can be initialised once per
// process and never again (not after rte_eal_cleanup, not in a child forked after init).
// `Eal` is its one accessor: the first `ensure()` initialises it lazily with flags that work
// without hugepages (FIELD-NOTES.md), restores the calling thread's CPU affinity (EAL pins it,
// which would leave torch one core), and registers a clean shutdown at exit that stops every
// open port first. Later `ensure()` calls return the first outcome. A process that forked
// after init gets Code::Unavailable instead of undefined behaviour.
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "dataplane/config.h"

namespace genie::dataplane {

class Eal {
 public:
  static Status ensure(const EalConfig& cfg);
  static bool initialized();
  // Seconds rte_eal_init took in this process (0 before init).
  static double init_seconds();
  // The argument vector EAL was started with (for logs and error messages).
  static std::vector<std::string> args();
  // Runs `fn` at shutdown, before rte_eal_cleanup; returns a token for `forget`.
  static int at_shutdown(std::function<void()> fn);
  static void forget(int token);
  // Idempotent; registered with atexit by the first successful ensure().
  static void shutdown();

  // The argument vector `cfg` turns into (exposed for tests and diagnostics).
  static std::vector<std::string> build_args(const EalConfig& cfg);
};

// Note: [Arena in EAL memory]
// Without hugepages EAL's memory is one memfd mapped at one place (eal_memory.c), and a
// zero-copy memif client shares exactly that file with its server (Note: [memif zero copy] in
// port.cpp). An agent whose arena is carved out of it (a memzone) lets the ring name arena
// pages directly: a chunk sent from the arena is not copied on this side at all (the default,
// DpdkConfig.arena_in_eal: the server's agent then reads the arena itself, on its critical
// path, which costs on a quiet host and pays on a busy one, where total copies count). The user's
// process maps the same pages through the file descriptor and offset found here (the agent
// sends them over its socket). What the peer's agent can then read is this agent's whole EAL
// memory, the arena included, not only the buffers in flight: memif connects processes of
// one host and one user, each side of which could already read the other's ring.
struct SharedEalMemory {
  uint8_t* addr = nullptr;
  int fd = -1;          // EAL's own descriptor: dup it to hand it on, never close it
  uint64_t offset = 0;  // of addr within fd
};
// Reserves `bytes` (page-aligned) of EAL memory that another process can map.
Status reserve_shared_memory(const char* name, uint64_t bytes, SharedEalMemory* out);

}  // namespace genie::dataplane
