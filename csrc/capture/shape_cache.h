#pragma once
// Output metadata of recorded ops: meta execution behind a cache.
//
// Note: [Shape cache]
// torch registers ~1350 Python meta kernels that cost 85-300 us each (FIELD-NOTES.md). The
// cache key is (operator, per-argument geometry or value, the aliasing pattern among tensor
// arguments), so a hit gives the same outputs that meta execution would have, including
// which outputs alias which inputs and how in-place ops changed their arguments' geometry.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/ivalue.h>

#include <atomic>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <unordered_map>
#include <vector>

namespace genie {

struct Geometry {
  c10::ScalarType dtype = c10::ScalarType::Float;
  std::vector<int64_t> sizes;
  std::vector<int64_t> strides;
  int64_t offset = 0;
  int64_t nbytes = 0;  // bytes of the whole storage
};

struct OutSpec {
  Geometry geo;
  int32_t alias = -1;  // index of the input whose storage this output shares; -1 = fresh
  bool undefined = false;  // an undefined tensor (e.g. a gradient the backward op was not asked for)
};

struct ReturnSpec {
  enum class Kind : uint8_t { Tensor, TensorList, Value } kind = Kind::Value;
  std::vector<OutSpec> tensors;
  c10::IValue value;
};

struct ShapeResult {
  bool eager = false;  // no usable meta: the op must run on real data at capture
  std::vector<ReturnSpec> returns;
  std::vector<std::pair<int32_t, Geometry>> mutated;  // input index -> geometry after the op
};

class ShapeCache {
 public:
  std::shared_ptr<const ShapeResult> find(const std::string& key);
  void insert(const std::string& key, std::shared_ptr<const ShapeResult> value);
  void clear();
  int64_t hits() const { return hits_; }
  int64_t misses() const { return misses_; }
  size_t size() const;

 private:
  mutable std::shared_mutex mutex_;  // lookups share it; inserts are rare
  std::unordered_map<std::string, std::shared_ptr<const ShapeResult>> map_;
  std::atomic<int64_t> hits_{0};
  std::atomic<int64_t> misses_{0};
};

ShapeCache& shape_cache();

// Appends a stable encoding of an IValue that does not hold tensors; false if it cannot be
// encoded (then the op is not cached).
bool encode_value(const c10::IValue& v, std::string& out);

}  // namespace genie
