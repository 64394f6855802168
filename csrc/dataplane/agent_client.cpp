#include "dataplane/agent_client.h"

#include <poll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <deque>

namespace genie::dataplane {

namespace {

std::string sys_error(const char* what) {
  return std::string(what) + ": " + std::strerror(errno);
}

}  // namespace

AgentClient::AgentClient(int sock, int arena_fd, size_t arena_bytes, size_t slot_bytes)
    : sock_(sock), arena_bytes_(arena_bytes), slot_bytes_(slot_bytes) {
  if (slot_bytes == 0 || arena_bytes < 2 * slot_bytes) {
    broken_ = {Code::InvalidArgument,
               "genie: the data-plane arena must hold at least one slot per direction"};
    return;
  }
  slots_ = (arena_bytes / 2) / slot_bytes;
  void* p = mmap(nullptr, arena_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, arena_fd, 0);
  if (p == MAP_FAILED) {
    broken_ = {Code::NoMemory, sys_error("genie: cannot map the data-plane arena")};
    return;
  }
  arena_ = static_cast<uint8_t*>(p);
}

AgentClient::~AgentClient() {
  if (arena_) munmap(arena_, arena_bytes_);
  if (sock_ >= 0) ::close(sock_);
}

double AgentClient::now_ms() const {
  return std::chrono::duration<double, std::milli>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

double AgentClient::deadline(double timeout_ms) const {
  return timeout_ms < 0 ? -1.0 : now_ms() + timeout_ms;
}

Status AgentClient::fail(Status s) {
  if (broken_.is_ok()) broken_ = s;
  return broken_;
}

Status AgentClient::command(const AgentCommand& c) {
  while (true) {
    ssize_t n = ::send(sock_, &c, sizeof(c), MSG_NOSIGNAL);
    if (n == static_cast<ssize_t>(sizeof(c))) return Status::ok();
    if (n < 0 && errno == EINTR) continue;
    return fail({Code::AgentDied, "genie: the data-plane agent is gone (" +
                                      std::string(n < 0 ? std::strerror(errno) : "short write") +
                                      ")"});
  }
}

Status AgentClient::next_event(double deadline_ms, AgentEvent* ev) {
  while (true) {
    int wait = -1;
    if (deadline_ms >= 0) {
      double left = deadline_ms - now_ms();
      if (left <= 0) return {Code::Timeout, "genie: timed out waiting for the data-plane agent"};
      wait = static_cast<int>(left) + 1;
    }
    pollfd pfd{sock_, POLLIN, 0};
    int r = ::poll(&pfd, 1, wait);
    if (r < 0) {
      if (errno == EINTR) continue;
      return fail({Code::Internal, sys_error("genie: poll on the agent socket")});
    }
    if (r == 0) continue;  // re-check the deadline
    ssize_t n = ::recv(sock_, ev, sizeof(*ev), 0);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      return fail({Code::AgentDied, "genie: the data-plane agent exited"});
    }
    if (n != static_cast<ssize_t>(sizeof(*ev))) {
      return fail({Code::Internal, "genie: malformed event from the data-plane agent"});
    }
    ev->text[sizeof(ev->text) - 1] = 0;
    if (ev->type == static_cast<uint32_t>(AgentEventType::Error)) {
      return fail({static_cast<Code>(ev->code), ev->text});
    }
    return Status::ok();
  }
}

Status AgentClient::expect(AgentEventType type, double deadline_ms, AgentEvent* ev) {
  while (true) {
    Status s = next_event(deadline_ms, ev);
    if (!s) return s;
    if (ev->type == static_cast<uint32_t>(type)) return Status::ok();
    if (ev->type == static_cast<uint32_t>(AgentEventType::PortUp)) continue;  // informational
    return fail({Code::Internal, "genie: unexpected event " + std::to_string(ev->type) +
                                     " from the data-plane agent (wanted " +
                                     std::to_string(static_cast<uint32_t>(type)) + ")"});
  }
}

Status AgentClient::wait_for(AgentEventType type, double timeout_ms, uint64_t* value) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!broken_) return broken_;
  AgentEvent ev;
  double dl = deadline(timeout_ms);
  while (true) {
    Status s = next_event(dl, &ev);
    if (!s) return s.code() == Code::Timeout ? fail(s) : s;
    if (ev.type == static_cast<uint32_t>(type)) break;
  }
  if (value) *value = ev.value;
  return Status::ok();
}

Status AgentClient::send(uint64_t msg, const std::vector<ConstBuffer>& bufs, double timeout_ms) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!broken_) return broken_;
  double dl = deadline(timeout_ms);
  uint64_t total = 0;
  for (const auto& b : bufs) total += b.len;
  Status s = command({static_cast<uint32_t>(AgentOp::SendBegin), 0, msg, 0, 0, total, 0});
  if (!s) return s;
  std::deque<uint64_t> inflight;  // slots in the order they were provided
  size_t next_slot = 0, bi = 0, boff = 0;
  uint64_t off = 0;
  AgentEvent ev;
  auto retire = [&]() -> Status {
    Status r = expect(AgentEventType::Sent, dl, &ev);
    if (!r) return r.code() == Code::Timeout ? fail(r) : r;
    if (ev.msg != msg || ev.cookie != inflight.front()) {
      return fail({Code::Internal, "genie: the data-plane agent released slots out of order"});
    }
    inflight.pop_front();
    return Status::ok();
  };
  while (off < total) {
    if (inflight.size() == slots_) {
      s = retire();
      if (!s) return s;
    }
    size_t slot = next_slot;
    next_slot = (next_slot + 1) % slots_;
    uint64_t n = std::min<uint64_t>(slot_bytes_, total - off);
    uint8_t* dst = arena_ + slot * slot_bytes_;
    // Gather the next n bytes of the stream into the slot.
    for (uint64_t got = 0; got < n;) {
      const auto& b = bufs[bi];
      uint64_t k = std::min<uint64_t>(n - got, b.len - boff);
      std::memcpy(dst + got, static_cast<const uint8_t*>(b.data) + boff, k);
      got += k;
      boff += k;
      if (boff == b.len) {
        ++bi;
        boff = 0;
      }
    }
    s = command(
        {static_cast<uint32_t>(AgentOp::SendProvide), 0, msg, off, slot * slot_bytes_, n, slot});
    if (!s) return s;
    inflight.push_back(slot);
    off += n;
  }
  while (!inflight.empty()) {
    s = retire();
    if (!s) return s;
  }
  return Status::ok();
}

Status AgentClient::recv(uint64_t msg, uint64_t total, uint64_t offset,
                         const std::vector<MutableBuffer>& bufs, double timeout_ms) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!broken_) return broken_;
  double dl = deadline(timeout_ms);
  uint64_t want = 0;
  for (const auto& b : bufs) want += b.len;
  if (offset + want > total) {
    return {Code::InvalidArgument, "genie: receiving past the end of a data-plane message"};
  }
  Status s;
  if (offset == 0) {
    s = command({static_cast<uint32_t>(AgentOp::RecvBegin), 0, msg, 0, 0, total, 0});
    if (!s) return s;
  }
  const size_t rx_base = (arena_bytes_ / 2);
  struct Posted {
    size_t slot;
    uint64_t len;
  };
  std::deque<Posted> posted;
  size_t next_slot = 0, bi = 0, boff = 0;
  uint64_t post_off = 0, done = 0;  // relative to `offset`
  auto post = [&]() -> Status {
    size_t slot = next_slot;
    next_slot = (next_slot + 1) % slots_;
    uint64_t n = std::min<uint64_t>(slot_bytes_, want - post_off);
    Status r = command({static_cast<uint32_t>(AgentOp::RecvPost), 0, msg, offset + post_off,
                        rx_base + slot * slot_bytes_, n, slot});
    if (!r) return r;
    posted.push_back({slot, n});
    post_off += n;
    return Status::ok();
  };
  while (post_off < want && posted.size() < slots_) {
    s = post();
    if (!s) return s;
  }
  AgentEvent ev;
  while (done < want) {
    s = expect(AgentEventType::Received, dl, &ev);
    if (!s) return s.code() == Code::Timeout ? fail(s) : s;
    if (ev.msg != msg || ev.cookie != posted.front().slot) {
      return fail({Code::Internal, "genie: the data-plane agent filled slots out of order"});
    }
    Posted p = posted.front();
    posted.pop_front();
    const uint8_t* src = arena_ + rx_base + p.slot * slot_bytes_;
    // Scatter the slot into the caller's buffers.
    for (uint64_t put = 0; put < p.len;) {
      const auto& b = bufs[bi];
      uint64_t k = std::min<uint64_t>(p.len - put, b.len - boff);
      if (b.data) std::memcpy(static_cast<uint8_t*>(b.data) + boff, src + put, k);
      put += k;
      boff += k;
      if (boff == b.len) {
        ++bi;
        boff = 0;
      }
    }
    done += p.len;
    if (post_off < want) {
      s = post();
      if (!s) return s;
    }
  }
  return Status::ok();
}

Status AgentClient::ping(uint32_t payload, double timeout_ms, double* rtt_us) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!broken_) return broken_;
  Status s = command({static_cast<uint32_t>(AgentOp::Ping), 0, 0, 0, 0, payload, 0});
  if (!s) return s;
  AgentEvent ev;
  s = expect(AgentEventType::Pong, deadline(timeout_ms), &ev);
  if (!s) return s;
  *rtt_us = static_cast<double>(ev.value) / 1000.0;
  return Status::ok();
}

Status AgentClient::stats(std::string* text, double timeout_ms) {
  std::lock_guard<std::mutex> lock(mu_);
  if (sock_ < 0) return {Code::Closed, "genie: the data-plane agent was closed"};
  Status s = command({static_cast<uint32_t>(AgentOp::Stats), 0, 0, 0, 0, 0, 0});
  if (!s) return s;
  AgentEvent ev;
  // Stats are answered even after an endpoint error (the agent keeps serving them).
  double dl = deadline(timeout_ms);
  while (true) {
    s = next_event(dl, &ev);
    if (s.code() == Code::AgentDied || s.code() == Code::Timeout || s.code() == Code::Internal)
      return s;
    if (s.is_ok() && ev.type == static_cast<uint32_t>(AgentEventType::Stats)) break;
  }
  *text = ev.text;
  return Status::ok();
}

Status AgentClient::close(double timeout_ms) {
  std::lock_guard<std::mutex> lock(mu_);
  if (sock_ < 0) return Status::ok();
  Status s = command({static_cast<uint32_t>(AgentOp::Close), 0, 0, 0, 0, 0, 0});
  if (s) {
    AgentEvent ev;
    double dl = deadline(timeout_ms);
    while (true) {
      Status r = next_event(dl, &ev);
      if (r.code() == Code::AgentDied || r.code() == Code::Timeout || r.code() == Code::Internal)
        break;
      if (r.is_ok() && ev.type == static_cast<uint32_t>(AgentEventType::Closed)) break;
    }
  }
  ::close(sock_);
  sock_ = -1;
  if (broken_.is_ok()) broken_ = {Code::Closed, "genie: the data-plane connection was closed"};
  return Status::ok();
}

}  // namespace genie::dataplane
