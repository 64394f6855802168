#include "capture/scan.h"

#include <ATen/ATen.h>

#include <mutex>

#include "capture/device.h"
#include "capture/errors.h"
#include "capture/storage.h"

namespace genie {

namespace {
template <typename T>
void put(std::string& out, const T& v) {
  out.append(reinterpret_cast<const char*>(&v), sizeof(T));
}
}  // namespace

static const OpInfo& op_info_slow(const c10::OperatorHandle& op);

bool is_remote(const at::Tensor& t) { return t.defined() && t.device().type() == kRemote; }

at::Tensor wrap(c10::Storage storage, const Geometry& g, c10::DispatchKey key) {
  auto t = at::detail::make_tensor<c10::TensorImpl>(std::move(storage), c10::DispatchKeySet(key),
                                                    c10::scalarTypeToTypeMeta(g.dtype));
  t.unsafeGetTensorImpl()->set_sizes_and_strides(g.sizes, g.strides, g.offset);
  return t;
}

c10::Storage fresh_storage(int64_t nbytes, c10::DeviceIndex index) {
  auto prev = current_device_index();
  set_current_device_index(index);
  c10::Storage s(c10::Storage::use_byte_size_t(), nbytes, remote_allocator(), /*resizable=*/true);
  set_current_device_index(prev);
  return s;
}

Geometry geometry_of(const at::Tensor& t) {
  return {t.scalar_type(), t.sizes().vec(), t.strides().vec(), t.storage_offset(),
          static_cast<int64_t>(t.storage().nbytes())};
}

// Per-thread memo in front of the shared table: the hot path takes no lock.
const OpInfo& op_info(const c10::OperatorHandle& op) {
  thread_local std::unordered_map<const c10::FunctionSchema*, const OpInfo*> memo;
  const auto* key = &op.schema();
  auto it = memo.find(key);
  if (it != memo.end()) return *it->second;
  const OpInfo& info = op_info_slow(op);
  memo.emplace(key, &info);
  return info;
}

static const OpInfo& op_info_slow(const c10::OperatorHandle& op) {
  static std::mutex mutex;
  // Values are never erased, so references into the map stay valid.
  static auto* cache = new std::unordered_map<const c10::FunctionSchema*, OpInfo>();
  const auto& schema = op.schema();
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache->find(&schema);
  if (it != cache->end()) return it->second;
  OpInfo info;
  const auto& args = schema.arguments();
  for (const auto& a : args) {
    info.arg_is_write.push_back(a.alias_info() != nullptr && a.alias_info()->isWrite());
    if (a.type()->kind() == c10::TypeKind::OptionalType &&
        a.type()->castRaw<c10::OptionalType>()->getElementType()->kind() == c10::TypeKind::GeneratorType)
      info.explicit_rng = true;
    if (a.type()->kind() == c10::TypeKind::GeneratorType) info.explicit_rng = true;
  }
  for (const auto& r : schema.returns()) {
    int self = -1;
    if (r.alias_info() != nullptr && r.alias_info()->isWrite()) {
      for (size_t j = 0; j < args.size(); ++j) {
        if (args[j].alias_info() != nullptr && args[j].alias_info()->isWrite() &&
            args[j].alias_info()->beforeSets() == r.alias_info()->beforeSets()) {
          self = static_cast<int>(j);
          break;
        }
      }
    }
    info.return_self_arg.push_back(self);
  }
  const auto& name = schema.name();
  info.implicit_rng = name == "aten::native_dropout";
  info.empty_factory = name == "aten::empty" || name == "aten::empty_strided";
  return cache->emplace(&schema, std::move(info)).first->second;
}

// Note: [Conjugate and negative views]
// x.conj() and the negative view are metadata like other views: a bit on the tensor, not in the
// storage. Recorded references carry no bits, so a view with one reaching a recorded op (the
// ops PyTorch lets see such views: copy_, mm, dot...) is first resolved into a fresh tensor by
// recorded ops (conj_physical, neg) on the view without the bit; values read at fetch time get
// the bits back on the host. A write through such a view is refused.
static at::Tensor resolve_math_bits(const Scan& s, const at::Tensor& t, bool written) {
  if (written)
    raise_error(ErrorKind::Unsupported, "genie: " + s.node->name() +
                                            " writes through a conjugate or negative view; "
                                            "call resolve_conj() / resolve_neg() on it first");
  at::Tensor r = t;
  if (r.is_neg()) r = at::neg(at::_neg_view(r));
  if (r.is_conj()) r = at::conj_physical(at::_conj(r));
  return r;
}

static int32_t scan_tensor(Scan& s, const at::Tensor& t_in, bool written = false) {
  at::Tensor resolved;
  const at::Tensor& t = is_remote(t_in) && (t_in.is_conj() || t_in.is_neg())
                            ? (resolved = resolve_math_bits(s, t_in, written))
                            : t_in;
  if (!t.defined()) {
    s.key.push_back('u');
    return -1;
  }
  if (t.layout() != c10::kStrided || t.is_quantized() || t.is_nested()) {
    raise_error(ErrorKind::Unsupported,
                "genie: " + s.node->name() + " got a " + c10::str(t.layout()) +
                    (t.is_quantized() ? " quantized" : "") + (t.is_nested() ? " nested" : "") +
                    " tensor; remote_accelerator captures dense strided tensors only");
  }
  StorageId id;
  at::Tensor keep = t;
  if (is_remote(t)) {
    id = storage_id(t.storage());
    if (s.device < 0) s.device = t.device().index();
  } else {
    // The logical-device rule: a host tensor in remote computation is a graph input.
    if (t.device().type() != c10::DeviceType::CPU) keep = t.cpu();
    id = recorder().add_constant(keep, std::max<c10::DeviceIndex>(s.device, 0), /*snapshot=*/false);
    s.uploads.emplace_back(id, keep);
  }
  auto [it, inserted] = s.slot_of.emplace(id, static_cast<int32_t>(s.slot_of.size()));
  s.key.push_back('t');
  put(s.key, it->second);
  put(s.key, static_cast<int8_t>(t.scalar_type()));
  put(s.key, static_cast<int32_t>(t.dim()));
  for (auto v : t.sizes()) put(s.key, v);
  for (auto v : t.strides()) put(s.key, v);
  put(s.key, t.storage_offset());
  put(s.key, static_cast<int64_t>(keep.storage().nbytes()));
  s.node->inputs.push_back(make_ref(keep, id));
  s.tensors.push_back(keep);
  return static_cast<int32_t>(s.node->inputs.size() - 1);
}

static bool is_inline_scalar(const at::Tensor& t) {
  return t.defined() && !is_remote(t) && t.device().type() == c10::DeviceType::CPU && t.dim() == 0;
}

Scan scan_args(const c10::OperatorHandle& op, c10::ArrayRef<c10::IValue> args) {
  Scan s;
  s.key.reserve(256);
  put(s.key, &op.schema());
  s.node->op = op;
  s.node->args.resize(args.size());
  for (size_t i = 0; i < args.size(); ++i) {
    const auto& v = args[i];
    Arg& a = s.node->args[i];
    if (v.isTensor()) {
      const auto& t = v.toTensor();
      if (is_inline_scalar(t)) {
        // CPU scalars (wrapped numbers) travel inline; only their dtype affects shapes.
        a.value = v;
        s.key.push_back('w');
        put(s.key, static_cast<int8_t>(t.scalar_type()));
        put(s.key, t.unsafeGetTensorImpl()->is_wrapped_number());
        continue;
      }
      a.kind = Arg::Kind::Tensor;
      a.refs.push_back(scan_tensor(s, t, op_info(op).arg_is_write[i]));
    } else if (v.isTensorList()) {
      a.kind = Arg::Kind::TensorList;
      auto list = v.toTensorList();
      s.key.push_back('[');
      for (size_t j = 0; j < list.size(); ++j) a.refs.push_back(scan_tensor(s, list.get(j), op_info(op).arg_is_write[i]));
      s.key.push_back(']');
    } else if (v.isOptionalTensorList()) {
      a.kind = Arg::Kind::OptionalTensorList;
      auto list = v.toOptionalTensorList();
      s.key.push_back('{');
      for (size_t j = 0; j < list.size(); ++j) {
        std::optional<at::Tensor> e = list.get(j);
        a.refs.push_back(e.has_value() ? scan_tensor(s, *e, op_info(op).arg_is_write[i]) : (s.key.push_back('n'), -1));
      }
      s.key.push_back('}');
    } else {
      a.value = v;
      if (v.isDevice() && v.toDevice().type() == kRemote && s.device < 0) {
        s.device = v.toDevice().has_index() ? v.toDevice().index() : current_device_index();
      }
      if (!encode_value(v, s.key)) s.cacheable = false;
    }
  }
  if (s.device < 0) s.device = current_device_index();
  check_device_index(s.device);
  return s;
}


}  // namespace genie
