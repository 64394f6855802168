#include "dataplane/port.h"

#include <unistd.h>

#include <atomic>
#include <cstring>

#include <rte_bus.h>
#include <rte_dev.h>
#include <rte_eal.h>
#include <rte_memory.h>
#include <rte_errno.h>
#include <rte_ethdev.h>

#include "dataplane/eal.h"
#include "dataplane/wire.h"

namespace genie::dataplane {

namespace {

// Note: [One memif buffer per packet]
// DPDK 22.11's memif copy-mode TX checks for a free ring slot before it takes the second and
// later slots of a packet but does not count the first one, so a packet spanning several ring
// buffers can overrun a nearly full ring by one slot: the peer then reads stale descriptors
// (measured here: thousands of duplicate chunks per 16 MB). Every packet therefore fits in one
// memif buffer: bsize defaults to 16 KiB and a chunk to bsize minus the headers.
constexpr uint32_t kMemifDefaultBsize = 16384;
// 2^8 buffers of 16 KiB: a 4 MiB ring per direction stays in the last-level cache; a 16 MiB
// ring (DPDK's default 2^10) ran at 6.1-6.4 GB/s here against 8.5-8.8 GB/s.
constexpr uint32_t kMemifDefaultLog2Ring = 8;
constexpr uint32_t kHeaderDataRoom = 2048 + RTE_PKTMBUF_HEADROOM;
constexpr uint32_t kPacketOverhead = kEtherHeader + sizeof(PacketHeader);

std::atomic<int> g_vdev_counter{0};

uint32_t pool_size(uint64_t want) {
  uint64_t n = 1;
  while (n - 1 < want) n <<= 1;
  return static_cast<uint32_t>(n - 1);
}

std::string err(const std::string& what, int rc) {
  return what + ": " + rte_strerror(rc < 0 ? -rc : rc);
}

bool has_key(const std::string& args, const std::string& key) {
  for (const auto& kv : split(args, ',')) {
    if (kv.rfind(key + "=", 0) == 0) return true;
  }
  return false;
}

uint32_t key_value(const std::string& args, const std::string& key, uint32_t dflt) {
  for (const auto& kv : split(args, ',')) {
    if (kv.rfind(key + "=", 0) == 0)
      return static_cast<uint32_t>(std::strtoul(kv.c_str() + key.size() + 1, nullptr, 0));
  }
  return dflt;
}

// Note: [memif zero copy]
// With zero-copy=yes a memif *client* (DPDK 22.11 drivers/net/memif/rte_eth_memif.c) shares its
// EAL memory with the server as regions and puts mbuf addresses in the rings: its RX hands out
// the mbufs the server copied into (eth_memif_rx_zc: no copy on this side), its TX publishes
// mbufs in place (eth_memif_tx_zc). A server always copies. Each byte from server to client is
// then copied once in the PMD instead of twice. The driver's limits, and what we do about them:
//   - every descriptor it builds names region 1 ("FIXME: get region index" in memif_tx_one_zc
//     and in the RX refill), the first memseg list: only EAL memory from that list may be in a
//     ring. With --no-huge EAL has one memseg list, backed by a memfd (eal_memory.c), so our
//     pools qualify; with hugepages there may be several, so we refuse. Region offsets are 32
//     bits (memif.h memif_region_offset_t): EAL memory must stay under 4 GiB.
//   - memory outside that list (an arena the user's process made, registered as external
//     memory) is never in a region: a descriptor would name the wrong bytes (FIELD-NOTES.md:
//     "memory not from rte_malloc gives zeros"). The endpoint copies such a chunk's payload
//     into its header mbuf (counted in EndpointStats::bytes_staged), the copy copy-mode TX
//     would have made into the ring. Memory in the list (the agent's arena when it lives in
//     EAL memory, Note: [Arena in EAL memory] in eal.h) is attached in place.
//   - eth_memif_tx_zc takes four packets at a time while more than four ring slots are free,
//     but a packet of several segments takes several slots, so it can overrun the ring
//     (FIELD-NOTES.md: "bursts over 4 with multi-segment mbufs"): tx() hands it at most four
//     packets per call. When a chained packet does not fit, memif_tx_one_zc has already taken
//     a reference on its first segment and returns 0: tx() gives that reference back.
//   - mbufs it sent go back to their pool only inside a later tx_burst (memif_free_stored_mbufs):
//     tx_done_cleanup() makes an empty call, so attached caller memory is released.
Status check_memif_zero_copy(const std::string& args) {
  if (args.find("role=client") == std::string::npos) return Status::ok();  // ignored by servers
  if (rte_eal_has_hugepages()) {
    return {Code::Unsupported,
            "genie: memif zero-copy needs EAL without hugepages (--no-huge: one memseg list; "
            "DPDK 22.11 memif names region 1 for every buffer, Note: [memif zero copy])"};
  }
  if (rte_eal_get_physmem_size() >= (4ull << 30)) {
    return {Code::Unsupported,
            "genie: memif zero-copy needs EAL memory under 4 GiB (32-bit region offsets)"};
  }
  return Status::ok();
}

}  // namespace

PortSizing PortSizing::compute(const PortConfig& cfg, uint32_t window_chunks, uint16_t burst,
                               uint16_t rx_data_room, uint32_t slack) {
  const uint32_t cache = RTE_MEMPOOL_CACHE_MAX_SIZE < 256 ? RTE_MEMPOOL_CACHE_MAX_SIZE : 256;
  PortSizing s;
  s.rx_data_room = rx_data_room;
  s.rx_pool = pool_size(uint64_t(cfg.rx_desc) + 2u * burst + cache + slack);
  s.header_pool = pool_size(uint64_t(cfg.tx_desc) + window_chunks + 2u * burst + cache + slack);
  s.ext_pool = pool_size(2ull * (cfg.tx_desc + window_chunks) + 2u * burst + cache + slack);
  return s;
}

Status Port::open(const PortConfig& cfg, uint32_t chunk_request, uint64_t window_bytes,
                  uint16_t burst, std::unique_ptr<Port>* out) {
  if (!Eal::initialized()) {
    return {Code::EalFailed, "genie: open a port only after Eal::ensure() succeeded"};
  }
  std::unique_ptr<Port> p(new Port());
  Status s = p->setup(cfg, chunk_request, window_bytes, burst);
  if (!s) {
    p->close();
    return s;
  }
  *out = std::move(p);
  return Status::ok();
}

Status Port::setup(const PortConfig& cfg, uint32_t chunk_request, uint64_t window_bytes,
                   uint16_t burst) {
  const std::string& spec = cfg.spec;
  auto colon = spec.find(':');
  std::string kind = spec.substr(0, colon);
  std::string rest = colon == std::string::npos ? "" : spec.substr(colon + 1);
  uint32_t memif_bsize = 0;
  uint32_t memif_slots = 0;
  int rc = 0;

  if (kind == "memif" || kind == "vdev") {
    std::string name, args;
    if (kind == "memif") {
      name = "net_memif" + std::to_string(getpid()) + "_" + std::to_string(g_vdev_counter++);
      args = rest;
      if (!has_key(args, "bsize"))
        args +=
            (args.empty() ? "" : ",") + std::string("bsize=") + std::to_string(kMemifDefaultBsize);
      if (!has_key(args, "rsize")) args += ",rsize=" + std::to_string(kMemifDefaultLog2Ring);
      if (!has_key(args, "role")) args += ",role=server";
      memif_bsize = key_value(args, "bsize", kMemifDefaultBsize);
      memif_slots = 1u << key_value(args, "rsize", kMemifDefaultLog2Ring);
      if (args.find("zero-copy=yes") != std::string::npos) {
        Status zs = check_memif_zero_copy(args);
        if (!zs) return zs;
        zero_copy_ = args.find("role=client") != std::string::npos;
      }
    } else {
      auto comma = rest.find(',');
      name = rest.substr(0, comma);
      args = comma == std::string::npos ? "" : rest.substr(comma + 1);
      if (name.empty())
        return {Code::InvalidArgument, "genie: port spec '" + spec + "' names no vdev"};
    }
    uint16_t existing;
    if (rte_eth_dev_get_port_by_name(name.c_str(), &existing) != 0) {
      rc = rte_eal_hotplug_add("vdev", name.c_str(), args.c_str());
      if (rc < 0) {
        return {Code::EalFailed,
                err("genie: cannot create the DPDK device " + name + "," + args, rc)};
      }
      hotplug_bus_ = "vdev";
      hotplug_name_ = name;
    }
    if (rte_eth_dev_get_port_by_name(name.c_str(), &port_id_) != 0) {
      return {Code::EalFailed, "genie: DPDK created " + name + " but no ethdev port for it"};
    }
    name_ = name;
  } else if (kind == "pci") {
    if (rte_eth_dev_get_port_by_name(rest.c_str(), &port_id_) != 0) {
      rc = rte_eal_hotplug_add("pci", rest.c_str(), "");
      if (rc < 0) {
        return {Code::EalFailed, err("genie: cannot attach PCI device " + rest +
                                         " (is it bound to vfio-pci and allowed with eal_pci=...?)",
                                     rc)};
      }
      hotplug_bus_ = "pci";
      hotplug_name_ = rest;
      if (rte_eth_dev_get_port_by_name(rest.c_str(), &port_id_) != 0) {
        return {Code::EalFailed, "genie: PCI device " + rest + " has no ethdev port"};
      }
    }
    name_ = rest;
  } else if (kind == "port") {
    port_id_ = static_cast<uint16_t>(std::strtoul(rest.c_str(), nullptr, 10));
    if (!rte_eth_dev_is_valid_port(port_id_)) {
      return {Code::InvalidArgument, "genie: no DPDK port " + rest};
    }
    char buf[RTE_ETH_NAME_MAX_LEN];
    rte_eth_dev_get_name_by_port(port_id_, buf);
    name_ = buf;
  } else {
    return {Code::InvalidArgument,
            "genie: unknown port spec '" + spec +
                "' (expected memif:ARGS, vdev:NAME,ARGS, pci:ADDRESS or port:N)"};
  }

  rte_eth_dev_info info;
  rc = rte_eth_dev_info_get(port_id_, &info);
  if (rc != 0) return {Code::EalFailed, err("genie: rte_eth_dev_info_get(" + name_ + ")", rc)};
  driver_ = info.driver_name ? info.driver_name : "?";
  const rte_bus* bus = info.device ? rte_dev_bus(info.device) : nullptr;
  std::string bus_name = bus ? rte_bus_name(bus) : "";
  // Virtual devices (memif, ring, null) move packets with the CPU; everything else DMAs.
  needs_iova_ = !(bus_name.empty() || bus_name == "vdev");

  // Chunk sizes: memif carries any length (it chains ring buffers); a NIC carries its MTU.
  uint16_t rx_room;
  uint32_t max_chunk, default_chunk;
  if (memif_bsize) {
    if (memif_bsize < 1024 || memif_bsize + RTE_PKTMBUF_HEADROOM > 65535) {
      return {Code::InvalidArgument, "genie: memif bsize must be in [1024, " +
                                         std::to_string(65535 - RTE_PKTMBUF_HEADROOM) + "]"};
    }
    max_chunk = memif_bsize - kPacketOverhead;  // Note: [One memif buffer per packet]
    // A multiple of 64: every chunk lands cache-line aligned in the destination.
    default_chunk = max_chunk & ~63u;
    rx_room = static_cast<uint16_t>(memif_bsize + RTE_PKTMBUF_HEADROOM);
  } else {
    uint16_t mtu = cfg.mtu;
    if (!mtu && rte_eth_dev_get_mtu(port_id_, &mtu) != 0) mtu = RTE_ETHER_MTU;
    uint32_t frame = mtu + kEtherHeader;
    max_chunk = mtu > sizeof(PacketHeader) + 64 ? mtu - sizeof(PacketHeader) : 64;
    default_chunk = max_chunk;
    rx_room = static_cast<uint16_t>(std::min<uint32_t>(frame + RTE_PKTMBUF_HEADROOM, 65535));
  }
  chunk_ = chunk_request ? std::min(chunk_request, max_chunk) : default_chunk;
  if (cfg.mbuf_data_room) rx_room = cfg.mbuf_data_room;
  uint32_t window_chunks = static_cast<uint32_t>(window_bytes / chunk_ + 1);
  if (zero_copy_) {
    // The ring's buffers are these pools' mbufs, and a pool's common ring hands them out in
    // FIFO order: a pool much larger than the ring walks the whole of it through the cache
    // (2047 x 16 KiB = 34 MB of receive mbufs, past a 32 MB last-level cache). Size the pools
    // by what can be out at once: the memif ring (it holds every mbuf sent until the server
    // consumed it, the role window_chunks has for a NIC), bursts in hand, the lcore cache.
    PortConfig ring = cfg;
    ring.rx_desc = ring.tx_desc = static_cast<uint16_t>(memif_slots);
    sizing_ = PortSizing::compute(ring, 0, burst, rx_room, /*slack=*/64);
  } else {
    sizing_ = PortSizing::compute(cfg, window_chunks, burst, rx_room);
  }

  // Pools: unique names per port and process.
  std::string tag = std::to_string(getpid() % 100000) + "_" + std::to_string(port_id_);
  int socket = rte_eth_dev_socket_id(port_id_);
  if (socket < 0) socket = SOCKET_ID_ANY;
  const unsigned cache = 256;
  rx_pool_ =
      rte_pktmbuf_pool_create(("grx" + tag).c_str(), sizing_.rx_pool, cache, 0, rx_room, socket);
  // A zero-copy memif client carries each chunk in its header mbuf (Note: [memif zero copy]).
  uint16_t hdr_room = static_cast<uint16_t>(
      zero_copy_ ? std::max<uint32_t>(rx_room, kHeaderDataRoom) : kHeaderDataRoom);
  hdr_pool_ = rte_pktmbuf_pool_create(("ghd" + tag).c_str(), sizing_.header_pool, cache, 0,
                                      hdr_room, socket);
  ext_pool_ = rte_pktmbuf_pool_create(("gex" + tag).c_str(), sizing_.ext_pool, cache, 0, 0, socket);
  if (!rx_pool_ || !hdr_pool_ || !ext_pool_) {
    return {Code::NoMemory, "genie: cannot create mbuf pools for " + name_ + " (" +
                                rte_strerror(rte_errno) + "); raise eal_memory_mb"};
  }
  if (zero_copy_) {
    // Region 1 is the memseg list our pools live in (Note: [memif zero copy]).
    rte_mbuf* probe = rte_pktmbuf_alloc(hdr_pool_);
    const rte_memseg_list* msl = probe ? rte_mem_virt2memseg_list(probe->buf_addr) : nullptr;
    if (probe) rte_pktmbuf_free(probe);
    if (!msl || msl->external) {
      return {Code::Unsupported, "genie: memif zero-copy: the mbuf pools are not EAL memory"};
    }
    region_base_ = reinterpret_cast<uintptr_t>(msl->base_va);
    region_end_ = region_base_ + msl->len;
  }

  rte_eth_conf conf;
  std::memset(&conf, 0, sizeof(conf));
  if (info.tx_offload_capa & RTE_ETH_TX_OFFLOAD_MULTI_SEGS) {
    conf.txmode.offloads |= RTE_ETH_TX_OFFLOAD_MULTI_SEGS;
  } else if (needs_iova_) {
    return {Code::Unsupported, "genie: port " + name_ + " (" + driver_ +
                                   ") cannot send multi-segment packets; zero-copy chunks need it"};
  }
  if (info.rx_offload_capa & RTE_ETH_RX_OFFLOAD_SCATTER) {
    conf.rxmode.offloads |= RTE_ETH_RX_OFFLOAD_SCATTER;
  }
  rc = rte_eth_dev_configure(port_id_, 1, 1, &conf);
  if (rc < 0) return {Code::EalFailed, err("genie: rte_eth_dev_configure(" + name_ + ")", rc)};
  configured_ = true;
  uint16_t nrx = cfg.rx_desc, ntx = cfg.tx_desc;
  rte_eth_dev_adjust_nb_rx_tx_desc(port_id_, &nrx, &ntx);
  if (cfg.mtu) rte_eth_dev_set_mtu(port_id_, cfg.mtu);
  rc = rte_eth_rx_queue_setup(port_id_, 0, nrx, socket, nullptr, rx_pool_);
  if (rc < 0) return {Code::EalFailed, err("genie: rx queue of " + name_, rc)};
  rte_eth_txconf txconf = info.default_txconf;
  txconf.offloads = conf.txmode.offloads;
  rc = rte_eth_tx_queue_setup(port_id_, 0, ntx, socket, &txconf);
  if (rc < 0) return {Code::EalFailed, err("genie: tx queue of " + name_, rc)};
  rc = rte_eth_dev_start(port_id_);
  if (rc < 0) return {Code::EalFailed, err("genie: starting " + name_, rc)};
  started_ = true;
  rte_eth_promiscuous_enable(port_id_);  // not every driver supports it; harmless when not
  rte_eth_macaddr_get(port_id_, &mac_);
  shutdown_token_ = Eal::at_shutdown([this] { close(); });
  return Status::ok();
}

uint16_t Port::tx(rte_mbuf** pkts, uint16_t n) {
  if (!zero_copy_) return rte_eth_tx_burst(port_id_, 0, pkts, n);
  uint16_t sent = 0;
  while (sent < n) {  // Note: [memif zero copy]
    uint16_t k = std::min<uint16_t>(n - sent, max_tx_burst());
    uint16_t done = rte_eth_tx_burst(port_id_, 0, pkts + sent, k);
    sent += done;
    if (done < k) {
      rte_mbuf* refused = pkts[sent];
      if (refused->nb_segs > 1 && rte_mbuf_refcnt_read(refused) > 1)
        rte_mbuf_refcnt_update(refused, -1);
      break;
    }
  }
  return sent;
}

rte_device* Port::device() const {
  rte_eth_dev_info info;
  if (rte_eth_dev_info_get(port_id_, &info) != 0) return nullptr;
  return info.device;
}

void Port::tx_done_cleanup() {
  if (!started_) return;
  if (zero_copy_)
    rte_eth_tx_burst(port_id_, 0, nullptr, 0);  // frees what the peer consumed
  else
    rte_eth_tx_done_cleanup(port_id_, 0, 0);
}

bool Port::link_up() const {
  if (!started_) return false;
  rte_eth_link link;
  std::memset(&link, 0, sizeof(link));
  if (rte_eth_link_get_nowait(port_id_, &link) != 0) return false;
  return link.link_status == RTE_ETH_LINK_UP;
}

void Port::close() {
  if (shutdown_token_) {
    Eal::forget(shutdown_token_);
    shutdown_token_ = 0;
  }
  if (started_) {
    rte_eth_dev_stop(port_id_);
    started_ = false;
  }
  if (configured_) {
    rte_eth_dev_close(port_id_);
    configured_ = false;
  }
  if (!hotplug_bus_.empty()) {
    rte_eal_hotplug_remove(hotplug_bus_.c_str(), hotplug_name_.c_str());
    hotplug_bus_.clear();
  }
  // Pools go last: a closed port no longer references their mbufs.
  if (rx_pool_) rte_mempool_free(rx_pool_);
  if (hdr_pool_) rte_mempool_free(hdr_pool_);
  if (ext_pool_) rte_mempool_free(ext_pool_);
  rx_pool_ = hdr_pool_ = ext_pool_ = nullptr;
}

Port::~Port() {
  close();
}

}  // namespace genie::dataplane
