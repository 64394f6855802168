#include "capture/digest.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <unordered_map>

namespace genie {
namespace {

inline uint64_t mix(uint64_t x) {  // splitmix64's finaliser
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// Two independent 64-bit lanes: a 128-bit fingerprint.
struct Hasher {
  uint64_t a = 0x6a09e667f3bcc908ULL;
  uint64_t b = 0xbb67ae8584caa73bULL;
  void add(uint64_t v) {
    a = mix(a ^ v) + 0x3c6ef372fe94f82bULL;
    b = mix(b + (v * 0xff51afd7ed558ccdULL) + 0xa54ff53a5f1d36f1ULL);
  }
  void add_double(double d) {
    uint64_t bits;
    std::memcpy(&bits, &d, sizeof bits);
    add(bits);
  }
  void add_string(const std::string& s) {
    add(s.size());
    for (size_t i = 0; i < s.size(); i += 8) {
      uint64_t w = 0;
      std::memcpy(&w, s.data() + i, std::min<size_t>(8, s.size() - i));
      add(w);
    }
  }
};

enum Tag : uint64_t {
  kNone = 1, kBool, kInt, kDouble, kString, kIntList, kDoubleList, kBoolList, kList, kTuple,
  kDevice, kComplex, kNode, kRef, kArgValue, kArgTensor, kArgTensorList, kArgOptList, kNoRef,
};

// False when the value has a kind the wire encoding would not produce from this IValue alone.
bool hash_value(Hasher& h, const c10::IValue& v, int depth = 0) {
  if (depth > 8) return false;
  // An undefined tensor travels as None (torch::jit::toPyObject).
  if (v.isNone() || (v.isTensor() && !v.toTensor().defined())) { h.add(kNone); return true; }
  if (v.isTensor()) {
    // A wrapped number (a Python scalar as a 0-dim CPU tensor) travels as that number.
    const auto& t = v.toTensor();
    if (!t.unsafeGetTensorImpl()->is_wrapped_number() || !t.device().is_cpu()) return false;
    switch (t.scalar_type()) {
      case c10::ScalarType::Bool: h.add(kBool); h.add(*t.const_data_ptr<bool>()); return true;
      case c10::ScalarType::Long:
        h.add(kInt); h.add(static_cast<uint64_t>(*t.const_data_ptr<int64_t>())); return true;
      case c10::ScalarType::Double: h.add(kDouble); h.add_double(*t.const_data_ptr<double>()); return true;
      case c10::ScalarType::ComplexDouble: {
        auto c = *t.const_data_ptr<c10::complex<double>>();
        h.add(kComplex); h.add_double(c.real()); h.add_double(c.imag());
        return true;
      }
      default: return false;
    }
  }
  if (v.isBool()) { h.add(kBool); h.add(v.toBool()); return true; }
  if (v.isInt()) { h.add(kInt); h.add(static_cast<uint64_t>(v.toInt())); return true; }
  if (v.isDouble()) { h.add(kDouble); h.add_double(v.toDouble()); return true; }
  if (v.isString()) { h.add(kString); h.add_string(v.toStringRef()); return true; }
  if (v.isComplexDouble()) {
    auto c = v.toComplexDouble();
    h.add(kComplex); h.add_double(c.real()); h.add_double(c.imag());
    return true;
  }
  if (v.isDevice()) {
    auto d = v.toDevice();
    h.add(kDevice); h.add(static_cast<uint64_t>(d.type())); h.add(static_cast<uint64_t>(d.index()));
    return true;
  }
  if (v.isIntList()) {
    h.add(kIntList);
    auto l = v.toIntList();
    h.add(l.size());
    for (int64_t x : l) h.add(static_cast<uint64_t>(x));
    return true;
  }
  if (v.isDoubleList()) {
    h.add(kDoubleList);
    auto l = v.toDoubleList();
    h.add(l.size());
    for (double x : l) h.add_double(x);
    return true;
  }
  if (v.isBoolList()) {
    h.add(kBoolList);
    auto l = v.toBoolList();
    h.add(l.size());
    for (bool x : l) h.add(x);
    return true;
  }
  if (v.isList()) {
    h.add(kList);
    auto l = v.toListRef();
    h.add(l.size());
    for (const auto& x : l)
      if (!hash_value(h, x, depth + 1)) return false;
    return true;
  }
  if (v.isTuple()) {
    h.add(kTuple);
    const auto& l = v.toTupleRef().elements();
    h.add(l.size());
    for (const auto& x : l)
      if (!hash_value(h, x, depth + 1)) return false;
    return true;
  }
  if (v.isSymInt()) {
    auto i = v.toSymInt().maybe_as_int();
    if (!i.has_value()) return false;
    h.add(kInt); h.add(static_cast<uint64_t>(*i));
    return true;
  }
  if (v.isSymFloat()) {
    auto f = v.toSymFloat();
    if (f.is_symbolic()) return false;
    h.add(kDouble); h.add_double(f.as_float_unchecked());
    return true;
  }
  if (std::getenv("GENIE_DEBUG_DIGEST")) fprintf(stderr, "genie digest: no fingerprint for a %s\n", v.tagKind().c_str());
  return false;
}

// 1: the schema types the argument int (or SymInt, optional or not); 2: int[]; 0: other.
int int_kind(const c10::TypePtr& declared) {
  c10::TypePtr t = declared;
  if (t->kind() == c10::TypeKind::OptionalType) t = t->castRaw<c10::OptionalType>()->getElementType();
  auto k = t->kind();
  if (k == c10::TypeKind::IntType || k == c10::TypeKind::SymIntType) return 1;
  if (k == c10::TypeKind::ListType) {
    auto e = t->castRaw<c10::ListType>()->getElementType()->kind();
    if (e == c10::TypeKind::IntType || e == c10::TypeKind::SymIntType) return 2;
  }
  return 0;
}

}  // namespace

ProgramDigest digest_program(const std::vector<std::shared_ptr<Node>>& nodes, size_t prefix_nodes,
                             bool paths) {
  ProgramDigest d;
  Hasher h;
  Hasher hs;  // the structure (Note: [Program templates])
  d.params.reserve(nodes.size() * 24);
  auto param = [&](int64_t v, int32_t k, int32_t field, int32_t i, int32_t part, int32_t j) {
    d.params.push_back(v);
    if (paths) d.param_paths.push_back({k, field, i, part, j});
  };
  std::unordered_map<StorageId, int64_t> local;
  local.reserve(nodes.size() * 2);
  // The same numbering as encode_program: first appearance over inputs, outputs (undefined
  // ones skipped), writes, creations.
  auto loc = [&](StorageId s) -> int64_t {
    auto [it, inserted] = local.emplace(s, static_cast<int64_t>(d.binding.size()));
    if (inserted) d.binding.push_back(s);
    return it->second;
  };
  // field: 2 for an input, 3 for an output (their places in an encoded node).
  auto ref = [&](const TensorRef& r, int32_t k, int32_t field, int32_t i) {
    h.add(kRef);
    hs.add(kRef);
    auto l = static_cast<uint64_t>(loc(r.storage));
    h.add(l);
    hs.add(l);
    h.add(static_cast<uint64_t>(r.dtype));
    hs.add(static_cast<uint64_t>(r.dtype));
    h.add(r.sizes.size());
    hs.add(r.sizes.size());
    for (size_t j = 0; j < r.sizes.size(); ++j) {
      h.add(static_cast<uint64_t>(r.sizes[j]));
      param(r.sizes[j], k, field, i, 2, static_cast<int32_t>(j));
    }
    for (size_t j = 0; j < r.strides.size(); ++j) {
      h.add(static_cast<uint64_t>(r.strides[j]));
      param(r.strides[j], k, field, i, 3, static_cast<int32_t>(j));
    }
    h.add(static_cast<uint64_t>(r.offset));
    param(r.offset, k, field, i, 4, -1);
    h.add(static_cast<uint64_t>(r.storage_nbytes));
    param(r.storage_nbytes, k, field, i, 5, -1);
  };
  for (size_t k = 0; k < nodes.size(); ++k) {
    if (k == prefix_nodes) {
      d.prefix = {h.a, h.b};
      d.structure_prefix = {hs.a, hs.b};
    }
    const Node& n = *nodes[k];
    const auto kk = static_cast<int32_t>(k);
    h.add(kNode);
    hs.add(kNode);
    // The operator's registration is unique and lives as long as the process.
    h.add(reinterpret_cast<uint64_t>(&n.op->operator_name()));
    hs.add(reinterpret_cast<uint64_t>(&n.op->operator_name()));
    const auto& schema_args = n.op->schema().arguments();
    for (size_t ai = 0; ai < n.args.size(); ++ai) {
      const auto& a = n.args[ai];
      const auto ii = static_cast<int32_t>(ai);
      switch (a.kind) {
        case Arg::Kind::Value: {
          h.add(kArgValue);
          hs.add(kArgValue);
          if (!hash_value(h, a.value)) {
            if (std::getenv("GENIE_DEBUG_DIGEST")) fprintf(stderr, "genie digest: in %s\n", n.name().c_str());
            return d;
          }
          const int ik = ai < schema_args.size() ? int_kind(schema_args[ai].type()) : 0;
          const auto& v = a.value;
          if (ik == 1 && v.isInt()) {
            hs.add(kInt);
            param(v.toInt(), kk, 1, ii, 1, -1);
          } else if (ik == 1 && v.isSymInt() && v.toSymInt().maybe_as_int().has_value()) {
            hs.add(kInt);
            param(*v.toSymInt().maybe_as_int(), kk, 1, ii, 1, -1);
          } else if (v.isTensor() && v.toTensor().defined() &&
                     v.toTensor().unsafeGetTensorImpl()->is_wrapped_number() &&
                     v.toTensor().scalar_type() == c10::ScalarType::Long) {
            // A Python int where the schema wants a tensor (x + past_length): it travels as
            // an int too.
            hs.add(kInt);
            param(*v.toTensor().const_data_ptr<int64_t>(), kk, 1, ii, 1, -1);
          } else if (ik == 2 && v.isIntList()) {
            auto l = v.toIntList();
            hs.add(kIntList);
            hs.add(l.size());
            for (size_t j = 0; j < l.size(); ++j) param(l.get(j), kk, 1, ii, 1, static_cast<int32_t>(j));
          } else {
            hash_value(hs, v);
          }
          break;
        }
        case Arg::Kind::Tensor:
          h.add(kArgTensor);
          h.add(static_cast<uint64_t>(a.refs[0]));
          hs.add(kArgTensor);
          hs.add(static_cast<uint64_t>(a.refs[0]));
          break;
        case Arg::Kind::TensorList:
        case Arg::Kind::OptionalTensorList:
          h.add(a.kind == Arg::Kind::TensorList ? kArgTensorList : kArgOptList);
          h.add(a.refs.size());
          hs.add(a.kind == Arg::Kind::TensorList ? kArgTensorList : kArgOptList);
          hs.add(a.refs.size());
          for (auto i : a.refs) {
            h.add(static_cast<uint64_t>(i));
            hs.add(static_cast<uint64_t>(i));
          }
          break;
      }
    }
    for (size_t i = 0; i < n.inputs.size(); ++i) ref(n.inputs[i], kk, 2, static_cast<int32_t>(i));
    for (size_t i = 0; i < n.outputs.size(); ++i) {
      if (n.output_alias[i] == kUndefinedOutput) {
        h.add(kNoRef);
        hs.add(kNoRef);
      } else {
        ref(n.outputs[i], kk, 3, static_cast<int32_t>(i));
      }
      h.add(static_cast<uint64_t>(n.output_alias[i]));
      hs.add(static_cast<uint64_t>(n.output_alias[i]));
    }
    // Writes, creations and randomness: the same in both fingerprints.
    for (Hasher* x : {&h, &hs}) {
      x->add(n.writes.size());
      for (auto s : n.writes) x->add(static_cast<uint64_t>(loc(s)));
      x->add(n.fresh.size());
      for (auto s : n.fresh) x->add(static_cast<uint64_t>(loc(s)));
      x->add(n.rng_state.has_value());
    }
    if (n.rng_state.has_value()) d.rng.emplace_back(static_cast<int64_t>(k), *n.rng_state);
  }
  if (nodes.size() <= prefix_nodes) {
    d.prefix = {h.a, h.b};
    d.structure_prefix = {hs.a, hs.b};
  }
  d.fingerprint = {h.a, h.b};
  // The parameter count is part of the structure (it follows from ranks and list lengths, but
  // saying so costs nothing).
  hs.add(d.params.size());
  d.structure = {hs.a, hs.b};
  d.ok = true;
  return d;
}

}  // namespace genie
