#include "capture/kernels.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/EmptyTensor.h>
#include <ATen/SDPBackend.h>
#include <ATen/native/DispatchStub.h>
#include <ATen/native/transformers/attention.h>
#include <ATen/ops/_reshape_alias_native.h>
#include <ATen/ops/as_strided_native.h>
#include <ATen/ops/view_native.h>
#include <c10/core/TensorImpl.h>
#include <torch/library.h>

#include <atomic>
#include <mutex>
#include <sstream>
#include <unordered_map>

#include "capture/device.h"
#include "capture/errors.h"
#include "capture/executor.h"
#include "capture/recorder.h"
#include "capture/shape_cache.h"
#include "capture/stack.h"
#include "capture/storage.h"

namespace genie {
namespace {

constexpr auto kRemote = c10::DeviceType::PrivateUse1;
std::atomic<c10::DeviceType> g_target_type{c10::DeviceType::CPU};

bool is_remote(const at::Tensor& t) { return t.defined() && t.device().type() == kRemote; }

at::Tensor wrap(c10::Storage storage, const Geometry& g, c10::DispatchKey key = c10::DispatchKey::PrivateUse1) {
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

// What a schema says about mutation and returned arguments; computed once per operator.
struct OpInfo {
  std::vector<bool> arg_is_write;
  std::vector<int> return_self_arg;  // a return that *is* a mutated argument (in-place, out=)
  bool explicit_rng = false;         // has a Generator? argument
  bool implicit_rng = false;         // draws from the default generator without one
  bool empty_factory = false;
};

const OpInfo& op_info_slow(const c10::OperatorHandle& op);

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

const OpInfo& op_info_slow(const c10::OperatorHandle& op) {
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

template <typename T>
void put(std::string& out, const T& v) {
  out.append(reinterpret_cast<const char*>(&v), sizeof(T));
}

// The arguments of one op call, split into the node's inputs and a cache key.
struct Scan {
  std::shared_ptr<Node> node = std::make_shared<Node>();
  std::vector<at::Tensor> tensors;  // parallel to node->inputs: what the caller passed
  std::string key;
  bool cacheable = true;
  c10::DeviceIndex device = -1;
  std::unordered_map<StorageId, int32_t> slot_of;
};

// Note: [Conjugate and negative views]
// x.conj() and the negative view are metadata like other views: a bit on the tensor, not in the
// storage. Recorded references carry no bits, so a view with one reaching a recorded op (the
// ops PyTorch lets see such views: copy_, mm, dot...) is first resolved into a fresh tensor by
// recorded ops (conj_physical, neg) on the view without the bit; values read at fetch time get
// the bits back on the host. A write through such a view is refused.
at::Tensor resolve_math_bits(const Scan& s, const at::Tensor& t, bool written) {
  if (written)
    raise_error(ErrorKind::Unsupported, "genie: " + s.node->name() +
                                            " writes through a conjugate or negative view; "
                                            "call resolve_conj() / resolve_neg() on it first");
  at::Tensor r = t;
  if (r.is_neg()) r = at::neg(at::_neg_view(r));
  if (r.is_conj()) r = at::conj_physical(at::_conj(r));
  return r;
}

int32_t scan_tensor(Scan& s, const at::Tensor& t_in, bool written = false) {
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

bool is_inline_scalar(const at::Tensor& t) {
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

std::shared_ptr<const ShapeResult> infer_meta(const c10::OperatorHandle& op, const Scan& s) {
  const Node& node = *s.node;
  const auto& info = op_info(op);
  std::unordered_map<StorageId, c10::Storage> storages;
  std::unordered_map<const c10::StorageImpl*, int32_t> first_input_of;
  std::vector<at::Tensor> metas(node.inputs.size());
  auto make = [&](int32_t i) {
    if (metas[i].defined()) return metas[i];
    const TensorRef& r = node.inputs[i];
    auto& st = storages[r.storage];
    if (!st) {
      st = c10::Storage(c10::Storage::use_byte_size_t(), r.storage_nbytes,
                        c10::GetAllocator(c10::DeviceType::Meta), /*resizable=*/true);
    }
    first_input_of.emplace(st.unsafeGetStorageImpl(), i);
    Geometry g{r.dtype, {r.sizes.begin(), r.sizes.end()}, {r.strides.begin(), r.strides.end()}, r.offset,
               r.storage_nbytes};
    metas[i] = wrap(st, g, c10::DispatchKey::Meta);
    if (s.tensors[i].unsafeGetTensorImpl()->is_wrapped_number())
      metas[i].unsafeGetTensorImpl()->set_wrapped_number(true);
    return metas[i];
  };
  auto stack = build_stack(node, make, c10::Device(c10::DeviceType::Meta), /*drop_generator=*/true);
  auto result = std::make_shared<ShapeResult>();
  try {
    op.callBoxed(stack);
  } catch (const std::exception& e) {
    // No usable meta kernel, or the output shape depends on data: run on real data.
    result->eager = true;
    return result;
  }
  auto spec_of = [&](const at::Tensor& t) {
    OutSpec o;
    if (!t.defined()) {
      o.undefined = true;
      return o;
    }
    o.geo = geometry_of(t);
    auto it = first_input_of.find(t.storage().unsafeGetStorageImpl());
    o.alias = it == first_input_of.end() ? -1 : it->second;
    return o;
  };
  for (auto& v : stack) {
    ReturnSpec r;
    if (v.isTensor()) {
      r.kind = ReturnSpec::Kind::Tensor;
      r.tensors.push_back(spec_of(v.toTensor()));
    } else if (v.isTensorList()) {
      r.kind = ReturnSpec::Kind::TensorList;
      for (const auto& t : v.toTensorList()) r.tensors.push_back(spec_of(t));
    } else {
      r.value = v;
    }
    result->returns.push_back(std::move(r));
  }
  for (size_t i = 0; i < node.args.size(); ++i) {
    if (!info.arg_is_write[i]) continue;
    for (auto ref : node.args[i].refs) {
      if (ref >= 0 && metas[ref].defined()) result->mutated.emplace_back(ref, geometry_of(metas[ref]));
    }
  }
  return result;
}

OutSpec contiguous_spec(c10::ScalarType dtype, std::vector<int64_t> sizes) {
  OutSpec o;
  o.geo.dtype = dtype;
  auto strides = c10::contiguous_strides(sizes);
  o.geo.strides.assign(strides.begin(), strides.end());
  int64_t numel = 1;
  for (auto v : sizes) numel *= v;
  o.geo.nbytes = numel * static_cast<int64_t>(c10::elementSize(dtype));
  o.geo.sizes = std::move(sizes);
  return o;
}

// PyTorch's meta for multilabel_margin_loss_forward (its decomposition) says [1] for a 1-D input
// with reduction='none'; the CPU and CUDA kernels both return a 0-dim loss.
std::shared_ptr<const ShapeResult> multilabel_margin_shape(const Scan& s) {
  const Node& n = *s.node;
  if (n.args.size() != 3 || n.args[0].kind != Arg::Kind::Tensor || n.args[1].kind != Arg::Kind::Tensor ||
      n.args[0].refs[0] < 0 || n.args[1].refs[0] < 0 || !n.args[2].value.isInt() || n.args[2].value.toInt() != 0)
    return nullptr;
  const TensorRef& x = n.inputs[n.args[0].refs[0]];
  const TensorRef& t = n.inputs[n.args[1].refs[0]];
  if (x.sizes.size() != 1 || x.sizes[0] == 0 || t.sizes != x.sizes || t.dtype != at::kLong) return nullptr;
  auto result = std::make_shared<ShapeResult>();
  for (auto sizes : {std::vector<int64_t>{}, std::vector<int64_t>{x.sizes[0]}}) {
    ReturnSpec r;
    r.kind = ReturnSpec::Kind::Tensor;
    r.tensors.push_back(contiguous_spec(x.dtype, sizes));
    result->returns.push_back(std::move(r));
  }
  return result;
}

// Note: [C++ shape functions]
// The hottest ops whose meta kernels torch registers from Python (~300 us for layer norm, and
// absent when no interpreter is loaded) get their output geometry here, mirroring the CPU
// kernel's allocation, and so do the cases where PyTorch's meta disagrees with every kernel.
// Anything outside the cases handled returns nullptr and goes to meta.
std::shared_ptr<const ShapeResult> cpp_shape(const c10::OperatorHandle& op, const Scan& s) {
  static const c10::OperatorName layer_norm("aten::native_layer_norm", "");
  static const c10::OperatorName multilabel_margin("aten::multilabel_margin_loss_forward", "");
  if (op.operator_name() == multilabel_margin) return multilabel_margin_shape(s);
  if (op.operator_name() != layer_norm) return nullptr;
  const Node& n = *s.node;
  if (n.args.size() != 5 || n.args[0].kind != Arg::Kind::Tensor || n.args[0].refs[0] < 0) return nullptr;
  const TensorRef& x = n.inputs[n.args[0].refs[0]];
  if (x.dtype != at::kFloat && x.dtype != at::kDouble) return nullptr;
  for (int a : {2, 3}) {  // weight and bias: absent, or the input's dtype
    const Arg& arg = n.args[a];
    if (arg.kind == Arg::Kind::Tensor && arg.refs[0] >= 0 && n.inputs[arg.refs[0]].dtype != x.dtype) return nullptr;
    if (arg.kind == Arg::Kind::Value && !arg.value.isNone()) return nullptr;
  }
  const auto& shape_arg = n.args[1].value;
  if (!shape_arg.isList()) return nullptr;
  auto normalized = shape_arg.toListRef();
  const int64_t dim = static_cast<int64_t>(x.sizes.size());
  const int64_t axis = dim - static_cast<int64_t>(normalized.size());
  if (axis < 0) return nullptr;
  for (int64_t i = 0; i < static_cast<int64_t>(normalized.size()); ++i) {
    const auto& v = normalized[i];
    int64_t want = v.isInt() ? v.toInt() : v.isSymInt() ? v.toSymInt().expect_int() : -1;
    if (want != x.sizes[axis + i]) return nullptr;  // let meta raise the eager error
  }
  auto contiguous = [&](std::vector<int64_t> sizes) { return contiguous_spec(x.dtype, std::move(sizes)); };
  std::vector<int64_t> stat(x.sizes.begin(), x.sizes.begin() + axis);
  stat.resize(dim, 1);
  auto result = std::make_shared<ShapeResult>();
  std::vector<int64_t> all(x.sizes.begin(), x.sizes.end());
  for (auto sizes : {all, stat, stat}) {
    ReturnSpec r;
    r.kind = ReturnSpec::Kind::Tensor;
    r.tensors.push_back(contiguous(sizes));
    result->returns.push_back(std::move(r));
  }
  return result;
}

// Note: [CPU kernels' saved statistics]
// PyTorch's meta kernels for the normalisation ops type and size their saved statistics as the
// CUDA kernels allocate them (float32, one per channel). The CPU kernels keep them in the
// parameters' dtype (the input's, unless a float32 parameter makes the op mixed) and, for batch
// norm in eval mode, empty. When flushes run on a CPU, capture gives these two outputs the CPU
// kernels' geometry, so the user's tensors are eager's; the shape cache is cleared whenever the
// target device type changes (set_target_device_type).
std::shared_ptr<const ShapeResult> cpu_saved_stats(const c10::OperatorHandle& op, const Scan& s,
                                                   std::shared_ptr<const ShapeResult> shapes) {
  if (g_target_type.load() != c10::DeviceType::CPU || shapes->eager) return shapes;
  static const c10::OperatorName batch_norm("aten::native_batch_norm", "");
  static const c10::OperatorName legit("aten::_native_batch_norm_legit", "");
  static const c10::OperatorName legit_no_stats("aten::_native_batch_norm_legit", "no_stats");
  static const c10::OperatorName with_update("aten::_batch_norm_with_update", "");
  static const c10::OperatorName layer_norm("aten::native_layer_norm", "");
  const auto& name = op.operator_name();
  int training_arg = -1;  // -1: always training (or layer norm)
  if (name == batch_norm || name == legit) training_arg = 5;
  else if (name == legit_no_stats) training_arg = 3;
  else if (name != with_update && name != layer_norm) return shapes;
  const Node& n = *s.node;
  if (n.args.empty() || n.args[0].kind != Arg::Kind::Tensor || n.args[0].refs[0] < 0) return shapes;
  const auto x = n.inputs[n.args[0].refs[0]].dtype;
  const bool reduced = x == at::kHalf || x == at::kBFloat16;
  bool mixed = false;
  for (size_t i = 1; i < n.args.size(); ++i) {
    const Arg& a = n.args[i];
    if (a.kind == Arg::Kind::Tensor && a.refs[0] >= 0) mixed = mixed || (reduced && n.inputs[a.refs[0]].dtype == at::kFloat);
  }
  bool empty = false;
  if (training_arg >= 0) {
    const auto& t = n.args[training_arg].value;
    if (!t.isBool()) return shapes;
    if (!t.toBool() && name == legit_no_stats) return shapes;  // eval without statistics: eager fails
    empty = !t.toBool();
  }
  auto out = std::make_shared<ShapeResult>(*shapes);
  for (size_t r : {size_t{1}, size_t{2}}) {
    if (r >= out->returns.size() || out->returns[r].kind != ReturnSpec::Kind::Tensor) return shapes;
    OutSpec& o = out->returns[r].tensors[0];
    if (o.undefined || o.alias >= 0) return shapes;
    o = contiguous_spec(mixed ? at::kFloat : x, empty ? std::vector<int64_t>{0} : o.geo.sizes);
  }
  return out;
}

// Note: [Backend RNG]
// Random ops record the generator state they start from and advance the generator exactly
// as eager CPU would, by running the op once on dummy CPU inputs of the same geometry. Replay
// runs the op on the CPU with the recorded state, so torch.manual_seed(s) gives the values
// eager CPU gives for the same program.
void capture_rng(const c10::OperatorHandle& op, Node& node, const OpInfo& info, c10::ArrayRef<c10::IValue> args,
                 c10::DeviceIndex device) {
  at::Generator gen;
  for (const auto& v : args) {
    if (v.isGenerator()) gen = v.toGenerator();
  }
  if (!gen.defined() || gen.device().type() != kRemote) {
    TORCH_CHECK(!gen.defined(), "genie: ", node.name(), " got a generator on ", gen.device(),
                "; pass a remote_accelerator generator or none");
    gen = default_generator(device);
  }
  at::Tensor state;
  {
    std::lock_guard<std::mutex> lock(gen.mutex());
    state = gen.get_state();
  }
  auto cpu_gen = at::make_generator<at::CPUGeneratorImpl>();
  cpu_gen.set_state(state);
  auto make = [&](int32_t i) {
    const TensorRef& r = node.inputs[i];
    return at::ones(c10::IntArrayRef(r.sizes), at::TensorOptions().dtype(r.dtype));
  };
  auto stack = build_stack(node, make, c10::Device(c10::DeviceType::CPU), /*drop_generator=*/false);
  for (auto& v : stack) {
    if (v.isGenerator()) v = c10::IValue(cpu_gen);
  }
  const auto& schema_args = op.schema().arguments();
  for (size_t i = 0; i < schema_args.size(); ++i) {
    if (stack[i].isNone() && schema_args[i].type()->kind() == c10::TypeKind::OptionalType &&
        schema_args[i].type()->castRaw<c10::OptionalType>()->getElementType()->kind() ==
            c10::TypeKind::GeneratorType)
      stack[i] = c10::IValue(cpu_gen);
  }
  if (info.implicit_rng) {
    // The op reads the CPU default generator: lend it our state for the dummy run.
    auto cpu_default = at::detail::getDefaultCPUGenerator();
    at::Tensor saved;
    {
      std::lock_guard<std::mutex> lock(cpu_default.mutex());
      saved = cpu_default.get_state();
      cpu_default.set_state(state);
    }
    try {
      op.callBoxed(stack);
    } catch (...) {
      std::lock_guard<std::mutex> lock(cpu_default.mutex());
      cpu_default.set_state(saved);
      throw;
    }
    std::lock_guard<std::mutex> lock(cpu_default.mutex());
    cpu_gen.set_state(cpu_default.get_state());
    cpu_default.set_state(saved);
  } else {
    op.callBoxed(stack);
  }
  {
    std::lock_guard<std::mutex> lock(gen.mutex());
    gen.set_state(cpu_gen.get_state());
  }
  node.rng_state = state;
}

// Data-dependent ops (nonzero, unique, masked_select, boolean indexing, equal) and ops with no
// meta kernel: flush what their inputs need, run them now, keep the results on the executor.
void capture_eager(const c10::OperatorHandle& op, Scan& s, torch::jit::Stack* stack, size_t nargs) {
  auto& rec = recorder();
  std::vector<StorageId> ids;
  for (const auto& r : s.node->inputs) ids.push_back(r.storage);
  rec.flush(ids);
  for (auto id : ids) rec.check_not_poisoned(id);
  auto exec = rec.executor();
  Node& node = *s.node;
  node.eager = true;
  auto results = exec->run_eager(node);
  torch::jit::drop(*stack, nargs);
  auto to_remote = [&](const at::Tensor& real) {
    if (!real.defined()) {
      node.outputs.emplace_back();
      node.output_alias.push_back(kUndefinedOutput);
      return at::Tensor();
    }
    Geometry g = geometry_of(real);
    auto t = wrap(fresh_storage(g.nbytes, s.device), g);
    auto ref = make_ref(t, storage_id(t.storage()));
    exec->bind(ref, real);
    node.outputs.push_back(ref);
    node.output_alias.push_back(-1);
    node.fresh.push_back(ref.storage);
    return t;
  };
  for (auto& v : results) {
    if (v.isTensor()) {
      stack->emplace_back(to_remote(v.toTensor()));
    } else if (v.isTensorList()) {
      c10::List<at::Tensor> l;
      for (const auto& t : v.toTensorList()) l.push_back(to_remote(t));
      stack->emplace_back(std::move(l));
    } else {
      stack->push_back(std::move(v));
    }
  }
}

}  // namespace

void set_target_device_type(c10::DeviceType type) {
  // Some shapes follow the target (Note: [CPU kernels' saved statistics]).
  if (g_target_type.exchange(type) != type) shape_cache().clear();
}

void capture_kernel(const c10::OperatorHandle& op, c10::DispatchKeySet, torch::jit::Stack* stack) {
  const auto& info = op_info(op);
  const size_t nargs = op.schema().arguments().size();
  auto args = torch::jit::last(*stack, nargs);
  Scan s = scan_args(op, args);
  Node& node = *s.node;
  node.empty_factory = info.empty_factory;

  std::shared_ptr<const ShapeResult> shapes = s.cacheable ? shape_cache().find(s.key) : nullptr;
  if (!shapes) {
    shapes = cpp_shape(op, s);
    if (!shapes) shapes = infer_meta(op, s);
    shapes = cpu_saved_stats(op, s, std::move(shapes));
    if (s.cacheable) shape_cache().insert(s.key, shapes);
  }
  if (shapes->eager) {
    capture_eager(op, s, stack, nargs);
    return;
  }
  if (info.explicit_rng || info.implicit_rng) capture_rng(op, node, info, args, s.device);

  for (size_t i = 0; i < nargs; ++i) {
    if (!info.arg_is_write[i]) continue;
    for (auto ref : node.args[i].refs) {
      if (ref >= 0 && is_remote(s.tensors[ref])) node.writes.push_back(node.inputs[ref].storage);
    }
  }
  // In-place ops that change their argument's geometry (resize_, squeeze_, out= resizing).
  for (const auto& [ref, g] : shapes->mutated) {
    auto& t = s.tensors[ref];
    if (!is_remote(t)) continue;
    auto* impl = t.unsafeGetTensorImpl();
    impl->set_sizes_and_strides(g.sizes, g.strides, g.offset);
    if (static_cast<size_t>(g.nbytes) > t.storage().nbytes())
      t.storage().unsafeGetStorageImpl()->set_nbytes(g.nbytes);
  }

  auto out_tensor = [&](const OutSpec& o, int self_arg) -> at::Tensor {
    at::Tensor t;
    if (o.undefined) {
      node.outputs.emplace_back();
      node.output_alias.push_back(kUndefinedOutput);
      return t;
    }
    if (self_arg >= 0 && args[self_arg].isTensor() && is_remote(args[self_arg].toTensor())) {
      t = args[self_arg].toTensor();
    } else if (o.alias >= 0 && is_remote(s.tensors[o.alias])) {
      t = wrap(s.tensors[o.alias].storage(), o.geo);
    } else {
      // Some meta kernels hand back 0-dim results over 0-byte storages (SDPA's unused RNG
      // outputs); give every fresh storage at least the bytes its view addresses.
      auto needed = at::detail::computeStorageNbytes(o.geo.sizes, o.geo.strides, c10::elementSize(o.geo.dtype),
                                                     o.geo.offset);
      t = wrap(fresh_storage(std::max<int64_t>(o.geo.nbytes, static_cast<int64_t>(needed)), s.device), o.geo);
      node.fresh.push_back(storage_id(t.storage()));
    }
    node.outputs.push_back(make_ref(t, storage_id(t.storage())));
    node.output_alias.push_back(o.alias >= 0 && is_remote(s.tensors[o.alias]) ? o.alias : -1);
    return t;
  };
  torch::jit::Stack outs;
  outs.reserve(shapes->returns.size());
  for (size_t ri = 0; ri < shapes->returns.size(); ++ri) {
    const auto& r = shapes->returns[ri];
    int self_arg = ri < info.return_self_arg.size() ? info.return_self_arg[ri] : -1;
    switch (r.kind) {
      case ReturnSpec::Kind::Tensor:
        outs.emplace_back(out_tensor(r.tensors[0], self_arg));
        break;
      case ReturnSpec::Kind::TensorList: {
        c10::List<at::Tensor> l;
        for (const auto& o : r.tensors) l.push_back(out_tensor(o, -1));
        outs.emplace_back(std::move(l));
        break;
      }
      case ReturnSpec::Kind::Value:
        outs.push_back(r.value);
        break;
    }
  }
  recorder().record(s.node);
  torch::jit::drop(*stack, nargs);
  for (auto& v : outs) stack->push_back(std::move(v));
}

namespace {

const c10::OperatorHandle& copy_op() {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("aten::copy_", "");
  return op;
}

// Makes the real value of a remote tensor available: flush, then fetch it to the host.
at::Tensor fetch_remote(const at::Tensor& t) {
  auto id = storage_id(t.storage());
  auto& rec = recorder();
  auto ref = make_ref(t, id);
  rec.flush({id}, ref);
  rec.check_not_poisoned(id);
  auto real = rec.executor()->fetch(ref);
  // Note: [Conjugate and negative views]: the bits come back as views of the fetched value.
  if (t.is_neg()) real = at::_neg_view(real);
  if (t.is_conj()) real = at::_conj(real);
  return real;
}

bool covers_storage(const at::Tensor& t) {
  return t.is_contiguous() && t.storage_offset() == 0 &&
         static_cast<size_t>(t.numel()) * t.element_size() == t.storage().nbytes();
}

at::Tensor copy_from(const at::Tensor& self, const at::Tensor& dst, bool non_blocking) {
  if (is_remote(self) && !is_remote(dst)) {
    // Materialization: the host needs the value.
    auto real = fetch_remote(self);
    dst.copy_(real, non_blocking);
    return dst;
  }
  TORCH_CHECK(is_remote(dst), "genie: _copy_from expects a remote_accelerator tensor on one side");
  if (!is_remote(self)) {
    // Upload. Eager .to() snapshots the source, so the recorded value must not change later.
    at::Tensor src = self.device().type() == c10::DeviceType::CPU ? self : self.cpu();
    // One contiguous private copy, recorded with its own geometry (a view's strides and offset
    // describe its source's storage, not the copy's).
    at::Tensor snap = src.contiguous();
    if (snap.data_ptr() == src.data_ptr()) snap = snap.clone();
    if (covers_storage(dst) && snap.scalar_type() == dst.scalar_type() && snap.sizes() == dst.sizes() &&
        recorder().replace_empty_with_constant(storage_id(dst.storage()), snap)) {
      return dst;
    }
    auto cid = recorder().add_constant(snap, dst.device().index(), /*snapshot=*/false);
    auto node = std::make_shared<Node>();
    node->op = copy_op();
    node->inputs.push_back(make_ref(dst, storage_id(dst.storage())));
    node->inputs.push_back(make_ref(snap, cid));
    node->args.resize(3);
    node->args[0].kind = Arg::Kind::Tensor;
    node->args[0].refs = {0};
    node->args[1].kind = Arg::Kind::Tensor;
    node->args[1].refs = {1};
    node->args[2].value = c10::IValue(false);
    node->outputs.push_back(node->inputs[0]);
    node->output_alias.push_back(0);
    node->writes.push_back(node->inputs[0].storage);
    recorder().record(std::move(node));
    return dst;
  }
  // remote -> remote: recorded like any other op.
  torch::jit::Stack stack{c10::IValue(dst), c10::IValue(self), c10::IValue(non_blocking)};
  capture_kernel(copy_op(), c10::DispatchKeySet(c10::DispatchKey::PrivateUse1), &stack);
  return dst;
}

at::Tensor copy_from_and_resize(const at::Tensor& self, const at::Tensor& dst) {
  if (dst.sizes() != self.sizes()) dst.resize_(self.sizes());
  return copy_from(self, dst, false);
}

c10::Scalar local_scalar_dense(const at::Tensor& self) { return fetch_remote(self).item(); }

// set_ only changes which storage a tensor object views: metadata, nothing to record.
at::Tensor& set_storage_offset(at::Tensor& self, c10::Storage source, c10::SymInt offset, c10::SymIntArrayRef size,
                               c10::SymIntArrayRef stride) {
  TORCH_CHECK(is_remote_storage(source), "genie: set_ needs a remote_accelerator storage");
  auto* impl = self.unsafeGetTensorImpl();
  impl->set_storage_keep_dtype(std::move(source));
  auto sizes = C10_AS_INTARRAYREF_SLOW(size);
  std::vector<int64_t> strides;
  if (stride.empty()) {
    auto cs = c10::contiguous_strides(sizes);
    strides.assign(cs.begin(), cs.end());
  }
  else strides = C10_AS_INTARRAYREF_SLOW(stride).vec();
  impl->set_sizes_and_strides(sizes, strides, offset.expect_int());
  return self;
}
at::Tensor& set_tensor(at::Tensor& self, const at::Tensor& source) {
  return set_storage_offset(self, source.storage(), source.storage_offset(), source.sym_sizes(), source.sym_strides());
}
at::Tensor& set_storage(at::Tensor& self, c10::Storage source) {
  int64_t n = static_cast<int64_t>(source.nbytes() / self.element_size());
  std::vector<c10::SymInt> size{c10::SymInt(n)};
  return set_storage_offset(self, std::move(source), 0, size, {});
}

// Module.to() keeps tied parameters tied only when it can re-point the existing Parameter at
// the new data (`param.data = ...`), which PyTorch allows for dense tensors of the backends it
// knows. Dense remote tensors are as interchangeable as CUDA ones.
bool has_compatible_shallow_copy_type(const at::Tensor& self, const at::Tensor& from) {
  auto dense = [](const at::Tensor& t) { return t.layout() == c10::kStrided && !t.is_quantized() && !t.is_nested(); };
  return dense(self) && dense(from);
}

int64_t sdp_choice(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const std::optional<at::Tensor>& mask, double dropout, bool causal,
                   std::optional<double> scale, bool gqa) {
  // Answer as the target device would for tensors of this geometry; the choice reads only
  // shapes, strides and dtypes, so empty tensors on that device stand in for the real ones.
  c10::DeviceType target = g_target_type.load();
  if (target == c10::DeviceType::CUDA && !at::hasCUDA()) {
    // The target is not here to ask: the math path is the one every backend can run.
    return static_cast<int64_t>(at::SDPBackend::math);
  }
  if (target != c10::DeviceType::CPU && target != c10::DeviceType::CUDA)
    return static_cast<int64_t>(at::SDPBackend::math);
  auto like = [target](const at::Tensor& t) {
    // requires_grad too: a backend is not chosen for inputs it cannot differentiate.
    auto e = at::empty_strided(t.sizes(), t.strides(), t.options().device(target));
    return t.requires_grad() ? e.requires_grad_() : e;
  };
  std::optional<at::Tensor> m;
  if (mask.has_value() && mask->defined()) m = like(*mask);
  return at::_fused_sdp_choice(like(q), like(k), like(v), m, dropout, causal, scale, gqa);
}

}  // namespace

int64_t register_direct_kernels() {
  static std::once_flag once;
  static int64_t count = 0;
  std::call_once(once, [] {
    static auto* lib = new torch::Library(torch::Library::IMPL, "aten", c10::DispatchKey::PrivateUse1, __FILE__, __LINE__);
    auto& d = c10::Dispatcher::singleton();
    auto names = d.getRegistrationsForDispatchKey(c10::DispatchKey::CompositeExplicitAutograd);
    auto more = d.getRegistrationsForDispatchKey(c10::DispatchKey::CompositeExplicitAutogradNonFunctional);
    names.insert(names.end(), more.begin(), more.end());
    static const char* kSkip[] = {"copy", "_to_copy", "empty", "_local_scalar_dense", "set_", "resize",
                                  "rand", "normal", "bernoulli", "dropout", "multinomial", "uniform",
                                  "exponential", "cauchy", "geometric", "log_normal", "poisson",
                                  "random", "_fused_sdp_choice", "lift", "_has_compatible",
                                  "_pin_memory", "is_pinned", "_copy_from", "item", "_assert"};
    for (const auto& opname : names) {
      if (opname.name.rfind("aten::", 0) != 0) continue;
      std::string name = opname.name.substr(6);
      if (!opname.overload_name.empty()) name += "." + opname.overload_name;
      bool skip = false;
      for (const char* p : kSkip) {
        if (name.find(p) != std::string::npos) { skip = true; break; }
      }
      if (skip) continue;
      auto handle = d.findOp(opname);
      if (!handle || handle->hasKernelForDispatchKey(c10::DispatchKey::PrivateUse1)) continue;
      // View ops keep their composite kernels, which end in the metadata-only as_strided
      // below: see Note: [Views are metadata].
      bool is_view = false;
      for (const auto& r : handle->schema().returns())
        is_view = is_view || (r.alias_info() != nullptr && !r.alias_info()->isWrite());
      if (is_view) continue;
      lib->impl(name.c_str(), torch::CppFunction::makeFromBoxedFunction<&capture_kernel>());
      ++count;
    }
  });
  return count;
}

TORCH_LIBRARY_IMPL(_, PrivateUse1, m) { m.fallback(torch::CppFunction::makeFromBoxedFunction<&capture_kernel>()); }

namespace {
// Sparse layouts reach their own dispatch keys; refuse them in genie's words, naming the op,
// instead of PyTorch's "Could not run ... from the 'Sparseremote_accelerator' backend".
void refuse_sparse(const c10::OperatorHandle& op, c10::DispatchKeySet, torch::jit::Stack*) {
  const auto& n = op.operator_name();
  raise_error(ErrorKind::Unsupported,
              "genie: " + n.name + (n.overload_name.empty() ? "" : "." + n.overload_name) +
                  " needs a sparse tensor on remote_accelerator, which captures dense strided tensors only; "
                  "call .to_dense() before moving it to the device");
}
}  // namespace

TORCH_LIBRARY_IMPL(_, SparsePrivateUse1, m) { m.fallback(torch::CppFunction::makeFromBoxedFunction<&refuse_sparse>()); }
TORCH_LIBRARY_IMPL(_, SparseCsrPrivateUse1, m) {
  m.fallback(torch::CppFunction::makeFromBoxedFunction<&refuse_sparse>());
}

// Note: [Views are metadata]
// A view changes only which part of a storage a tensor describes, and replay addresses every
// tensor as (storage, dtype, sizes, strides, offset) anyway (Note: [Storage identity]). So
// views are not recorded: PyTorch's own metadata kernels make them, as for CPU tensors, and
// composite view ops (transpose, permute, select, slice, expand...) decompose onto them. A
// view costs what it costs in eager mode and never appears in the graph.
TORCH_LIBRARY_IMPL(aten, PrivateUse1, m) {
  m.impl("as_strided", &at::native::as_strided_tensorimpl);
  m.impl("as_strided_", &at::native::as_strided__symint);
  m.impl("view", &at::native::view);
  m.impl("view.dtype", &at::native::view_dtype);
  m.impl("_reshape_alias", &at::native::_reshape_alias);
  m.impl("_copy_from", &copy_from);
  m.impl("_copy_from_and_resize", &copy_from_and_resize);
  m.impl("_local_scalar_dense", &local_scalar_dense);
  m.impl("_has_compatible_shallow_copy_type", &has_compatible_shallow_copy_type);
  m.impl("set_.source_Storage_storage_offset", &set_storage_offset);
  m.impl("set_.source_Tensor", &set_tensor);
  m.impl("set_.source_Storage", &set_storage);
}

}  // namespace genie

namespace at::native {
REGISTER_PRIVATEUSE1_DISPATCH(_fused_sdp_choice_stub, &genie::sdp_choice)
}  // namespace at::native
