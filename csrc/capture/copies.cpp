#include "capture/copies.h"

#include <ATen/ATen.h>

#include <cstring>

#include "capture/errors.h"
#include "capture/executor.h"
#include "capture/kernels.h"
#include "capture/recorder.h"
#include "capture/scan.h"
#include "capture/storage.h"

namespace genie {
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

// Note: [Snapshots on one thread]
// The snapshot .to() takes of a contiguous CPU tensor is one memcpy on the recording thread,
// not torch's copy kernel. That kernel splits a large copy over the intra-op pool, and the
// pool's OpenMP threads then spin for milliseconds waiting for more work (libgomp's spin
// count, at Sapphire Rapids' 140-cycle PAUSE), holding every core while the input's bytes
// still have to cross to a server on the same host. Measured on an H100 host with 16 threads
// a process: a fresh 4.8 MB input reached the loopback server 4 ms into a ResNet-50 forward,
// against 0.93x eager with 1 thread a process (bench_serving.py).
at::Tensor snapshot(const at::Tensor& src) {
  if (src.is_contiguous() && !src.is_conj() && !src.is_neg()) {
    at::Tensor snap = at::empty_like(src, at::MemoryFormat::Contiguous);
    if (src.nbytes() > 0) std::memcpy(snap.data_ptr(), src.const_data_ptr(), src.nbytes());
    return snap;
  }
  // One contiguous private copy, recorded with its own geometry (a view's strides and offset
  // describe its source's storage, not the copy's).
  at::Tensor snap = src.contiguous();
  return snap.data_ptr() == src.data_ptr() ? snap.clone() : snap;
}

bool covers_storage(const at::Tensor& t) {
  return t.is_contiguous() && t.storage_offset() == 0 &&
         static_cast<size_t>(t.numel()) * t.element_size() == t.storage().nbytes();
}

}  // namespace

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
    at::Tensor snap = snapshot(src);  // Note: [Snapshots on one thread]
    // `snap` is the value the flush uploads; the executor may start sending it now.
    auto executor = recorder().executor();
    if (covers_storage(dst) && snap.scalar_type() == dst.scalar_type() && snap.sizes() == dst.sizes() &&
        recorder().replace_empty_with_constant(storage_id(dst.storage()), snap)) {
      if (executor) executor->upload_early(storage_id(dst.storage()), snap);
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
    if (executor) executor->upload_early(cid, snap);
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


}  // namespace genie
