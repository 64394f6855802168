#pragma once
// One DPDK ethdev port with one RX and one TX queue, and the three mempools an endpoint needs.
// Ports are opened after EAL init by hot-plugging their device (a memif vdev, any vdev, a PCI
// NIC), so one process can open several and EAL's command line stays fixed.
//
// Note: [Mempool sizing]
// rx pool (data room = one memif buffer or one MTU frame + headroom):
//     rx_desc (the driver may hold a full ring) + 2 * burst (in the endpoint's hands)
//     + cache (per lcore) + 512 slack, rounded up to 2^k - 1 (the ring's best size)
// header pool (2 KiB data room: one chunk header, a STATUS with NACK ranges, a HELLO):
//     tx_desc (a full TX ring of headers) + window_chunks (headers of chunks in flight, which a
//     NIC frees only when its DMA completes) + 2 * burst + cache + 512
// external pool (no data room; carriers for external buffers, up to 2 per chunk):
//     2 * (tx_desc + window_chunks) + 2 * burst + cache + 512
// A zero-copy memif client (Note: [memif zero copy] in port.cpp) counts its ring's slots for
// rx_desc and tx_desc, no window and 64 slack: its ring holds the mbufs, and a bigger pool only
// spreads them over more cache.
#include <rte_ethdev.h>
#include <rte_ether.h>
#include <rte_mbuf.h>
#include <rte_mempool.h>

#include <memory>
#include <string>

#include "dataplane/config.h"

namespace genie::dataplane {

struct PortSizing {
  uint32_t rx_pool = 0;
  uint32_t header_pool = 0;
  uint32_t ext_pool = 0;
  uint16_t rx_data_room = 0;
  static PortSizing compute(const PortConfig& cfg, uint32_t window_chunks, uint16_t burst,
                            uint16_t rx_data_room, uint32_t slack = 512);
};

class Port {
 public:
  // Opens, configures and starts the port. `chunk_request` (0: the port's default) is the
  // payload per packet; with `window_bytes` and `burst` it sizes the mempools.
  static Status open(const PortConfig& cfg, uint32_t chunk_request, uint64_t window_bytes,
                     uint16_t burst, std::unique_ptr<Port>* out);
  ~Port();
  Port(const Port&) = delete;
  Port& operator=(const Port&) = delete;

  uint16_t id() const { return port_id_; }
  const std::string& name() const { return name_; }
  const std::string& driver() const { return driver_; }
  const rte_ether_addr& mac() const { return mac_; }
  // Whether payload memory must have a valid IOVA (DMA by a NIC). memif copies with the CPU.
  bool needs_iova() const { return needs_iova_; }
  // A zero-copy memif client: it puts mbufs in the ring as they are (Note: [memif zero copy]
  // in port.cpp), so a chunk's payload must lie in its ring region or be staged into an mbuf.
  bool zero_copy() const { return zero_copy_; }
  // Whether [p, p + n) lies in the memory a zero-copy ring may name (EAL's first memseg list).
  bool in_ring_region(const void* p, size_t n) const {
    auto a = reinterpret_cast<uintptr_t>(p);
    return zero_copy_ && a >= region_base_ && a + n <= region_end_;
  }
  // Packets per tx_burst call (a zero-copy ring overruns with more: Note: [memif zero copy]).
  uint16_t max_tx_burst() const { return zero_copy_ ? 4 : 64; }
  // Payload bytes per chunk on this port (the request, capped by what one packet carries).
  uint32_t chunk_bytes() const { return chunk_; }
  const PortSizing& sizing() const { return sizing_; }
  rte_device* device() const;

  rte_mempool* rx_pool() const { return rx_pool_; }
  rte_mempool* header_pool() const { return hdr_pool_; }
  rte_mempool* ext_pool() const { return ext_pool_; }

  uint16_t rx(rte_mbuf** pkts, uint16_t n) { return rte_eth_rx_burst(port_id_, 0, pkts, n); }
  uint16_t tx(rte_mbuf** pkts, uint16_t n);
  // Frees mbufs whose transmission completed (NICs free them lazily).
  void tx_done_cleanup();
  bool link_up() const;

  void close();

 private:
  Port() = default;
  Status setup(const PortConfig& cfg, uint32_t chunk_request, uint64_t window_bytes,
               uint16_t burst);

  uint16_t port_id_ = 0;
  std::string name_;
  std::string driver_;
  std::string hotplug_bus_;  // set when we hot-plugged the device (removed on close)
  std::string hotplug_name_;
  rte_ether_addr mac_{};
  bool needs_iova_ = false;
  bool zero_copy_ = false;
  uintptr_t region_base_ = 0;
  uintptr_t region_end_ = 0;
  bool started_ = false;
  bool configured_ = false;
  uint32_t chunk_ = 8192;
  PortSizing sizing_;
  rte_mempool* rx_pool_ = nullptr;
  rte_mempool* hdr_pool_ = nullptr;
  rte_mempool* ext_pool_ = nullptr;
  int shutdown_token_ = 0;
};

}  // namespace genie::dataplane
