// The capture kernel: records one op call as a Node with the outputs' geometry, without
// running it (Note: [Shape cache]); data-dependent ops run now (capture_eager).
#include "capture/kernels.h"

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>

#include <atomic>

#include "capture/device.h"
#include "capture/errors.h"
#include "capture/executor.h"
#include "capture/recorder.h"
#include "capture/rng.h"
#include "capture/scan.h"
#include "capture/shape_cache.h"
#include "capture/shapes.h"
#include "capture/storage.h"

namespace genie {
namespace {

std::atomic<c10::DeviceType> g_target_type{c10::DeviceType::CPU};

// Data-dependent ops (nonzero, unique, masked_select, boolean indexing, equal) and ops with no
// meta kernel: flush what their inputs need, run them now, keep the results on the executor.
//
// Note: [Inputs of an op run at once]
// A host tensor among the inputs (a CPU boolean mask indexing a remote tensor, a CPU operand
// of torch.equal) is a recorder constant that no pending node reads: the flush uploads it as
// a target, and would release it again at its end as an upload nothing pending needs. The
// flush keeps its targets instead; the constants go at the next flush.
void capture_eager(const c10::OperatorHandle& op, Scan& s, torch::jit::Stack* stack, size_t nargs) {
  auto& rec = recorder();
  std::vector<StorageId> ids;
  for (const auto& r : s.node->inputs) ids.push_back(r.storage);
  rec.flush(ids, std::nullopt, /*keep_targets=*/true);
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

c10::DeviceType target_device_type() { return g_target_type.load(); }

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
    shapes = output_shapes(op, s);
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
  // CPU inputs start uploading now rather than at the flush. Not a snapshot: the flush still
  // refuses a CPU input written in place since it was recorded (Recorder::flush_locked), so the
  // bytes that went early are the bytes it reads.
  if (!s.uploads.empty()) {
    if (auto executor = recorder().executor()) {
      for (const auto& [id, t] : s.uploads) executor->upload_early(id, t);
    }
  }
  torch::jit::drop(*stack, nargs);
  for (auto& v : outs) stack->push_back(std::move(v));
}

}  // namespace genie
