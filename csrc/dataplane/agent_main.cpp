// genie-dpdk-agent: the process that owns one DPDK endpoint (Note: [Data-plane agent] in
// agent_protocol.h). Started by genie's DPDK transport, never by hand:
//
//   genie-dpdk-agent --sock-fd=N --arena-fd=M|eal --arena-bytes=B [key=value ...]
//
// key=value options are EalConfig / PortConfig / EndpointConfig fields (config.h). It exits when
// its client closes the socket or asks it to close; errors go to the client as events.
#include <signal.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "dataplane/agent_loop.h"

int main(int argc, char** argv) {
  signal(SIGPIPE, SIG_IGN);
  int sock = -1, arena_fd = -1;
  uint64_t arena_bytes = 0;
  std::vector<std::string> items;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a.rfind("--sock-fd=", 0) == 0)
      sock = std::atoi(a.c_str() + 10);
    else if (a == "--arena-fd=eal")  // the agent makes it (Note: [Arena in EAL memory])
      arena_fd = -2;
    else if (a.rfind("--arena-fd=", 0) == 0)
      arena_fd = std::atoi(a.c_str() + 11);
    else if (a.rfind("--arena-bytes=", 0) == 0)
      arena_bytes = std::strtoull(a.c_str() + 14, nullptr, 10);
    else
      items.push_back(a);
  }
  if (sock < 0 || arena_fd == -1 || arena_bytes == 0) {
    std::fprintf(stderr, "genie-dpdk-agent: started by genie's DPDK transport, not by hand\n");
    return 2;
  }
  return genie::dataplane::run_agent(sock, arena_fd, arena_bytes, items, /*in_process=*/false);
}
