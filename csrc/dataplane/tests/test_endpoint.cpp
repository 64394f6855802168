// The endpoint's protocol, deterministic and in one process: two endpoints over a pair of
// cross-connected net_ring ports (each port's TX ring is the other's RX ring), polled in turn.
// Covers grants, reassembly into scattered destinations, a NACKed hole, a lost tail repaired
// by a probe, both directions at once through a small ring (draining while blocked), a peer
// that closes and a peer that goes silent (PeerTimeout, never a hang).
#include <rte_eth_ring.h>
#include <rte_ring.h>

#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "check.h"
#include "dataplane/eal.h"
#include "dataplane/endpoint.h"

using namespace genie::dataplane;

namespace {

int g_pairs = 0;

struct Pair {
  std::unique_ptr<Endpoint> a, b;
};

// Two endpoints joined by rings of `ring_size` packets.
Pair make_pair(EndpointConfig ca, EndpointConfig cb, unsigned ring_size = 1024) {
  std::string tag = std::to_string(g_pairs++);
  rte_ring* r1 =
      rte_ring_create(("t1_" + tag).c_str(), ring_size, 0, RING_F_SP_ENQ | RING_F_SC_DEQ);
  rte_ring* r2 =
      rte_ring_create(("t2_" + tag).c_str(), ring_size, 0, RING_F_SP_ENQ | RING_F_SC_DEQ);
  int pa = rte_eth_from_rings(("ra_" + tag).c_str(), &r1, 1, &r2, 1, 0);
  int pb = rte_eth_from_rings(("rb_" + tag).c_str(), &r2, 1, &r1, 1, 0);
  Pair p;
  PortConfig port;
  port.rx_desc = port.tx_desc = 256;
  port.spec = "port:" + std::to_string(pa);
  Status s = Endpoint::create(ca, port, &p.a);
  CHECK(s.is_ok());
  port.spec = "port:" + std::to_string(pb);
  s = Endpoint::create(cb, port, &p.b);
  CHECK(s.is_ok());
  // Connect both: each one's hello needs the other to poll.
  for (int i = 0; i < 10000 && !(p.a->connected() && p.b->connected()); ++i) {
    if (!p.a->connected()) p.a->connect(0.05);
    if (!p.b->connected()) p.b->connect(0.05);
  }
  CHECK(p.a->connected() && p.b->connected());
  return p;
}

EndpointConfig config() {
  EndpointConfig c;
  c.chunk_bytes = 4000;
  c.rto_ms = 2;
  c.yield_after_polls = 0;
  return c;
}

// Polls both until `done` or `polls` iterations.
bool run(Pair& p, const std::function<bool()>& done, int polls = 2000000) {
  for (int i = 0; i < polls; ++i) {
    if (done()) return true;
    p.a->poll();
    p.b->poll();
  }
  return done();
}

std::vector<uint8_t> random_bytes(size_t n, uint32_t seed) {
  std::mt19937 g(seed);
  std::vector<uint8_t> v(n);
  for (auto& x : v) x = static_cast<uint8_t>(g());
  return v;
}

// One message a -> b, the destination posted in three uneven pieces.
bool transfer(Pair& p, uint64_t msg, const std::vector<uint8_t>& src, std::vector<uint8_t>& dst) {
  uint64_t n = src.size();
  dst.assign(n, 0);
  CHECK(p.a->send_begin(msg, n).is_ok());
  CHECK(p.a->send_provide(msg, 0, src.data(), n / 3).is_ok());
  CHECK(p.a->send_provide(msg, n / 3, src.data() + n / 3, n - n / 3).is_ok());
  CHECK(p.b->recv_begin(msg, n).is_ok());
  uint64_t cuts[] = {0, 100, n / 2 + 7, n};
  for (int i = 0; i < 3; ++i) {
    CHECK(p.b->recv_post(msg, cuts[i], dst.data() + cuts[i], cuts[i + 1] - cuts[i]).is_ok());
  }
  return run(p, [&] { return p.b->recv_done(msg) >= n && p.a->send_released(msg) >= n; });
}

void lossless_transfer_lands_in_place() {
  Pair p = make_pair(config(), config());
  auto src = random_bytes(1 << 20, 1);
  std::vector<uint8_t> dst;
  CHECK(transfer(p, 1, src, dst));
  CHECK(src == dst);
  CHECK_EQ(p.a->stats().chunks_retransmitted, 0u);
  CHECK_EQ(p.a->stats().messages_sent, 1u);
  CHECK_EQ(p.b->stats().messages_received, 1u);
  // A second message on the same pair, then a zero-length one.
  auto src2 = random_bytes(50000, 2);
  CHECK(transfer(p, 2, src2, dst));
  CHECK(src2 == dst);
}

void a_hole_is_nacked_and_resent() {
  EndpointConfig ca = config();
  ca.drop_chunks = {3, 4, 40};
  Pair p = make_pair(ca, config());
  auto src = random_bytes(400000, 3);
  std::vector<uint8_t> dst;
  CHECK(transfer(p, 1, src, dst));
  CHECK(src == dst);
  CHECK_EQ(p.a->stats().chunks_dropped, 3u);
  CHECK(p.b->stats().nacks_sent >= 1);
  CHECK(p.a->stats().chunks_retransmitted >= 3);
}

void a_lost_tail_is_found_by_a_probe() {
  EndpointConfig ca = config();
  ca.drop_chunks = {10};  // the last chunk: no later one shows the hole
  Pair p = make_pair(ca, config());
  uint64_t n = 10ull * p.a->chunk_bytes();
  auto src = random_bytes(n, 4);
  std::vector<uint8_t> dst;
  CHECK(transfer(p, 1, src, dst));
  CHECK(src == dst);
  CHECK(p.a->stats().probes_sent >= 1);
  CHECK_EQ(p.a->stats().chunks_retransmitted, 1u);
}

void checksummed_payloads_arrive_intact() {
  EndpointConfig c = config();
  c.payload_checksum = true;
  c.loss_rate = 0.1;
  c.loss_seed = 11;
  Pair p = make_pair(c, config());
  auto src = random_bytes(300001, 5);
  std::vector<uint8_t> dst;
  CHECK(transfer(p, 7, src, dst));
  CHECK(src == dst);
  CHECK_EQ(p.b->stats().checksum_errors, 0u);
  CHECK(p.a->stats().chunks_dropped > 0);
}

void both_directions_through_a_small_ring() {
  // 16-packet rings fill at once; each side must drain while its TX is refused.
  Pair p = make_pair(config(), config(), 16);
  auto x = random_bytes(2 << 20, 6), y = random_bytes(2 << 20, 7);
  std::vector<uint8_t> gx(x.size()), gy(y.size());
  CHECK(p.a->send_begin(1, x.size()).is_ok());
  CHECK(p.a->send_provide(1, 0, x.data(), x.size()).is_ok());
  CHECK(p.b->send_begin(1, y.size()).is_ok());
  CHECK(p.b->send_provide(1, 0, y.data(), y.size()).is_ok());
  CHECK(p.a->recv_begin(1, y.size()).is_ok());
  CHECK(p.a->recv_post(1, 0, gy.data(), gy.size()).is_ok());
  CHECK(p.b->recv_begin(1, x.size()).is_ok());
  CHECK(p.b->recv_post(1, 0, gx.data(), gx.size()).is_ok());
  CHECK(run(p, [&] {
    return p.a->recv_done(1) >= y.size() && p.b->recv_done(1) >= x.size() &&
           p.a->send_released(1) >= x.size() && p.b->send_released(1) >= y.size();
  }));
  CHECK(gx == x && gy == y);
  CHECK(p.a->stats().tx_full + p.b->stats().tx_full > 0);
  CHECK(p.a->stats().drained_while_tx_full + p.b->stats().drained_while_tx_full > 0);
}

void a_closed_peer_fails_the_transfer() {
  Pair p = make_pair(config(), config());
  auto src = random_bytes(100000, 8);
  CHECK(p.a->send_begin(1, src.size()).is_ok());
  CHECK(p.a->send_provide(1, 0, src.data(), src.size()).is_ok());
  run(p, [] { return false; }, 1000);
  // b closes without receiving (on its own thread: close waits for a's acknowledgement, and
  // ring ports pass mbufs by pointer, so b's pools must outlive what a still reads).
  std::thread closer([&] { p.b->close(); });
  Status s = p.a->send_wait(1, src.size(), 2000);
  closer.join();
  CHECK_EQ(static_cast<int>(s.code()), static_cast<int>(Code::PeerGone));
  CHECK(s.message().find("closed") != std::string::npos);
}

void a_silent_peer_times_out() {
  EndpointConfig ca = config();
  ca.peer_timeout_ms = 150;
  ca.keepalive_ms = 20;
  Pair p = make_pair(ca, config());
  auto src = random_bytes(100000, 9);
  CHECK(p.a->send_begin(1, src.size()).is_ok());
  CHECK(p.a->send_provide(1, 0, src.data(), src.size()).is_ok());
  // b never polls again (a hung process): a gives up after peer_timeout, it does not hang.
  Status s = p.a->send_wait(1, src.size(), 5000);
  CHECK_EQ(static_cast<int>(s.code()), static_cast<int>(Code::PeerTimeout));
  CHECK(!p.a->health().is_ok());
}

}  // namespace

int main() {
  EalConfig eal;
  eal.memory_mb = 256;
  Status s = Eal::ensure(eal);
  if (!s) {
    std::fprintf(stderr, "EAL: %s\n", s.to_string().c_str());
    return 1;
  }
  RUN(lossless_transfer_lands_in_place);
  RUN(a_hole_is_nacked_and_resent);
  RUN(a_lost_tail_is_found_by_a_probe);
  RUN(checksummed_payloads_arrive_intact);
  RUN(both_directions_through_a_small_ring);
  RUN(a_closed_peer_fails_the_transfer);
  RUN(a_silent_peer_times_out);
  return genie::dataplane::testing::failures() ? 1 : 0;
}
