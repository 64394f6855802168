#include "capture/shape_cache.h"

#include <cstring>

namespace genie {

ShapeCache& shape_cache() {
  static auto* c = new ShapeCache();
  return *c;
}

std::shared_ptr<const ShapeResult> ShapeCache::find(const std::string& key) {
  std::shared_lock<std::shared_mutex> lock(mutex_);
  auto it = map_.find(key);
  if (it == map_.end()) {
    ++misses_;
    return nullptr;
  }
  ++hits_;
  return it->second;
}

void ShapeCache::insert(const std::string& key, std::shared_ptr<const ShapeResult> value) {
  std::unique_lock<std::shared_mutex> lock(mutex_);
  map_.emplace(key, std::move(value));
}

void ShapeCache::clear() {
  std::unique_lock<std::shared_mutex> lock(mutex_);
  map_.clear();
  hits_ = misses_ = 0;
}

size_t ShapeCache::size() const {
  std::shared_lock<std::shared_mutex> lock(mutex_);
  return map_.size();
}

namespace {
template <typename T>
void put(std::string& out, const T& v) {
  out.append(reinterpret_cast<const char*>(&v), sizeof(T));
}
}  // namespace

bool encode_value(const c10::IValue& v, std::string& out) {
  if (v.isNone()) {
    out.push_back('N');
  } else if (v.isInt()) {
    out.push_back('i');
    put(out, v.toInt());
  } else if (v.isDouble()) {
    out.push_back('d');
    put(out, v.toDouble());
  } else if (v.isBool()) {
    out.push_back('b');
    put(out, v.toBool());
  } else if (v.isSymInt()) {
    auto si = v.toSymInt();
    if (si.is_heap_allocated()) return false;
    out.push_back('i');
    put(out, si.as_int_unchecked());
  } else if (v.isSymFloat()) {
    auto sf = v.toSymFloat();
    if (sf.is_symbolic()) return false;
    out.push_back('d');
    put(out, sf.as_float_unchecked());
  } else if (v.isComplexDouble()) {
    out.push_back('c');
    auto c = v.toComplexDouble();
    put(out, c.real());
    put(out, c.imag());
  } else if (v.isString()) {
    out.push_back('s');
    const auto& s = v.toStringRef();
    put(out, s.size());
    out.append(s);
  } else if (v.isDevice()) {
    out.push_back('D');
    auto d = v.toDevice();
    put(out, static_cast<int8_t>(d.type()));
    put(out, d.index());
  } else if (v.isIntList()) {
    out.push_back('I');
    auto l = v.toIntList();
    put(out, l.size());
    for (int64_t x : l) put(out, x);
  } else if (v.isDoubleList()) {
    out.push_back('F');
    auto l = v.toDoubleList();
    put(out, l.size());
    for (double x : l) put(out, x);
  } else if (v.isBoolList()) {
    out.push_back('B');
    auto l = v.toBoolList();
    put(out, l.size());
    for (bool x : l) put(out, x);
  } else if (v.isList()) {
    out.push_back('L');
    auto l = v.toListRef();
    put(out, l.size());
    for (const auto& x : l)
      if (!encode_value(x, out)) return false;
  } else if (v.isGenerator()) {
    out.push_back('G');  // which generator does not change shapes
  } else {
    return false;
  }
  return true;
}

}  // namespace genie
