#pragma once
// Note: [EAL lifetime]
// DPDK's Environment Abstraction Layer is process-wide state that can be initialised once per
// process and never again (not after rte_eal_cleanup, not in a child forked after init).
// `Eal` is its one accessor: the first `ensure()` initialises it lazily with flags that work
// without hugepages (FIELD-NOTES.md), restores the calling thread's CPU affinity (EAL pins it,
// which would leave torch one core), and registers a clean shutdown at exit that stops every
// open port first. Later `ensure()` calls return the first outcome. A process that forked
// after init gets Code::Unavailable instead of undefined behaviour.
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

}  // namespace genie::dataplane
