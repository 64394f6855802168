// The wire format and the byte-range bookkeeping of the endpoint (no port needed).
#include <cstring>
#include <vector>

#include "check.h"
#include "dataplane/endpoint.h"
#include "dataplane/wire.h"

using namespace genie::dataplane;

namespace {

void header_checksum_detects_changes() {
  PacketHeader h;
  std::memset(&h, 0, sizeof(h));
  h.magic = kMagic;
  h.version = kWireVersion;
  h.type = static_cast<uint8_t>(PacketType::Data);
  h.msg_id = 42;
  h.offset = 1 << 20;
  h.length = 8000;
  seal_header(&h);
  CHECK(header_valid(&h));
  for (size_t byte = 0; byte < sizeof(h); ++byte) {
    PacketHeader c = h;
    reinterpret_cast<uint8_t*>(&c)[byte] ^= 0x10;
    CHECK(!header_valid(&c));
  }
}

void payload_sum_is_independent_of_segmentation() {
  std::vector<uint8_t> data(10007);
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<uint8_t>(i * 7 + 3);
  uint64_t whole = payload_sum(data.data(), data.size());
  for (size_t cut : {1ul, 3ul, 4ul, 1978ul, 5000ul, 10006ul}) {
    uint64_t s = payload_sum(data.data(), cut);
    s = payload_sum(data.data() + cut, data.size() - cut, cut, s);
    CHECK_EQ(s, whole);
  }
  std::vector<uint8_t> zeros(data.size(), 0);
  CHECK(fold_sum(payload_sum(zeros.data(), zeros.size())) != fold_sum(whole));
  data[5000] ^= 1;
  CHECK(payload_sum(data.data(), data.size()) != whole);
}

void interval_set_merges_and_reports_holes() {
  IntervalSet s;
  s.add(0, 100);
  s.add(200, 300);
  s.add(100, 150);
  CHECK_EQ(s.prefix(), 150u);
  CHECK(s.contains(10, 150));
  CHECK(!s.contains(140, 210));
  std::vector<NackRange> holes;
  s.holes(400, 8, &holes);
  CHECK_EQ(holes.size(), 2u);
  CHECK_EQ(holes[0].start, 150u);
  CHECK_EQ(holes[0].end, 200u);
  CHECK_EQ(holes[1].start, 300u);
  CHECK_EQ(holes[1].end, 400u);
  s.add(150, 200);
  CHECK_EQ(s.size(), 1u);
  CHECK_EQ(s.prefix(), 300u);
  s.remove(50, 60);
  CHECK_EQ(s.size(), 2u);
  CHECK_EQ(s.prefix(), 50u);
  CHECK(s.contains(60, 300));
}

}  // namespace

int main() {
  RUN(header_checksum_detects_changes);
  RUN(payload_sum_is_independent_of_segmentation);
  RUN(interval_set_merges_and_reports_holes);
  return genie::dataplane::testing::failures() ? 1 : 0;
}
