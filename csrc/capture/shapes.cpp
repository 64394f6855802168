#include "capture/shapes.h"

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>

#include "capture/errors.h"
#include "capture/kernels.h"
#include "capture/stack.h"

namespace genie {
namespace {

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

// PyTorch's meta for _grouped_mm is the CUDA kernel's: bfloat16 only. The CPU kernel takes any
// floating dtype (HF's grouped-mm MoE layers call it in the model's dtype, float32 in tests),
// so on a CPU target the output is sized here as that kernel allocates it, dense; anything
// unusual (a bias, an output dtype, sizes that do not fit) goes to meta, then to eager.
std::shared_ptr<const ShapeResult> grouped_mm_shape(const Scan& s) {
  if (target_device_type() != c10::DeviceType::CPU) return nullptr;
  const Node& n = *s.node;
  auto tensor = [&](size_t i) -> const TensorRef* {
    if (i >= n.args.size() || n.args[i].kind != Arg::Kind::Tensor || n.args[i].refs[0] < 0) return nullptr;
    return &n.inputs[n.args[i].refs[0]];
  };
  auto none = [&](size_t i) { return i >= n.args.size() || (n.args[i].kind == Arg::Kind::Value && n.args[i].value.isNone()); };
  const TensorRef* a = tensor(0);
  const TensorRef* b = tensor(1);
  const TensorRef* offs = tensor(2);
  if (!a || !b || a->dtype != b->dtype || !at::isFloatingType(a->dtype) || !none(3) || !none(4)) return nullptr;
  const auto& as = a->sizes;
  const auto& bs = b->sizes;
  const size_t da = as.size(), db = bs.size();
  if ((da != 2 && da != 3) || (db != 2 && db != 3)) return nullptr;
  const bool needs_offs = da == 2 || db == 2;
  if (needs_offs != (offs != nullptr) || (!offs && !none(2))) return nullptr;
  if (offs && (offs->dtype != at::kInt || offs->sizes.size() != 1)) return nullptr;
  std::vector<int64_t> out;
  if (da == 2 && db == 2) {
    if (as[1] != bs[0]) return nullptr;
    out = {offs->sizes[0], as[0], bs[1]};
  } else if (da == 2) {
    if (as[1] != bs[1] || offs->sizes[0] != bs[0]) return nullptr;
    out = {as[0], bs[2]};
  } else if (db == 2) {
    if (as[2] != bs[0] || offs->sizes[0] != as[0]) return nullptr;
    out = {as[1], bs[1]};
  } else {
    if (as[0] != bs[0] || as[2] != bs[1]) return nullptr;
    out = {as[0], as[1], bs[2]};
  }
  auto result = std::make_shared<ShapeResult>();
  ReturnSpec r;
  r.kind = ReturnSpec::Kind::Tensor;
  r.tensors.push_back(contiguous_spec(a->dtype, std::move(out)));
  result->returns.push_back(std::move(r));
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
  static const c10::OperatorName grouped_mm("aten::_grouped_mm", "");
  if (op.operator_name() == multilabel_margin) return multilabel_margin_shape(s);
  if (op.operator_name() == grouped_mm) return grouped_mm_shape(s);
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
  if (target_device_type() != c10::DeviceType::CPU || shapes->eager) return shapes;
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


}  // namespace

std::shared_ptr<const ShapeResult> output_shapes(const c10::OperatorHandle& op, const Scan& s) {
  auto shapes = cpp_shape(op, s);
  if (!shapes) shapes = infer_meta(op, s);
  return cpu_saved_stats(op, s, std::move(shapes));
}

}  // namespace genie
