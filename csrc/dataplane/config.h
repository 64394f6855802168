#pragma once
// Configuration of the data plane: the EAL, one port, one endpoint. Every value has a default
// that works on one host over net_memif without hugepages (FIELD-NOTES.md, DPDK section);
// `parse_options` reads them from "key=value" strings (the agent's command line, the
// benchmarks, GENIE_DPDK_* variables forwarded by the Python transport).
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "dataplane/status.h"

namespace genie::dataplane {

using Options = std::map<std::string, std::string>;

// "a=1,b=2" or {"a=1", "b=2"} -> map; later keys win.
Status parse_options(const std::vector<std::string>& items, Options* out);

struct EalConfig {
  // Memory EAL may use, MB (--no-huge reserves it from anonymous memory lazily).
  int memory_mb = 1024;
  bool no_huge = true;
  // PCI devices EAL may take (-a); empty means --no-pci, so EAL never grabs the host's NIC.
  std::vector<std::string> pci_allow;
  // Virtual devices created at init (--vdev); ports added later are hot-plugged instead.
  std::vector<std::string> vdevs;
  std::string log_level = "*:error";
  // Unique per process when empty ("genie-<pid>-<random>"): runs never share EAL state.
  std::string file_prefix;
  // PMD shared objects to load with -d (the GPU machines, where the PMD folder cannot be
  // loaded whole); empty = EAL's built-in plugin directory.
  std::vector<std::string> drivers;
  // Appended verbatim (an escape hatch for real NICs: --iova-mode, --socket-mem ...).
  std::vector<std::string> extra_args;

  static Status from_options(const Options& o, EalConfig* out);
};

struct PortConfig {
  // Which port:
  //   "memif:role=server,socket=NAME[,bsize=..,rsize=..]"  a memif vdev (socket in the
  //       abstract namespace unless socket-abstract=no)
  //   "vdev:net_xxx0,args"  any virtual device;  "pci:0000:17:00.0"  a NIC;  "port:N"  by id
  std::string spec = "memif:role=server";
  uint16_t rx_desc = 1024;
  uint16_t tx_desc = 1024;
  // Data room of receive mbufs; memif copies each ring buffer into them, so this must hold
  // one memif buffer (bsize) plus headroom.
  uint16_t mbuf_data_room = 0;  // 0: derived from the port (memif bsize + headroom)
  uint16_t mtu = 0;             // 0: leave the port's default

  static Status from_options(const Options& o, PortConfig* out);
};

struct EndpointConfig {
  // Payload bytes per chunk (one packet); 0 picks a port-appropriate size (memif: a few
  // buffers per packet; a NIC: what fits its MTU).
  uint32_t chunk_bytes = 0;
  uint16_t burst = 32;
  // Unacknowledged bytes a sender may have in flight.
  uint64_t window_bytes = 16ull << 20;
  // The receiver acknowledges progress at least this often (lets the sender reuse memory).
  uint64_t ack_every_bytes = 1ull << 20;
  // A sender with everything sent and no acknowledgement for this long probes the receiver;
  // a receiver re-asks for a hole it reported this long ago.
  double rto_ms = 20.0;
  // While waiting on the peer, send a keepalive this often ...
  double keepalive_ms = 100.0;
  // ... and declare it dead after this long without hearing anything from it.
  double peer_timeout_ms = 3000.0;
  // How long connect() waits for link up and the peer's hello.
  double connect_timeout_ms = 30000.0;
  // How long close() waits for the peer to acknowledge.
  double close_timeout_ms = 200.0;
  // Checksum payloads too (the header always is). Off by default: memif copies memory within
  // one host and a NIC's frames carry an Ethernet CRC; the sum costs ~25% of memif throughput.
  bool payload_checksum = false;
  // A waiting poller yields its core after this many empty polls (0: never); see
  // Note: [Polling on shared cores] in endpoint.cpp.
  uint32_t yield_after_polls = 64;
  // How long a data-plane agent waiting on its peer keeps its core, yielding, before it sleeps
  // in 50 us steps (Note: [Waiting on the peer] in agent_loop.cpp).
  double spin_ms = 1.0;
  // Fault injection for tests: drop this fraction of outgoing data chunks, and the data
  // transmissions with these 1-based numbers (first transmissions and retransmissions count).
  double loss_rate = 0.0;
  uint64_t loss_seed = 1;
  std::vector<uint64_t> drop_chunks;

  static Status from_options(const Options& o, EndpointConfig* out);
};

// Helpers shared by the from_options functions.
Status option_u64(const Options& o, const std::string& key, uint64_t* v);
Status option_double(const Options& o, const std::string& key, double* v);
Status option_bool(const Options& o, const std::string& key, bool* v);
std::vector<std::string> split(const std::string& s, char sep);

}  // namespace genie::dataplane
