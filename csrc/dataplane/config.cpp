#include "dataplane/config.h"

#include <cerrno>
#include <cstdlib>

namespace genie::dataplane {

const char* code_name(Code c) {
  switch (c) {
    case Code::Ok: return "ok";
    case Code::Unavailable: return "unavailable";
    case Code::Unsupported: return "unsupported";
    case Code::InvalidArgument: return "invalid argument";
    case Code::EalFailed: return "EAL failure";
    case Code::NoMemory: return "out of memory";
    case Code::Timeout: return "timeout";
    case Code::PeerTimeout: return "peer timeout";
    case Code::PeerGone: return "peer gone";
    case Code::LinkDown: return "link down";
    case Code::Closed: return "closed";
    case Code::BadPacket: return "bad packet";
    case Code::AgentDied: return "agent died";
    case Code::RegistrationFailed: return "registration failed";
    case Code::Internal: return "internal error";
  }
  return "unknown";
}

std::string Status::to_string() const {
  if (is_ok()) return "ok";
  return message_.empty() ? code_name(code_) : message_;
}

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  size_t start = 0;
  while (start <= s.size()) {
    size_t end = s.find(sep, start);
    if (end == std::string::npos) end = s.size();
    if (end > start) out.push_back(s.substr(start, end - start));
    start = end + 1;
  }
  return out;
}

Status parse_options(const std::vector<std::string>& items, Options* out) {
  for (const auto& item : items) {
    auto eq = item.find('=');
    if (eq == std::string::npos || eq == 0) {
      return {Code::InvalidArgument, "genie: data-plane option '" + item + "' is not key=value"};
    }
    (*out)[item.substr(0, eq)] = item.substr(eq + 1);
  }
  return Status::ok();
}

Status option_u64(const Options& o, const std::string& key, uint64_t* v) {
  auto it = o.find(key);
  if (it == o.end()) return Status::ok();
  const std::string& s = it->second;
  char* end = nullptr;
  errno = 0;
  unsigned long long x = std::strtoull(s.c_str(), &end, 0);
  uint64_t scale = 1;
  if (end && *end) {
    std::string unit(end);
    if (unit == "K" || unit == "k" || unit == "KiB")
      scale = 1ull << 10;
    else if (unit == "M" || unit == "MiB")
      scale = 1ull << 20;
    else if (unit == "G" || unit == "GiB")
      scale = 1ull << 30;
    else
      end = nullptr;
  }
  if (s.empty() || errno || end == nullptr || s[0] == '-') {
    return {Code::InvalidArgument,
            "genie: data-plane option " + key + "=" + s + " is not a non-negative integer"};
  }
  *v = static_cast<uint64_t>(x) * scale;
  return Status::ok();
}

Status option_double(const Options& o, const std::string& key, double* v) {
  auto it = o.find(key);
  if (it == o.end()) return Status::ok();
  char* end = nullptr;
  double x = std::strtod(it->second.c_str(), &end);
  if (it->second.empty() || (end && *end) || x < 0) {
    return {Code::InvalidArgument,
            "genie: data-plane option " + key + "=" + it->second + " is not a non-negative number"};
  }
  *v = x;
  return Status::ok();
}

Status option_bool(const Options& o, const std::string& key, bool* v) {
  auto it = o.find(key);
  if (it == o.end()) return Status::ok();
  const std::string& s = it->second;
  if (s == "1" || s == "yes" || s == "true" || s == "on")
    *v = true;
  else if (s == "0" || s == "no" || s == "false" || s == "off")
    *v = false;
  else
    return {Code::InvalidArgument,
            "genie: data-plane option " + key + "=" + s + " is not a boolean"};
  return Status::ok();
}

namespace {

template <typename T>
Status option_small(const Options& o, const std::string& key, T* v, uint64_t lo, uint64_t hi) {
  uint64_t x = *v;
  auto s = option_u64(o, key, &x);
  if (!s) return s;
  if (x < lo || x > hi) {
    return {Code::InvalidArgument, "genie: data-plane option " + key + "=" + std::to_string(x) +
                                       " is outside [" + std::to_string(lo) + ", " +
                                       std::to_string(hi) + "]"};
  }
  *v = static_cast<T>(x);
  return Status::ok();
}

std::vector<std::string> list_option(const Options& o, const std::string& key) {
  auto it = o.find(key);
  return it == o.end() ? std::vector<std::string>{} : split(it->second, ';');
}

}  // namespace

#define GENIE_TRY(expr) \
  do {                  \
    Status _s = (expr); \
    if (!_s) return _s; \
  } while (0)

Status EalConfig::from_options(const Options& o, EalConfig* c) {
  GENIE_TRY(option_small(o, "eal_memory_mb", &c->memory_mb, 64, 1 << 20));
  GENIE_TRY(option_bool(o, "eal_no_huge", &c->no_huge));
  if (o.count("eal_pci")) c->pci_allow = list_option(o, "eal_pci");
  if (o.count("eal_vdev")) c->vdevs = list_option(o, "eal_vdev");
  if (o.count("eal_drivers")) c->drivers = list_option(o, "eal_drivers");
  if (o.count("eal_args")) c->extra_args = split(o.at("eal_args"), ' ');
  if (o.count("eal_log_level")) c->log_level = o.at("eal_log_level");
  if (o.count("eal_file_prefix")) c->file_prefix = o.at("eal_file_prefix");
  return Status::ok();
}

Status PortConfig::from_options(const Options& o, PortConfig* c) {
  if (o.count("port")) c->spec = o.at("port");
  GENIE_TRY(option_small(o, "rx_desc", &c->rx_desc, 64, 32768));
  GENIE_TRY(option_small(o, "tx_desc", &c->tx_desc, 64, 32768));
  GENIE_TRY(option_small(o, "mbuf_data_room", &c->mbuf_data_room, 0, 65535));
  GENIE_TRY(option_small(o, "mtu", &c->mtu, 0, 65535));
  return Status::ok();
}

Status EndpointConfig::from_options(const Options& o, EndpointConfig* c) {
  GENIE_TRY(option_small(o, "chunk_bytes", &c->chunk_bytes, 0, 65000));
  GENIE_TRY(option_small(o, "burst", &c->burst, 1, 512));
  GENIE_TRY(option_u64(o, "window_bytes", &c->window_bytes));
  GENIE_TRY(option_u64(o, "ack_every_bytes", &c->ack_every_bytes));
  GENIE_TRY(option_double(o, "rto_ms", &c->rto_ms));
  GENIE_TRY(option_double(o, "keepalive_ms", &c->keepalive_ms));
  GENIE_TRY(option_double(o, "peer_timeout_ms", &c->peer_timeout_ms));
  GENIE_TRY(option_double(o, "connect_timeout_ms", &c->connect_timeout_ms));
  GENIE_TRY(option_double(o, "close_timeout_ms", &c->close_timeout_ms));
  GENIE_TRY(option_bool(o, "payload_checksum", &c->payload_checksum));
  GENIE_TRY(option_small(o, "yield_after_polls", &c->yield_after_polls, 0, 1u << 30));
  GENIE_TRY(option_double(o, "spin_ms", &c->spin_ms));
  GENIE_TRY(option_double(o, "loss_rate", &c->loss_rate));
  GENIE_TRY(option_u64(o, "loss_seed", &c->loss_seed));
  for (const auto& item : list_option(o, "drop_chunks")) {
    uint64_t n = 0;
    GENIE_TRY(option_u64({{"drop_chunks", item}}, "drop_chunks", &n));
    c->drop_chunks.push_back(n);
  }
  if (c->loss_rate >= 1.0) {
    return {Code::InvalidArgument, "genie: loss_rate must be below 1 (every chunk would be lost)"};
  }
  if (c->window_bytes < (1u << 16)) {
    return {Code::InvalidArgument, "genie: window_bytes must be at least 64 KiB"};
  }
  return Status::ok();
}

}  // namespace genie::dataplane
