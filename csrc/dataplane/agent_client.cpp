#include "dataplane/agent_client.h"

#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
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

AgentClient::AgentClient(int sock, int arena_fd, size_t copy_bytes, size_t slot_bytes,
                         size_t heap_bytes, double arena_timeout_ms)
    : sock_(sock), arena_bytes_(copy_bytes), slot_bytes_(slot_bytes) {
  if (slot_bytes == 0 || copy_bytes < 2 * slot_bytes) {
    broken_ = {Code::InvalidArgument,
               "genie: the data-plane arena must hold at least one slot per direction"};
    return;
  }
  slots_ = (copy_bytes / 2) / slot_bytes;
  uint64_t offset = 0;
  int own_fd = -1;
  if (arena_fd < 0) {
    Status s = receive_arena(arena_timeout_ms, &own_fd, &offset);
    if (!s) {
      broken_ = s;
      return;
    }
    arena_fd = own_fd;
  }
  shared_ = std::make_shared<Arena>(arena_fd, copy_bytes, heap_bytes, offset);
  if (own_fd >= 0) ::close(own_fd);  // the mapping keeps the memory
  if (!shared_->health()) {
    broken_ = shared_->health();
    shared_.reset();
    return;
  }
  arena_ = shared_->base();
}

AgentClient::~AgentClient() {
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

Status AgentClient::receive_arena(double timeout_ms, int* fd, uint64_t* offset) {
  double dl = deadline(timeout_ms);
  while (true) {
    pollfd pfd{sock_, POLLIN, 0};
    int left = static_cast<int>(dl - now_ms()) + 1;
    if (left <= 0) return {Code::Timeout, "genie: the data-plane agent sent no arena in time"};
    int r = ::poll(&pfd, 1, left);
    if (r < 0 && errno != EINTR) return {Code::Internal, sys_error("genie: poll on the agent")};
    if (r <= 0) continue;
    EventWithFd m;
    AgentEvent& ev = m.ev;
    ssize_t n = ::recvmsg(sock_, &m.mh, MSG_CMSG_CLOEXEC);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return {Code::AgentDied, "genie: the data-plane agent exited"};
    int got = -1;
    cmsghdr* cm = CMSG_FIRSTHDR(&m.mh);
    if (cm && cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_RIGHTS)
      std::memcpy(&got, CMSG_DATA(cm), sizeof(int));
    ev.text[sizeof(ev.text) - 1] = 0;
    if (n == static_cast<ssize_t>(sizeof(ev)) &&
        ev.type == static_cast<uint32_t>(AgentEventType::Arena) && got >= 0) {
      *fd = got;
      *offset = ev.value;
      return Status::ok();
    }
    if (got >= 0) ::close(got);
    if (n == static_cast<ssize_t>(sizeof(ev)) &&
        ev.type == static_cast<uint32_t>(AgentEventType::Error)) {
      return {static_cast<Code>(ev.code), ev.text};
    }
    return {Code::Internal, "genie: the data-plane agent sent no arena"};
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

// Note: [In place or copied]
// A transfer is planned as pieces in stream order: each buffer inside one live heap block is one
// direct piece (the agent reads or writes it where it is); runs of other buffers are cut into
// slot-sized copied pieces. The agent reports pieces done in the order they were handed to it,
// so one queue of pieces in flight serves both kinds; only copied pieces hold a slot.
std::vector<AgentClient::Piece> AgentClient::plan(const std::vector<Span>& bufs) const {
  std::vector<Piece> pieces;
  for (const Span& b : bufs) {
    if (b.len == 0) continue;
    uint64_t off = 0;
    if (b.data && shared_ && shared_->in_heap(b.data, b.len, &off)) {
      pieces.push_back({true, off, b.len, {}});
      continue;
    }
    if (b.data && in_process_) {
      pieces.push_back({true, reinterpret_cast<uintptr_t>(b.data), b.len, {}, true});
      continue;
    }
    for (uint64_t done = 0; done < b.len;) {
      if (pieces.empty() || pieces.back().direct || pieces.back().len == slot_bytes_) {
        pieces.push_back({false, 0, 0, {}});
      }
      Piece& p = pieces.back();
      uint64_t k = std::min<uint64_t>(slot_bytes_ - p.len, b.len - done);
      p.spans.push_back({b.data ? b.data + done : nullptr, k});
      p.len += k;
      done += k;
    }
  }
  return pieces;
}

Status AgentClient::send(uint64_t msg, const std::vector<ConstBuffer>& bufs, double timeout_ms) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!broken_) return broken_;
  double dl = deadline(timeout_ms);
  uint64_t total = 0;
  std::vector<Span> spans;
  for (const auto& b : bufs) {
    total += b.len;
    spans.push_back({static_cast<uint8_t*>(const_cast<void*>(b.data)), b.len});
  }
  const std::vector<Piece> pieces = plan(spans);
  Status s = command({static_cast<uint32_t>(AgentOp::SendBegin), 0, msg, 0, 0, total, 0});
  if (!s) return s;
  // In flight, in order: the cookie is the slot, or kDirect + the piece's index.
  constexpr uint64_t kDirect = 1ull << 63;
  std::deque<uint64_t> inflight;
  size_t slots_used = 0, next_slot = 0;
  uint64_t off = 0;
  AgentEvent ev;
  auto retire = [&]() -> Status {
    Status r = expect(AgentEventType::Sent, dl, &ev);
    if (!r) return r.code() == Code::Timeout ? fail(r) : r;
    if (ev.msg != msg || ev.cookie != inflight.front()) {
      return fail({Code::Internal, "genie: the data-plane agent released slots out of order"});
    }
    if (!(inflight.front() & kDirect)) --slots_used;
    inflight.pop_front();
    return Status::ok();
  };
  for (size_t i = 0; i < pieces.size(); ++i) {
    const Piece& p = pieces[i];
    uint64_t arena_offset, cookie;
    if (p.direct) {
      arena_offset = p.arena_offset;
      cookie = kDirect | i;
    } else {
      while (slots_used == slots_) {
        s = retire();
        if (!s) return s;
      }
      size_t slot = next_slot;
      next_slot = (next_slot + 1) % slots_;
      uint8_t* dst = arena_ + slot * slot_bytes_;
      for (const Span& sp : p.spans) {  // gather the piece into its slot
        std::memcpy(dst, sp.data, sp.len);
        dst += sp.len;
      }
      counters_.copied_out += p.len;
      arena_offset = slot * slot_bytes_;
      cookie = slot;
      ++slots_used;
    }
    s = command({static_cast<uint32_t>(AgentOp::SendProvide), p.pointer ? kAgentPointer : 0, msg,
                 off, arena_offset, p.len, cookie});
    if (!s) return s;
    inflight.push_back(cookie);
    off += p.len;
  }
  while (!inflight.empty()) {
    s = retire();
    if (!s) return s;
  }
  for (const Piece& p : pieces) {
    if (p.direct) counters_.sent_in_place += p.len;
  }
  return Status::ok();
}

Status AgentClient::recv(uint64_t msg, uint64_t total, uint64_t offset,
                         const std::vector<MutableBuffer>& bufs, double timeout_ms) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!broken_) return broken_;
  double dl = deadline(timeout_ms);
  uint64_t want = 0;
  std::vector<Span> spans;
  for (const auto& b : bufs) {
    want += b.len;
    spans.push_back({static_cast<uint8_t*>(b.data), b.len});
  }
  if (offset + want > total) {
    return {Code::InvalidArgument, "genie: receiving past the end of a data-plane message"};
  }
  Status s;
  if (offset == 0) {
    s = command({static_cast<uint32_t>(AgentOp::RecvBegin), 0, msg, 0, 0, total, 0});
    if (!s) return s;
  }
  const std::vector<Piece> pieces = plan(spans);
  const size_t rx_base = (arena_bytes_ / 2);
  constexpr uint64_t kDirect = 1ull << 63;
  struct Posted {
    uint64_t cookie;
    size_t piece;
  };
  std::deque<Posted> posted;
  size_t slots_used = 0, next_slot = 0, next_piece = 0;
  uint64_t post_off = 0;  // relative to `offset`
  auto post = [&]() -> Status {
    const Piece& p = pieces[next_piece];
    uint64_t arena_offset, cookie;
    if (p.direct) {
      arena_offset = p.arena_offset;
      cookie = kDirect | next_piece;
    } else {
      size_t slot = next_slot;
      next_slot = (next_slot + 1) % slots_;
      arena_offset = rx_base + slot * slot_bytes_;
      cookie = slot;
      ++slots_used;
    }
    Status r = command({static_cast<uint32_t>(AgentOp::RecvPost), p.pointer ? kAgentPointer : 0,
                        msg, offset + post_off, arena_offset, p.len, cookie});
    if (!r) return r;
    posted.push_back({cookie, next_piece});
    post_off += p.len;
    ++next_piece;
    return Status::ok();
  };
  auto can_post = [&]() {
    return next_piece < pieces.size() && (pieces[next_piece].direct || slots_used < slots_);
  };
  while (can_post()) {
    s = post();
    if (!s) return s;
  }
  AgentEvent ev;
  while (!posted.empty()) {
    s = expect(AgentEventType::Received, dl, &ev);
    if (!s) return s.code() == Code::Timeout ? fail(s) : s;
    if (ev.msg != msg || ev.cookie != posted.front().cookie) {
      return fail({Code::Internal, "genie: the data-plane agent filled slots out of order"});
    }
    Posted done = posted.front();
    posted.pop_front();
    const Piece& p = pieces[done.piece];
    if (p.direct) {
      counters_.received_in_place += p.len;
    } else {
      const uint8_t* src = arena_ + rx_base + done.cookie * slot_bytes_;
      bool kept = false;
      for (const Span& sp : p.spans) {  // scatter the slot into the caller's buffers
        if (sp.data) {
          std::memcpy(sp.data, src, sp.len);
          kept = true;
        }
        src += sp.len;
      }
      if (kept) counters_.copied_in += p.len;
      --slots_used;
    }
    while (can_post()) {
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
