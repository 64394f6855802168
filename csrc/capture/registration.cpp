// What remote_accelerator runs for each aten op: the capture kernel as PrivateUse1's fallback
// and directly for composite ops (register_direct_kernels), PyTorch's own metadata kernels for
// views (Note: [Views are metadata]), the copies (copies.cpp), a refusal for sparse layouts,
// and the SDPA backend choice the target device would make.
#include <ATen/ATen.h>
#include <ATen/SDPBackend.h>
#include <ATen/native/DispatchStub.h>
#include <ATen/native/transformers/attention.h>
#include <ATen/ops/_reshape_alias_native.h>
#include <ATen/ops/as_strided_native.h>
#include <ATen/ops/scaled_dot_product_attention_native.h>
#include <ATen/ops/view_native.h>
#include <torch/library.h>

#include <mutex>

#include "capture/copies.h"
#include "capture/errors.h"
#include "capture/kernels.h"

namespace genie {
namespace {

int64_t sdp_choice(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const std::optional<at::Tensor>& mask, double dropout, bool causal,
                   std::optional<double> scale, bool gqa) {
  // Answer as the target device would for tensors of this geometry; the choice reads only
  // shapes, strides and dtypes, so empty tensors on that device stand in for the real ones.
  c10::DeviceType target = target_device_type();
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

// Note: [Host tensors in attention]
// Every op takes a host tensor among remote ones as a graph input (the logical-device rule in
// scan.cpp), but scaled_dot_product_attention is a composite whose first step refuses inputs
// of two device types, before any kernel of genie's sees them: a CPU query next to remote keys
// (a CPU model's learned queries in analyze(), DETR's decoder) failed there. So its host inputs
// are moved to the remote device first (recorded as uploads, differentiable as any .to() is),
// and then PyTorch's own composite runs: with no host input it is exactly what ran before.
at::Tensor sdpa_with_host_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const std::optional<at::Tensor>& mask, double dropout, bool causal,
                                 std::optional<double> scale, bool gqa) {
  auto remote = [](const at::Tensor& t) { return t.device().type() == c10::DeviceType::PrivateUse1; };
  std::optional<c10::Device> device;
  for (const at::Tensor* t : {&q, &k, &v, mask ? &*mask : nullptr}) {
    if (t != nullptr && t->defined() && remote(*t)) {
      device = t->device();
      break;
    }
  }
  auto here = [&](const at::Tensor& t) { return !device || !t.defined() || remote(t) ? t : t.to(*device); };
  std::optional<at::Tensor> m;
  if (mask) m = here(*mask);
  return at::native::scaled_dot_product_attention(here(q), here(k), here(v), m, dropout, causal, scale, gqa);
}


// Note: [Integer histograms on a CPU target]
// histc counts integers on CUDA only, and models pick it by device type: HF's grouped-mm MoE
// layers histogram their expert ids as int32 on any device that is not the CPU, so on
// remote_accelerator too. On a target other than CUDA such a histc is recorded as ops every
// executor runs, computing what CUDA's kernel does (SummaryOps.cu: a value v in [min, max]
// counts in bin (v - min) * bins / (max - min) in 64-bit integers, the last edge in the last
// bin; min == max takes the data's range, then widens an empty one by one each way); a
// floating histc, or any on a CUDA target, is recorded as it is.
at::Tensor integer_histc(const at::Tensor& self, int64_t bins, const at::Scalar& min, const at::Scalar& max) {
  TORCH_CHECK(bins > 0, "bins must be > 0");
  at::Tensor x = self.reshape({-1}).to(at::kLong);
  int64_t lo = min.toLong();
  int64_t hi = max.toLong();
  if (lo == hi && x.numel() > 0) {  // read off the data, as CUDA's kernel does
    lo = x.min().item<int64_t>();
    hi = x.max().item<int64_t>();
  }
  if (lo == hi) {
    lo -= 1;
    hi += 1;
  }
  TORCH_CHECK(lo < hi, "max must be larger than min");
  at::Tensor counted = x.ge(lo).logical_and(x.le(hi)).to(at::kLong);
  at::Tensor bin = (x - lo).mul(bins).div(hi - lo, "floor").clamp(0, bins - 1);
  return at::zeros({bins}, x.options()).scatter_add_(0, bin, counted).to(self.scalar_type());
}

void histc_on_target(const c10::OperatorHandle& op, c10::DispatchKeySet ks, torch::jit::Stack* stack) {
  auto args = torch::jit::last(*stack, 4);
  const at::Tensor& self = args[0].toTensor();
  if (!at::isIntegralType(self.scalar_type(), /*includeBool=*/false) ||
      target_device_type() == c10::DeviceType::CUDA) {
    capture_kernel(op, ks, stack);
    return;
  }
  at::Tensor out = integer_histc(self, args[1].toInt(), args[2].toScalar(), args[3].toScalar());
  torch::jit::drop(*stack, 4);
  torch::jit::push(*stack, std::move(out));
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

// Note: [Host tensors in attention]: with autograd's key (reached first, also under no_grad)
// and without it (inference_mode).
TORCH_LIBRARY_IMPL(aten, AutogradPrivateUse1, m) { m.impl("scaled_dot_product_attention", &sdpa_with_host_inputs); }
TORCH_LIBRARY_IMPL(aten, PrivateUse1, m) {
  m.impl("scaled_dot_product_attention", &sdpa_with_host_inputs);
  m.impl("histc", torch::CppFunction::makeFromBoxedFunction<&histc_on_target>());  // Note: [Integer histograms on a CPU target]
}

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
