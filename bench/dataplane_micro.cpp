// Data-plane microbenchmarks (bench/bench_dataplane.py builds and runs them, in fresh processes):
//
//   dataplane_micro memif server|client SOCKET SIZES ITERS [key=value ...]
//       the endpoint over net_memif between two processes: GB/s per size (client sends, server
//       receives and checks the bytes), then 64-byte round trips (raw ping, and a 64-byte
//       message each way)
//   dataplane_micro tcp server|client PORT SIZES ITERS      the same transfers over TCP loopback
//   dataplane_micro memcpy SIZES ITERS                      memcpy into a preallocated buffer
//   dataplane_micro registration SIZES ITERS                rte_extmem_register cost vs an LRU hit
//
// SIZES is a comma list such as 1M,16M,256M. Each result is one JSON line on stdout.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "dataplane/config.h"
#include "dataplane/eal.h"
#include "dataplane/endpoint.h"
#include "dataplane/registration.h"
#include "dataplane/registration_dpdk.h"

using namespace genie::dataplane;
using Clock = std::chrono::steady_clock;

namespace {

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

std::vector<uint64_t> parse_sizes(const std::string& s) {
  std::vector<uint64_t> out;
  for (const auto& item : split(s, ',')) {
    Options o{{"x", item}};
    uint64_t v = 0;
    option_u64(o, "x", &v);
    out.push_back(v);
  }
  return out;
}

void* big_buffer(uint64_t n, uint8_t fill_seed) {
  void* p = mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) {
    std::perror("mmap");
    std::exit(1);
  }
  auto* b = static_cast<uint8_t*>(p);
  for (uint64_t i = 0; i < n; ++i) b[i] = static_cast<uint8_t>(i * 131 + fill_seed + (i >> 12));
  return p;
}

uint64_t digest(const void* p, uint64_t n) {
  return payload_sum(p, n);
}

[[noreturn]] void die(const Status& s) {
  std::fprintf(stderr, "dataplane_micro: %s\n", s.to_string().c_str());
  std::exit(1);
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

double percentile(std::vector<double> v, double q) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[std::min(v.size() - 1, static_cast<size_t>(q * v.size()))];
}

// -- memif ------------------------------------------------------------------------------------

int run_memif(bool server, const std::string& socket, const std::vector<uint64_t>& sizes, int iters,
              const std::vector<std::string>& extra) {
  Options o;
  parse_options(extra, &o);
  EalConfig ecfg;
  PortConfig pcfg;
  EndpointConfig cfg;
  Status s = EalConfig::from_options(o, &ecfg);
  if (s) s = PortConfig::from_options(o, &pcfg);
  if (s) s = EndpointConfig::from_options(o, &cfg);
  if (!s) die(s);
  if (!o.count("port")) {
    pcfg.spec = std::string("memif:role=") + (server ? "server" : "client") + ",socket=" + socket;
  }
  s = Eal::ensure(ecfg);
  if (!s) die(s);
  std::unique_ptr<Endpoint> ep;
  s = Endpoint::create(cfg, pcfg, &ep);
  if (!s) die(s);
  s = ep->connect(20000);
  if (!s) die(s);
  uint64_t msg = 1;
  {
    // Warm-up: the first pass over memif's rings and the mempools takes page faults (first
    // touch of shared memory); measure the steady state a long-lived connection runs in.
    const uint64_t warm = 64ull << 20;
    void* buf = big_buffer(warm, 0);
    s = server ? ep->recv(msg, buf, warm, 60000) : ep->send(msg, buf, warm, 60000);
    if (!s) die(s);
    ++msg;
    munmap(buf, warm);
  }
  for (uint64_t size : sizes) {
    void* buf = big_buffer(size, server ? 0 : 7);
    std::vector<double> times;
    for (int i = 0; i < iters + 1; ++i) {  // the first round warms up
      auto t0 = Clock::now();
      s = server ? ep->recv(msg, buf, size, 60000) : ep->send(msg, buf, size, 60000);
      if (!s) die(s);
      if (i) times.push_back(seconds_since(t0));
      ++msg;
    }
    // Both sides compare a digest of the bytes: the receiver's must equal the sender's.
    uint64_t d = digest(buf, size);
    std::printf(
        "{\"bench\": \"memif\", \"role\": \"%s\", \"bytes\": %llu, \"seconds\": %.9f, "
        "\"gbps\": %.4f, \"digest\": %llu}\n",
        server ? "server" : "client", (unsigned long long)size, median(times),
        size / median(times) / 1e9, (unsigned long long)d);
    std::fflush(stdout);
    munmap(buf, size);
  }
  // 64-byte round trips: raw ping (client pings, server's poll answers) and a message each way.
  const int n = std::max(2000, iters * 200);
  if (!server) {
    std::vector<double> rtt;
    for (int i = 0; i < n; ++i) {
      double us;
      s = ep->ping(64, 5000, &us);
      if (!s) die(s);
      rtt.push_back(us);
    }
    std::printf(
        "{\"bench\": \"memif_ping\", \"bytes\": 64, \"median_us\": %.3f, \"p99_us\": %.3f}\n",
        median(rtt), percentile(rtt, 0.99));
    std::fflush(stdout);
  }
  // Message round trips: client sends 64 bytes, server sends them back.
  char small[64] = {1};
  std::vector<double> mrtt;
  // The server answers pings by polling: keep it polling until the client's messages start.
  for (int i = 0; i < n; ++i) {
    auto t0 = Clock::now();
    if (server) {
      s = ep->recv(msg, small, 64, 60000);
      if (s) s = ep->send(msg, small, 64, 60000);
    } else {
      s = ep->send(msg, small, 64, 60000);
      if (s) s = ep->recv(msg, small, 64, 60000);
    }
    if (!s) die(s);
    mrtt.push_back(seconds_since(t0) * 1e6);
    ++msg;
  }
  if (!server) {
    std::printf(
        "{\"bench\": \"memif_message_rtt\", \"bytes\": 64, \"median_us\": %.3f, \"p99_us\": "
        "%.3f}\n",
        median(mrtt), percentile(mrtt, 0.99));
  }
  const auto& st = ep->stats();
  std::printf(
      "{\"bench\": \"memif_stats\", \"role\": \"%s\", \"chunk_bytes\": %u, \"chunks_sent\": %llu, "
      "\"chunks_received\": %llu, \"retransmitted\": %llu, \"tx_full\": %llu, "
      "\"drained_while_tx_full\": %llu, \"eal_init_s\": %.3f}\n",
      server ? "server" : "client", ep->chunk_bytes(), (unsigned long long)st.chunks_sent,
      (unsigned long long)st.chunks_received, (unsigned long long)st.chunks_retransmitted,
      (unsigned long long)st.tx_full, (unsigned long long)st.drained_while_tx_full,
      Eal::init_seconds());
  std::fflush(stdout);
  ep->close();
  return 0;
}

// -- TCP loopback -----------------------------------------------------------------------------

void tune(int fd) {
  int one = 1, buf = 4 << 20;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &buf, sizeof(buf));
  setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &buf, sizeof(buf));
}

void send_all(int fd, const void* p, uint64_t n) {
  auto* b = static_cast<const uint8_t*>(p);
  while (n) {
    ssize_t k = ::send(fd, b, n, 0);
    if (k <= 0) {
      std::perror("send");
      std::exit(1);
    }
    b += k;
    n -= k;
  }
}

void recv_all(int fd, void* p, uint64_t n) {
  auto* b = static_cast<uint8_t*>(p);
  while (n) {
    ssize_t k = ::recv(fd, b, n, 0);
    if (k <= 0) {
      std::perror("recv");
      std::exit(1);
    }
    b += k;
    n -= k;
  }
}

int run_tcp(bool server, int port, const std::vector<uint64_t>& sizes, int iters) {
  int fd;
  if (server) {
    int ls = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(ls, reinterpret_cast<sockaddr*>(&a), sizeof(a)) || listen(ls, 1)) {
      std::perror("bind/listen");
      return 1;
    }
    std::printf("{\"bench\": \"tcp_listening\"}\n");
    std::fflush(stdout);
    fd = accept(ls, nullptr, nullptr);
    close(ls);
  } else {
    fd = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int tries = 0;
    while (connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) {
      if (++tries > 200) {
        std::perror("connect");
        return 1;
      }
      usleep(20000);
      close(fd);
      fd = socket(AF_INET, SOCK_STREAM, 0);
    }
  }
  tune(fd);
  for (uint64_t size : sizes) {
    void* buf = big_buffer(size, server ? 0 : 7);
    std::vector<double> times;
    char ack = 0;
    for (int i = 0; i < iters + 1; ++i) {
      auto t0 = Clock::now();
      // An acknowledgement per message, as the data plane does: same semantics, same clock.
      if (server) {
        recv_all(fd, buf, size);
        send_all(fd, &ack, 1);
      } else {
        send_all(fd, buf, size);
        recv_all(fd, &ack, 1);
      }
      if (i) times.push_back(seconds_since(t0));
    }
    std::printf(
        "{\"bench\": \"tcp\", \"role\": \"%s\", \"bytes\": %llu, \"seconds\": %.9f, "
        "\"gbps\": %.4f, \"digest\": %llu}\n",
        server ? "server" : "client", (unsigned long long)size, median(times),
        size / median(times) / 1e9, (unsigned long long)digest(buf, size));
    std::fflush(stdout);
    munmap(buf, size);
  }
  char small[64] = {0};
  std::vector<double> rtt;
  for (int i = 0; i < std::max(2000, iters * 200); ++i) {
    auto t0 = Clock::now();
    if (server) {
      recv_all(fd, small, 64);
      send_all(fd, small, 64);
    } else {
      send_all(fd, small, 64);
      recv_all(fd, small, 64);
    }
    rtt.push_back(seconds_since(t0) * 1e6);
  }
  if (!server) {
    std::printf("{\"bench\": \"tcp_rtt\", \"bytes\": 64, \"median_us\": %.3f, \"p99_us\": %.3f}\n",
                median(rtt), percentile(rtt, 0.99));
  }
  close(fd);
  return 0;
}

// -- memcpy -----------------------------------------------------------------------------------

int run_memcpy(const std::vector<uint64_t>& sizes, int iters) {
  for (uint64_t size : sizes) {
    void* src = big_buffer(size, 3);
    void* dst = big_buffer(size, 0);
    std::vector<double> times;
    for (int i = 0; i < iters + 1; ++i) {
      auto t0 = Clock::now();
      std::memcpy(dst, src, size);
      if (i) times.push_back(seconds_since(t0));
    }
    std::printf("{\"bench\": \"memcpy\", \"bytes\": %llu, \"seconds\": %.9f, \"gbps\": %.4f}\n",
                (unsigned long long)size, median(times), size / median(times) / 1e9);
    std::fflush(stdout);
    munmap(src, size);
    munmap(dst, size);
  }
  return 0;
}

// -- registration -----------------------------------------------------------------------------

int run_registration(const std::vector<uint64_t>& sizes, int iters) {
  EalConfig ecfg;
  Status s = Eal::ensure(ecfg);
  if (!s) die(s);
  Status why;
  auto backend = make_dpdk_extmem_backend({}, &why);
  if (!backend) die(why);
  RegistrationCache cache(std::move(backend), {});
  for (uint64_t size : sizes) {
    void* buf = big_buffer(size, 1);
    std::vector<double> reg;
    Region r;
    for (int i = 0; i < iters; ++i) {
      cache.invalidate(buf, size);  // unregisters: the next acquire registers afresh
      auto t0 = Clock::now();
      s = cache.acquire(buf, size, &r);
      reg.push_back(seconds_since(t0) * 1e6);
      if (!s) die(s);
    }
    const int hits = 1000000;
    auto t0 = Clock::now();
    for (int i = 0; i < hits; ++i) cache.acquire(buf, size, &r);
    double hit_ns = seconds_since(t0) * 1e9 / hits;
    std::printf(
        "{\"bench\": \"registration\", \"backend\": \"dpdk\", \"bytes\": %llu, "
        "\"register_us\": %.3f, \"hit_ns\": %.2f}\n",
        (unsigned long long)size, median(reg), hit_ns);
    std::fflush(stdout);
    cache.invalidate(buf, size);
    munmap(buf, size);
  }
  // The lookup alone, with 500 entries resident (the default capacity).
  RegistrationCache full(std::make_unique<NullBackend>(), {});
  std::vector<char> arena(500 * 64);
  Region r;
  for (int i = 0; i < 500; ++i) full.acquire(arena.data() + 64 * i, 64, &r);
  const int hits = 2000000;
  auto t0 = Clock::now();
  for (int i = 0; i < hits; ++i) full.acquire(arena.data() + 64 * (i % 500), 64, &r);
  std::printf("{\"bench\": \"registration_hit_500\", \"backend\": \"null\", \"hit_ns\": %.2f}\n",
              seconds_since(t0) * 1e9 / hits);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: see the header of bench/dataplane_micro.cpp\n");
    return 2;
  }
  std::string mode = argv[1];
  std::vector<std::string> rest(argv + 2, argv + argc);
  auto arg = [&](size_t i, const char* dflt) {
    return i < rest.size() ? rest[i] : std::string(dflt);
  };
  if (mode == "memif") {
    std::vector<std::string> extra(rest.size() > 4 ? rest.begin() + 4 : rest.end(), rest.end());
    return run_memif(arg(0, "client") == "server", arg(1, "genie-bench"), parse_sizes(arg(2, "1M")),
                     std::atoi(arg(3, "5").c_str()), extra);
  }
  if (mode == "tcp") {
    return run_tcp(arg(0, "client") == "server", std::atoi(arg(1, "7399").c_str()),
                   parse_sizes(arg(2, "1M")), std::atoi(arg(3, "5").c_str()));
  }
  if (mode == "memcpy")
    return run_memcpy(parse_sizes(arg(0, "1M")), std::atoi(arg(1, "5").c_str()));
  if (mode == "registration") {
    return run_registration(parse_sizes(arg(0, "1M")), std::atoi(arg(1, "5").c_str()));
  }
  std::fprintf(stderr, "dataplane_micro: unknown mode %s\n", mode.c_str());
  return 2;
}
