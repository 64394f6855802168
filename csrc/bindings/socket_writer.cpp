// genie._C.SocketWriter: frames written to a socket by a native thread, in order, while the
// Python thread that queued them goes on (Note: [Background sends]).
#include <poll.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <torch/csrc/utils/pybind.h>

#include "bindings/socket_writer.h"

namespace py = pybind11;

namespace genie::bindings {

namespace {

// Note: [Background sends]
// Why: the client sends an input's bytes as soon as `.to()` recorded them (Note: [Early
// uploads] in remote/early.py), while the same thread goes on recording the forward. A Python
// sender thread cannot do that: it needs the GIL to start the send and again to finish it, and
// the recording thread, busy in Python, hands the GIL over only every switch interval (5 ms).
// Measured on an H100 host: a 4.8 MB input handed over 0.3 ms into the forward reached the
// server 4.3 ms in, after the recording had ended. So the frame goes to this writer instead: a
// native thread that owns the socket's sending side while it has work and never touches
// Python. Frames complete in the order they were queued; the caller keeps each frame's
// buffers alive and unchanged until `done()` reaches its id. A failed send shuts the socket
// down, so that a reader blocked on it wakes, and is reported by `error()`; nothing queued
// after it is sent.
constexpr size_t kIovBatch = 256;

struct Job {
  uint64_t id;
  std::string head;  // the frame's prefix and header, owned
  std::vector<iovec> parts;  // the payload, the caller's memory
  int timeout_ms;
};

}  // namespace

class SocketWriter {
 public:
  explicit SocketWriter(int fd) : fd_(fd), thread_([this] { loop(); }) {}

  ~SocketWriter() { close(); }

  uint64_t submit(std::string head, std::vector<iovec> parts, int timeout_ms) {
    std::lock_guard<std::mutex> g(mu_);
    const uint64_t id = ++submitted_;
    jobs_.push_back(Job{id, std::move(head), std::move(parts), timeout_ms});
    cv_.notify_all();
    return id;
  }

  uint64_t done() const {
    std::lock_guard<std::mutex> g(mu_);
    return done_;
  }

  uint64_t submitted() const {
    std::lock_guard<std::mutex> g(mu_);
    return submitted_;
  }

  std::string error() const {
    std::lock_guard<std::mutex> g(mu_);
    return error_;
  }

  // True once job `id` is written or the writer failed; false when `wait_ms` passed first.
  bool wait(uint64_t id, int wait_ms) {
    std::unique_lock<std::mutex> l(mu_);
    return cv_.wait_for(l, std::chrono::milliseconds(wait_ms),
                        [&] { return done_ >= id || !error_.empty() || stop_; });
  }

  void close() {
    {
      std::lock_guard<std::mutex> g(mu_);
      if (stop_) return;
      stop_ = true;
      cv_.notify_all();
    }
    if (thread_.joinable()) thread_.join();
  }

 private:
  void loop() {
    for (;;) {
      Job job;
      {
        std::unique_lock<std::mutex> l(mu_);
        cv_.wait(l, [&] { return stop_ || (!jobs_.empty() && error_.empty()); });
        if (stop_) return;
        job = std::move(jobs_.front());
        jobs_.pop_front();
      }
      std::string failed = write(job);
      std::lock_guard<std::mutex> g(mu_);
      if (failed.empty()) {
        done_ = job.id;
      } else {
        error_ = std::move(failed);
        jobs_.clear();
        ::shutdown(fd_, SHUT_RDWR);
      }
      cv_.notify_all();
    }
  }

  // Every byte of `job`, or why not.
  std::string write(Job& job) {
    std::vector<iovec> iov;
    iov.reserve(job.parts.size() + 1);
    iov.push_back(iovec{job.head.data(), job.head.size()});
    for (const iovec& p : job.parts)
      if (p.iov_len) iov.push_back(p);
    size_t i = 0;
    while (i < iov.size()) {
      msghdr msg{};
      msg.msg_iov = iov.data() + i;
      msg.msg_iovlen = std::min(kIovBatch, iov.size() - i);
      ssize_t sent = ::sendmsg(fd_, &msg, MSG_NOSIGNAL);
      if (sent < 0) {
        if (errno == EINTR) continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK) return std::strerror(errno);
        // A socket with a timeout is non-blocking: wait for room, in slices so that close()
        // is not held up by a peer that stopped reading.
        auto waited = std::chrono::steady_clock::now();
        for (;;) {
          pollfd p{fd_, POLLOUT, 0};
          int r = ::poll(&p, 1, 100);
          if (r > 0) break;
          if (r < 0 && errno != EINTR) return std::strerror(errno);
          if (stopping()) return "the connection was closed";
          auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                        std::chrono::steady_clock::now() - waited)
                        .count();
          if (job.timeout_ms >= 0 && ms >= job.timeout_ms) return "timed out";
        }
        continue;
      }
      size_t left = static_cast<size_t>(sent);
      while (left > 0 && i < iov.size()) {
        if (left >= iov[i].iov_len) {
          left -= iov[i].iov_len;
          ++i;
        } else {
          iov[i].iov_base = static_cast<uint8_t*>(iov[i].iov_base) + left;
          iov[i].iov_len -= left;
          left = 0;
        }
      }
    }
    return {};
  }

  bool stopping() {
    std::lock_guard<std::mutex> g(mu_);
    return stop_;
  }

  const int fd_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Job> jobs_;
  uint64_t submitted_ = 0;
  uint64_t done_ = 0;
  std::string error_;
  bool stop_ = false;
  std::thread thread_;  // last: started once the rest is ready
};

void register_socket_writer(py::module_& m) {
  py::class_<SocketWriter>(m, "SocketWriter",
      "Frames written to a socket by a native thread, in order (Note: [Background sends]).")
      .def(py::init<int>(), py::arg("fd"))
      .def("submit", [](SocketWriter& w, py::bytes head, const std::vector<py::buffer>& parts,
                        int timeout_ms) {
        std::vector<iovec> iov;
        iov.reserve(parts.size());
        for (const py::buffer& b : parts) {
          py::buffer_info info = b.request();
          if (info.ndim > 1 && info.strides.back() != info.itemsize)
            throw py::value_error("genie: SocketWriter needs contiguous buffers");
          iov.push_back(iovec{info.ptr, static_cast<size_t>(info.size * info.itemsize)});
        }
        return w.submit(std::string(head), std::move(iov), timeout_ms);
      }, py::arg("head"), py::arg("parts"), py::arg("timeout_ms"),
         "Queue one frame: `head` (copied), then `parts`, which must stay valid and unchanged "
         "until done() reaches the returned id. timeout_ms < 0: no limit.")
      .def("done", &SocketWriter::done, "The id of the last frame written in full.")
      .def("submitted", &SocketWriter::submitted, "The id of the last frame queued.")
      .def("error", &SocketWriter::error, "Why the writer stopped, or ''.")
      .def("wait", [](SocketWriter& w, uint64_t id, int wait_ms) {
        py::gil_scoped_release nogil;
        return w.wait(id, wait_ms);
      }, py::arg("id"), py::arg("wait_ms"),
         "Wait (without the GIL) until frame `id` is written or the writer failed; False when "
         "`wait_ms` passed first.")
      .def("close", [](SocketWriter& w) {
        py::gil_scoped_release nogil;
        w.close();
      }, "Stop the thread (a frame being written is abandoned); the socket stays open.");
}

}  // namespace genie::bindings
