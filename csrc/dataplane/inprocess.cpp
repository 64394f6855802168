// libgenie_dpdk_inprocess.so: the data-plane agent's loop on a thread of the user's process
// (Note: [In-process endpoint] in agent_protocol.h). genie._C never links DPDK: it dlopens this
// library only when a connection asks for the in-process mode, so importing genie starts no EAL
// and needs no DPDK library.
#include <cstring>
#include <exception>
#include <string>
#include <thread>
#include <vector>

#include "dataplane/agent_loop.h"

extern "C" {

// Starts the loop on a detached thread that owns `sock` and `arena_fd`; 0, or -1 with *err set.
__attribute__((visibility("default"))) int genie_dataplane_start_in_process(
    int sock, int arena_fd, uint64_t arena_bytes, const char* const* items, int n_items, char* err,
    size_t err_len) {
  try {
    std::vector<std::string> opts(items, items + n_items);
    std::thread([=] {
      genie::dataplane::run_agent(sock, arena_fd, arena_bytes, opts, /*in_process=*/true);
    }).detach();
    return 0;
  } catch (const std::exception& e) {
    std::snprintf(err, err_len, "%s", e.what());
    return -1;
  }
}

__attribute__((visibility("default"))) void genie_dataplane_invalidate(const void* addr,
                                                                       size_t len) {
  genie::dataplane::invalidate_user_memory(addr, len);
}
}
