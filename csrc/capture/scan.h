#pragma once
// Reading one op call for the recorder: which arguments are remote tensors, which storages they
// view, what the op writes, and a key for the shape cache (Note: [Shape cache]). Shared by
// the capture kernel, shape inference and the RNG capture.
#include <ATen/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/ivalue.h>

#include <memory>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "capture/recorder.h"
#include "capture/shape_cache.h"

namespace genie {

constexpr auto kRemote = c10::DeviceType::PrivateUse1;

bool is_remote(const at::Tensor& t);

// A remote tensor over `storage` with geometry `g`.
at::Tensor wrap(c10::Storage storage, const Geometry& g, c10::DispatchKey key = c10::DispatchKey::PrivateUse1);

// A new remote storage of `nbytes` on remote device `index`.
c10::Storage fresh_storage(int64_t nbytes, c10::DeviceIndex index);

Geometry geometry_of(const at::Tensor& t);

// What a schema says about mutation and returned arguments; computed once per operator.
struct OpInfo {
  std::vector<bool> arg_is_write;
  std::vector<int> return_self_arg;  // a return that *is* a mutated argument (in-place, out=)
  bool explicit_rng = false;         // has a Generator? argument
  bool implicit_rng = false;         // draws from the default generator without one
  bool empty_factory = false;
};

const OpInfo& op_info(const c10::OperatorHandle& op);

// The arguments of one op call, split into the node's inputs and a cache key.
struct Scan {
  std::shared_ptr<Node> node = std::make_shared<Node>();
  std::vector<at::Tensor> tensors;  // parallel to node->inputs: what the caller passed
  std::string key;
  bool cacheable = true;
  c10::DeviceIndex device = -1;
  std::unordered_map<StorageId, int32_t> slot_of;
  // CPU tensors that became graph inputs here (the logical-device rule), for the executor to
  // start uploading once the node is recorded (Note: [Early uploads] in remote/early.py).
  std::vector<std::pair<StorageId, at::Tensor>> uploads;
};

Scan scan_args(const c10::OperatorHandle& op, c10::ArrayRef<c10::IValue> args);

}  // namespace genie
