#pragma once
// The data-plane agent's loop, shared by the agent process (agent_main.cpp) and the in-process
// mode (inprocess.cpp; Note: [In-process endpoint] in agent_protocol.h).
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace genie::dataplane {

// Serves one client on `sock` (commands in, events out; closed on return) with the arena
// `arena_fd` (`arena_bytes`, mapped here, the fd closed; negative: reserved in EAL memory and
// sent to the client, Note: [Arena in EAL memory] in eal.h) and key=value options (config.h),
// until the client closes or leaves. `in_process`: commands may carry the address of the
// caller's memory (kAgentPointer), registered through a cache of user memory.
int run_agent(int sock, int arena_fd, uint64_t arena_bytes, const std::vector<std::string>& items,
              bool in_process);

// Drops registrations of [addr, addr + len) in every in-process agent's cache of user memory
// (a storage that was sent is being freed).
void invalidate_user_memory(const void* addr, size_t len);

}  // namespace genie::dataplane
