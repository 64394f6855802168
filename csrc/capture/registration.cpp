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
TORCH_LIBRARY_IMPL(aten, PrivateUse1, m) { m.impl("scaled_dot_product_attention", &sdpa_with_host_inputs); }

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
