#pragma once
// The data plane's one error model: a status code and a message. Nothing in csrc/dataplane
// throws across a hot path; calls return Status, and the pybind11 boundary
// (csrc/bindings/dataplane.cpp) turns a failed Status into genie's Python exceptions:
// PeerGone/PeerTimeout/LinkDown/Closed/AgentDied -> TransportError, BadPacket -> ProtocolError,
// Unavailable/Unsupported -> UnsupportedOperationError, the rest -> GenieError.
#include <string>
#include <utility>

namespace genie::dataplane {

enum class Code {
  Ok = 0,
  Unavailable,      // built without DPDK / CUDA, or no such driver on this machine
  Unsupported,      // the port or backend cannot do what was asked
  InvalidArgument,  // a bad configuration value or call
  EalFailed,        // rte_eal_init or a port/mempool set-up failed
  NoMemory,         // a mempool or allocation ran dry
  Timeout,          // the caller's own deadline passed (the peer may still be alive)
  PeerTimeout,      // no sign of life from the peer for peer_timeout
  PeerGone,         // the peer closed or its link went down
  LinkDown,         // the port reported link down
  Closed,           // this endpoint was closed
  BadPacket,        // a packet that does not follow the wire format
  AgentDied,        // the data-plane agent process exited
  RegistrationFailed,
  Internal,
};

const char* code_name(Code c);

class Status {
 public:
  Status() = default;
  Status(Code code, std::string message) : code_(code), message_(std::move(message)) {}
  static Status ok() { return {}; }

  bool is_ok() const { return code_ == Code::Ok; }
  explicit operator bool() const { return is_ok(); }
  Code code() const { return code_; }
  const std::string& message() const { return message_; }
  std::string to_string() const;

 private:
  Code code_ = Code::Ok;
  std::string message_;
};

// For the few places that cannot return a Status (constructors of owning objects, the
// bindings): carries the Status unchanged.
class DataplaneError : public std::exception {
 public:
  explicit DataplaneError(Status s) : status_(std::move(s)), what_(status_.to_string()) {}
  const Status& status() const { return status_; }
  const char* what() const noexcept override { return what_.c_str(); }

 private:
  Status status_;
  std::string what_;
};

inline void throw_if_error(const Status& s) {
  if (!s.is_ok()) throw DataplaneError(s);
}

}  // namespace genie::dataplane
