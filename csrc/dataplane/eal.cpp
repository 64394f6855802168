#include "dataplane/eal.h"

#include <pthread.h>
#include <sched.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <map>
#include <mutex>
#include <random>

#include <rte_eal.h>
#include <rte_errno.h>
#include <rte_memory.h>
#include <rte_memzone.h>

namespace genie::dataplane {

namespace {

struct EalState {
  std::mutex mu;
  bool attempted = false;
  bool up = false;
  bool down = false;
  pid_t pid = 0;
  Status outcome;
  double seconds = 0;
  std::vector<std::string> args;
  std::map<int, std::function<void()>> closers;
  int next_token = 1;
};

// Never destroyed: ports may be closed from atexit after static destructors started.
EalState& state() {
  static auto* s = new EalState;
  return *s;
}

std::string cpu_list(const cpu_set_t& set) {
  std::string out;
  for (int c = 0; c < CPU_SETSIZE; ++c) {
    if (!CPU_ISSET(c, &set)) continue;
    if (!out.empty()) out += ",";
    out += std::to_string(c);
  }
  return out.empty() ? "0" : out;
}

std::string unique_prefix() {
  std::random_device rd;
  return "genie-" + std::to_string(getpid()) + "-" + std::to_string(rd() % 1000000);
}

}  // namespace

std::vector<std::string> Eal::build_args(const EalConfig& cfg) {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) != 0) CPU_SET(0, &set);
  std::vector<std::string> a = {"genie"};
  // One lcore (the thread that polls) allowed on every CPU this process may use: EAL must not
  // pin it to one core that torch also wants.
  a.push_back("--lcores=0@(" + cpu_list(set) + ")");
  if (cfg.no_huge) {
    a.push_back("--no-huge");
    // --no-huge always maps one file (eal_memory.c sets single_file_segments), but only after
    // the flag was published to the config memif's zero-copy check reads (memif_set_zc):
    // saying it up front makes that check see the truth (Note: [memif zero copy], port.cpp).
    a.push_back("--single-file-segments");
  }
  a.push_back("-m");
  a.push_back(std::to_string(cfg.memory_mb));
  if (cfg.pci_allow.empty()) {
    a.push_back("--no-pci");
  } else {
    for (const auto& p : cfg.pci_allow) {
      a.push_back("-a");
      a.push_back(p);
    }
  }
  a.push_back("--no-telemetry");
  a.push_back("--no-shconf");  // leave nothing behind in /var/run/dpdk
  a.push_back("--file-prefix=" + (cfg.file_prefix.empty() ? unique_prefix() : cfg.file_prefix));
  a.push_back("--log-level=" + cfg.log_level);
  for (const auto& d : cfg.drivers) {
    a.push_back("-d");
    a.push_back(d);
  }
  for (const auto& v : cfg.vdevs) a.push_back("--vdev=" + v);
  for (const auto& x : cfg.extra_args) {
    if (!x.empty()) a.push_back(x);
  }
  return a;
}

Status Eal::ensure(const EalConfig& cfg) {
  auto& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  if (s.attempted) {
    if (s.up && s.pid != getpid()) {
      return {Code::Unavailable,
              "genie: DPDK's EAL was initialised in process " + std::to_string(s.pid) +
                  " and cannot be used in a child forked from it; start a fresh process "
                  "(multiprocessing's 'spawn' start method)"};
    }
    if (s.down) return {Code::Closed, "genie: DPDK's EAL was shut down in this process"};
    return s.outcome;
  }
  s.attempted = true;
  s.args = build_args(cfg);
  std::vector<std::string> copy = s.args;  // rte_eal_init permutes argv
  std::vector<char*> argv;
  for (auto& x : copy) argv.push_back(x.data());
  argv.push_back(nullptr);

  pthread_t self = pthread_self();
  cpu_set_t before;
  bool have_before = pthread_getaffinity_np(self, sizeof(before), &before) == 0;
  auto t0 = std::chrono::steady_clock::now();
  int rc = rte_eal_init(static_cast<int>(argv.size() - 1), argv.data());
  s.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (have_before) pthread_setaffinity_np(self, sizeof(before), &before);
  if (rc < 0) {
    std::string joined;
    for (const auto& x : s.args) joined += (joined.empty() ? "" : " ") + x;
    s.outcome = {Code::EalFailed, "genie: rte_eal_init failed (" +
                                      std::string(rte_strerror(rte_errno)) + ") with: " + joined};
    return s.outcome;
  }
  s.up = true;
  s.pid = getpid();
  s.outcome = Status::ok();
  std::atexit([] { Eal::shutdown(); });
  return s.outcome;
}

bool Eal::initialized() {
  auto& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  return s.up && !s.down && s.pid == getpid();
}

double Eal::init_seconds() {
  auto& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  return s.seconds;
}

std::vector<std::string> Eal::args() {
  auto& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  return s.args;
}

int Eal::at_shutdown(std::function<void()> fn) {
  auto& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  int t = s.next_token++;
  s.closers[t] = std::move(fn);
  return t;
}

void Eal::forget(int token) {
  auto& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  s.closers.erase(token);
}

void Eal::shutdown() {
  auto& s = state();
  std::map<int, std::function<void()>> closers;
  {
    std::lock_guard<std::mutex> lock(s.mu);
    if (!s.up || s.down || s.pid != getpid()) return;
    s.down = true;
    closers.swap(s.closers);
  }
  for (auto it = closers.rbegin(); it != closers.rend(); ++it) it->second();
  rte_eal_cleanup();
}

Status reserve_shared_memory(const char* name, uint64_t bytes, SharedEalMemory* out) {
  if (!Eal::initialized()) return {Code::EalFailed, "genie: EAL is not up"};
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const rte_memzone* mz = rte_memzone_reserve_aligned(name, bytes, SOCKET_ID_ANY, 0, page);
  if (!mz) {
    return {Code::NoMemory, "genie: cannot reserve " + std::to_string(bytes >> 20) +
                                " MB of EAL memory for the arena (" + rte_strerror(rte_errno) +
                                "); raise eal_memory_mb"};
  }
  rte_memseg* ms = rte_mem_virt2memseg(mz->addr, nullptr);
  size_t seg_offset = 0;
  int fd = ms ? rte_memseg_get_fd(ms) : -1;
  if (fd < 0 || rte_memseg_get_fd_offset(ms, &seg_offset) != 0) {
    return {Code::Unsupported, std::string("genie: EAL memory has no file to share (") +
                                   rte_strerror(rte_errno) + "); it needs --no-huge and memfd"};
  }
  out->addr = static_cast<uint8_t*>(mz->addr);
  out->fd = fd;
  out->offset = seg_offset + (static_cast<uint8_t*>(mz->addr) - static_cast<uint8_t*>(ms->addr));
  return Status::ok();
}

}  // namespace genie::dataplane
