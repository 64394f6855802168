// The data-plane agent's loop (Note: [Data-plane agent] in agent_protocol.h): one endpoint,
// driven by commands on a socket, with the arena as its payload memory. genie-dpdk-agent
// (agent_main.cpp) runs it as a process; the in-process mode (Note: [In-process endpoint] in
// agent_protocol.h) runs it on a thread of the user's process (inprocess.cpp).
#include "dataplane/agent_loop.h"

#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <rte_cycles.h>

#include "dataplane/agent_protocol.h"
#include "dataplane/config.h"
#include "dataplane/eal.h"
#include "dataplane/endpoint.h"
#include "dataplane/registration_dpdk.h"

namespace genie::dataplane {

namespace {

// Per agent: a process runs one, the in-process mode one thread per connection.
thread_local int g_sock = -1;

void emit(AgentEventType type, uint64_t msg = 0, uint64_t value = 0, uint64_t cookie = 0,
          const Status& st = Status::ok(), const std::string& text = "") {
  AgentEvent ev;
  std::memset(&ev, 0, sizeof(ev));
  ev.type = static_cast<uint32_t>(type);
  ev.code = static_cast<int32_t>(st.code());
  ev.msg = msg;
  ev.value = value;
  ev.cookie = cookie;
  const std::string& t = text.empty() ? st.message() : text;
  std::snprintf(ev.text, sizeof(ev.text), "%s", t.c_str());
  while (::send(g_sock, &ev, sizeof(ev), MSG_NOSIGNAL) < 0 && errno == EINTR) {
  }
}

// 1: a command was read; 0: none waiting; -1: the client is gone.
int read_command(AgentCommand* c, int wait_ms) {
  if (wait_ms != 0) {
    pollfd pfd{g_sock, POLLIN, 0};
    int r = ::poll(&pfd, 1, wait_ms);
    if (r == 0) return 0;
    if (r < 0) return errno == EINTR ? 0 : -1;
  }
  ssize_t n = ::recv(g_sock, c, sizeof(*c), MSG_DONTWAIT);
  if (n == static_cast<ssize_t>(sizeof(*c))) return 1;
  if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) return 0;
  return -1;
}

// The Arena event, with EAL's memory file attached (Note: [Arena in EAL memory]).
Status send_arena(const SharedEalMemory& shared) {
  EventWithFd m;  // zero-filled
  m.ev.type = static_cast<uint32_t>(AgentEventType::Arena);
  m.ev.value = shared.offset;
  cmsghdr* cm = CMSG_FIRSTHDR(&m.mh);
  cm->cmsg_level = SOL_SOCKET;
  cm->cmsg_type = SCM_RIGHTS;
  cm->cmsg_len = CMSG_LEN(sizeof(int));
  std::memcpy(CMSG_DATA(cm), &shared.fd, sizeof(int));
  while (::sendmsg(g_sock, &m.mh, MSG_NOSIGNAL) < 0) {
    if (errno != EINTR)
      return {Code::Internal, std::string("genie: cannot hand the arena over: ") +
                                  std::strerror(errno)};
  }
  return Status::ok();
}

thread_local bool g_gpudev = false;     // a gpudev driver reported a GPU
thread_local bool g_eal_arena = false;  // Note: [Arena in EAL memory] in eal.h

std::string stats_text(const Endpoint* ep, const RegistrationCache* cache,
                       const RegistrationCache* user_cache = nullptr) {
  std::string s;
  auto add = [&](const char* k, uint64_t v) {
    s += std::string(k) + "=" + std::to_string(v) + " ";
  };
  if (ep) {
    const auto& st = ep->stats();
    add("messages_sent", st.messages_sent);
    add("messages_received", st.messages_received);
    add("bytes_sent", st.bytes_sent);
    add("bytes_received", st.bytes_received);
    add("bytes_staged", st.bytes_staged);
    add("chunks_sent", st.chunks_sent);
    add("chunks_received", st.chunks_received);
    add("chunks_retransmitted", st.chunks_retransmitted);
    add("chunks_dropped", st.chunks_dropped);
    add("duplicates", st.duplicates);
    add("checksum_errors", st.checksum_errors);
    add("bad_packets", st.bad_packets);
    add("nacks_sent", st.nacks_sent);
    add("nack_ranges_received", st.nack_ranges_received);
    add("probes_sent", st.probes_sent);
    add("tx_full", st.tx_full);
    add("drained_while_tx_full", st.drained_while_tx_full);
    add("chunk_bytes", ep->chunk_bytes());
    add("zero_copy_ring", ep->port().zero_copy() ? 1 : 0);
    add("arena_in_eal", g_eal_arena ? 1 : 0);
  }
  if (cache || user_cache) {
    RegistrationCache::Stats cs, us;
    if (cache) cs = cache->stats();
    if (user_cache) us = user_cache->stats();
    add("registration_hits", cs.hits + us.hits);
    add("registration_misses", cs.misses + us.misses);
    add("registered_bytes", cs.registered_bytes + us.registered_bytes);
  }
  add("eal_init_us", static_cast<uint64_t>(Eal::init_seconds() * 1e6));
  add("gpudev_available", g_gpudev ? 1 : 0);
  return s;
}

// After a fatal error: keep answering Stats/Close until the client leaves.
int serve_until_closed(const Endpoint* ep, const RegistrationCache* cache,
                       const RegistrationCache* user_cache = nullptr) {
  while (true) {
    AgentCommand c;
    int r = read_command(&c, 1000);
    if (r < 0) return 1;
    if (r == 0) continue;
    if (c.op == static_cast<uint32_t>(AgentOp::Stats)) {
      emit(AgentEventType::Stats, 0, 0, 0, Status::ok(), stats_text(ep, cache, user_cache));
    } else if (c.op == static_cast<uint32_t>(AgentOp::Close)) {
      emit(AgentEventType::Closed);
      return 1;
    } else {
      emit(AgentEventType::Error, c.msg, 0, c.cookie,
           ep ? ep->health() : Status(Code::Closed, "genie: the data-plane agent failed"));
    }
  }
}

struct Pending {
  uint64_t msg;
  uint64_t end;
  uint64_t cookie;
  const void* pinned = nullptr;  // user memory pinned in the registration cache until done
  uint64_t pinned_len = 0;
};

// In-process agents' caches of user memory, for invalidation when a storage is freed.
std::mutex g_user_caches_mu;
std::vector<RegistrationCache*> g_user_caches;

}  // namespace

void invalidate_user_memory(const void* addr, size_t len) {
  std::lock_guard<std::mutex> lock(g_user_caches_mu);
  for (auto* c : g_user_caches) c->invalidate(addr, len);
}

int run_agent(int sock, int arena_fd, uint64_t arena_bytes, const std::vector<std::string>& items,
              bool in_process) {
  g_sock = sock;
  struct CloseSock {
    ~CloseSock() { ::close(g_sock); }
  } close_sock;
  Options opts;
  EalConfig ecfg;
  PortConfig pcfg;
  EndpointConfig cfg;
  Status s = parse_options(items, &opts);
  if (s) s = EalConfig::from_options(opts, &ecfg);
  if (s) s = PortConfig::from_options(opts, &pcfg);
  if (s) s = EndpointConfig::from_options(opts, &cfg);
  if (!s) {
    emit(AgentEventType::Error, 0, 0, 0, s);
    return serve_until_closed(nullptr, nullptr);
  }
  // arena_fd < 0: the arena is ours to make, in EAL memory (Note: [Arena in EAL memory]).
  uint8_t* arena = nullptr;
  if (arena_fd >= 0) {
    void* p = mmap(nullptr, arena_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, arena_fd, 0);
    if (p == MAP_FAILED) {
      emit(AgentEventType::Error, 0, 0, 0,
           Status(Code::NoMemory,
                  std::string("genie: agent cannot map the arena: ") + std::strerror(errno)));
      return serve_until_closed(nullptr, nullptr);
    }
    ::close(arena_fd);
    arena = static_cast<uint8_t*>(p);
  }
  struct Unmap {
    uint8_t* p;
    uint64_t n;
    ~Unmap() {
      if (p) munmap(p, n);
    }
  } unmap{arena, arena_bytes};

  s = Eal::ensure(ecfg);
  if (!s) {
    emit(AgentEventType::Error, 0, 0, 0, s);
    return serve_until_closed(nullptr, nullptr);
  }
  if (!arena) {
    SharedEalMemory shared;
    s = reserve_shared_memory("genie_arena", arena_bytes, &shared);
    if (s) s = send_arena(shared);
    if (!s) {
      emit(AgentEventType::Error, 0, 0, 0, s);
      return serve_until_closed(nullptr, nullptr);
    }
    arena = shared.addr;
    g_eal_arena = true;
  }
  std::unique_ptr<Endpoint> ep;
  s = Endpoint::create(cfg, pcfg, &ep);
  if (!s) {
    emit(AgentEventType::Error, 0, 0, 0, s);
    return serve_until_closed(nullptr, nullptr);
  }
  emit(AgentEventType::PortUp, 0, ep->chunk_bytes());
  {
    Status why;
    g_gpudev = make_gpudev_backend({ep->port().device()}, &why) != nullptr;
  }

  // The arena is the only payload memory the endpoint touches: register it once (Note:
  // [Registration cache]); ports that DMA need it, memif does not. A zero-copy memif client
  // must not: its regions are every memseg list EAL has (rte_memseg_walk includes external
  // ones), and external memory has no fd to share (rte_memseg_get_fd: ENOTSUP), so the
  // connection would fail (Note: [memif zero copy] in port.cpp).
  std::unique_ptr<RegistrationCache> cache;
  uint64_t arena_iova = kNoIova;
  if (!ep->port().zero_copy()) {
    Status why;
    auto backend = make_dpdk_extmem_backend({ep->port().device()}, &why);
    if (backend) {
      cache = std::make_unique<RegistrationCache>(std::move(backend),
                                                  RegistrationCache::Options{16, 1e12});
      Region r;
      why = cache->acquire(arena, arena_bytes, &r, /*pin=*/true);
      if (why) arena_iova = r.iova;
    }
    if (!why && ep->port().needs_iova()) {
      emit(AgentEventType::Error, 0, 0, 0, why);
      return serve_until_closed(ep.get(), cache.get());
    }
  }

  // In process, the endpoint reads the caller's memory where it is: each buffer sent is
  // registered on first use (extmem + DMA mapping for ports that DMA) and hits later (Note:
  // [Registration cache]); freeing its storage invalidates it (invalidate_user_memory).
  std::unique_ptr<RegistrationCache> user_cache;
  struct Unlist {
    RegistrationCache* c = nullptr;
    ~Unlist() {
      if (!c) return;
      std::lock_guard<std::mutex> lock(g_user_caches_mu);
      g_user_caches.erase(std::find(g_user_caches.begin(), g_user_caches.end(), c));
    }
  } unlist;
  if (in_process && ep->port().zero_copy()) {
    // It registers user memory as external memory, which a later connection's memif region
    // walk cannot share (above).
    emit(AgentEventType::Error, 0, 0, 0,
         Status(Code::Unsupported, "genie: memif zero-copy=yes needs a process agent, not "
                                   "GENIE_DPDK_IN_PROCESS=1"));
    return serve_until_closed(ep.get(), cache.get());
  }
  if (in_process) {
    Status why;
    auto backend = make_dpdk_extmem_backend({ep->port().device()}, &why);
    if (!backend) {
      emit(AgentEventType::Error, 0, 0, 0, why);
      return serve_until_closed(ep.get(), cache.get());
    }
    user_cache = std::make_unique<RegistrationCache>(std::move(backend),
                                                     RegistrationCache::Options{500, 300.0});
    std::lock_guard<std::mutex> lock(g_user_caches_mu);
    g_user_caches.push_back(user_cache.get());
    unlist.c = user_cache.get();
  }

  // Connect, watching for the client leaving meanwhile.
  double connect_deadline = cfg.connect_timeout_ms;
  uint64_t t0 = rte_get_tsc_cycles();
  const double tsc_ms = static_cast<double>(rte_get_tsc_hz()) / 1000.0;
  while (true) {
    s = ep->connect(50);
    if (s) break;
    if (s.code() != Code::PeerTimeout) break;
    char probe;
    if (::recv(g_sock, &probe, 1, MSG_PEEK | MSG_DONTWAIT) == 0) return 0;  // client gone
    if ((rte_get_tsc_cycles() - t0) / tsc_ms > connect_deadline) break;
  }
  if (!s) {
    emit(AgentEventType::Error, 0, 0, 0, s);
    return serve_until_closed(ep.get(), cache.get(), user_cache.get());
  }
  emit(AgentEventType::Ready, 0, ep->chunk_bytes());

  // Note: [Waiting on the peer]
  // Most waits in an exchange are for the other side's processes: its user posting a receive
  // (the grant), its agent placing the last chunk (the acknowledgement). A waiting agent first
  // spins (an answer in microseconds), then yields its core for spin_ms, then sleeps 50 us at a
  // time. Which middle step is right depends on the load, measured on a 2-core VM with 16 MB
  // zero-copy exchanges:
  //   - other work running (load average 5), DPDK connections differing only in spin_ms taking
  //     turns with a TCP one between the same two processes: yielding 1 ms 1.99 GB/s, 0.3 ms
  //     2.48, 0.1 ms 2.87, not at all 2.95 (TCP 1.9). A yielding agent stays runnable, uses up
  //     its share and sits in the run queue when the answer comes;
  //   - a quieter machine (load average 1.5-2), bench/bench_dataplane_zerocopy.py --sizes 16 in
  //     alternating runs: yielding 1 ms 9.2-11.6 GB/s (2.3-3.1x TCP), not at all 6.9-8.1 GB/s
  //     (1.7-2.1x): a sleeping agent notices each answer up to a timer step late.
  // The default keeps the quiet machine's 1 ms; `spin_ms=0` in GENIE_DPDK_OPTIONS suits hosts
  // whose cores are all taken.
  const double spin_ms = cfg.spin_ms;

  std::deque<Pending> sends, recvs;
  bool reported = false;
  uint64_t quiet = 0;        // polls without progress
  uint64_t quiet_since = 0;  // TSC when the quiet stretch began
  uint32_t iteration = 0;
  while (true) {
    bool worked = ep->poll();
    // Commands: every few iterations while busy, at once when quiet.
    if (!worked || (++iteration & 31) == 0) {
      AgentCommand c;
      int r;
      while ((r = read_command(&c, 0)) == 1) {
        worked = true;
        Status cs;
        bool in_arena = c.arena_offset <= arena_bytes && c.len <= arena_bytes - c.arena_offset;
        // In process only: arena_offset is the address of the caller's memory.
        bool pointer = in_process && (c.reserved & kAgentPointer);
        switch (static_cast<AgentOp>(c.op)) {
          case AgentOp::SendBegin: cs = ep->send_begin(c.msg, c.len); break;
          case AgentOp::SendProvide:
            if (pointer) {
              Region r;
              const void* p = reinterpret_cast<const void*>(c.arena_offset);
              cs = user_cache->acquire(p, c.len, &r, /*pin=*/true);
              if (!cs) break;
              cs = ep->send_provide(c.msg, c.offset, p, c.len, r.iova);
              if (cs) {
                sends.push_back({c.msg, c.offset + c.len, c.cookie, p, c.len});
              } else {
                user_cache->unpin(p, c.len);
              }
              break;
            }
            if (!in_arena) {
              cs = {Code::InvalidArgument, "genie: agent command outside the arena"};
              break;
            }
            cs = ep->send_provide(c.msg, c.offset, arena + c.arena_offset, c.len,
                                  arena_iova == kNoIova ? kNoIova : arena_iova + c.arena_offset);
            if (cs) sends.push_back({c.msg, c.offset + c.len, c.cookie});
            break;
          case AgentOp::RecvBegin: cs = ep->recv_begin(c.msg, c.len); break;
          case AgentOp::RecvPost:
            if (pointer) {  // the endpoint copies each chunk out of its mbuf: no registration
              cs = ep->recv_post(c.msg, c.offset, reinterpret_cast<void*>(c.arena_offset), c.len);
              if (cs) recvs.push_back({c.msg, c.offset + c.len, c.cookie});
              break;
            }
            if (!in_arena) {
              cs = {Code::InvalidArgument, "genie: agent command outside the arena"};
              break;
            }
            cs = ep->recv_post(c.msg, c.offset, arena + c.arena_offset, c.len);
            if (cs) recvs.push_back({c.msg, c.offset + c.len, c.cookie});
            break;
          case AgentOp::Stats:
            emit(AgentEventType::Stats, 0, 0, 0, Status::ok(),
                 stats_text(ep.get(), cache.get(), user_cache.get()));
            break;
          case AgentOp::Ping: {
            double rtt = 0;
            cs = ep->ping(static_cast<uint32_t>(c.len), 1000.0, &rtt);
            if (cs) emit(AgentEventType::Pong, 0, static_cast<uint64_t>(rtt * 1000.0));
            break;
          }
          case AgentOp::Close:
            ep->close();
            emit(AgentEventType::Closed);
            return 0;
          default: cs = {Code::InvalidArgument, "genie: unknown agent command"};
        }
        if (!cs) {
          emit(AgentEventType::Error, c.msg, 0, c.cookie, cs);
          return serve_until_closed(ep.get(), cache.get(), user_cache.get());
        }
      }
      if (r < 0) {
        ep->close(Endpoint::CloseReason::OwnerExited);
        return 0;  // the client exited: nobody to serve
      }
    }
    while (!sends.empty() && ep->send_released(sends.front().msg) >= sends.front().end) {
      const Pending& done = sends.front();
      emit(AgentEventType::Sent, done.msg, done.end, done.cookie);
      if (done.pinned) user_cache->unpin(done.pinned, done.pinned_len);
      sends.pop_front();
      worked = true;
    }
    while (!recvs.empty() && ep->recv_done(recvs.front().msg) >= recvs.front().end) {
      emit(AgentEventType::Received, recvs.front().msg, recvs.front().end, recvs.front().cookie);
      recvs.pop_front();
      worked = true;
    }
    if (!ep->health().is_ok() && !reported) {
      reported = true;
      emit(AgentEventType::Error, 0, 0, 0, ep->health());
      return serve_until_closed(ep.get(), cache.get(), user_cache.get());
    }
    // Back off when nothing moves: spin briefly (a peer answering takes microseconds), yield
    // for up to spin_ms, then sleep in short steps while a transfer waits on the peer (Note:
    // [Waiting on the peer]), and block on the command socket when nothing is in flight at all.
    if (worked) {
      quiet = 0;
      continue;
    }
    if (quiet++ == 0) quiet_since = rte_get_tsc_cycles();
    double quiet_ms = (rte_get_tsc_cycles() - quiet_since) / tsc_ms;
    if (quiet_ms < 0.05) continue;
    if (ep->idle() && sends.empty() && recvs.empty() && quiet_ms > 2.0) {
      // Nothing in flight: block on the command socket (a command wakes it at once). Only the
      // peer's keepalives and a link going down wait for the timeout: 1 ms at first, 10 ms
      // once idle for a while (well inside the peer's timeout of seconds).
      pollfd pfd{g_sock, POLLIN, 0};
      ::poll(&pfd, 1, quiet_ms > 100.0 ? 10 : 1);
    } else if (quiet_ms < spin_ms) {
      sched_yield();
    } else {
      timespec ts{0, 50 * 1000};
      nanosleep(&ts, nullptr);
    }
  }
}

}  // namespace genie::dataplane
