#pragma once
// Executors run flushed nodes on a real device and keep results resident.
#include <ATen/Tensor.h>
#include <c10/core/Device.h>

#include <array>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "capture/recorder.h"

namespace genie {

class Executor {
 public:
  virtual ~Executor() = default;
  virtual std::string name() const = 0;
  // Run the nodes in order. Constants are uploaded first.
  virtual void run(const FlushRequest& request) = 0;
  // The real value of a view of a resident storage, as a tensor on the host (CPU).
  virtual at::Tensor fetch(const TensorRef& ref) = 0;
  // Storages nobody can reach any more.
  virtual void release(const std::vector<StorageId>& ids) = 0;
  virtual bool has(StorageId id) const = 0;
  // Run one node now, its inputs already resident; returns what the op returned (tensors as
  // host-side handles the executor can bind). Used for data-dependent ops at capture.
  virtual std::vector<c10::IValue> run_eager(const Node& node) = 0;
  // Make `value` (a result of run_eager) the content of the storage `ref` names.
  virtual void bind(const TensorRef& ref, const at::Tensor& value) = 0;
  virtual int64_t resident_count() const = 0;
  virtual int64_t resident_bytes() const = 0;
  // A CPU value just recorded as the upload of storage `id` (a private snapshot: nothing else
  // writes it). An executor that talks to a server may begin sending it now instead of at the
  // flush that needs it; the flush then names it (Note: [Early uploads] in
  // python/genie/runtime/remote/early.py). Must not throw: a failed upload fails that flush.
  virtual void upload_early(StorageId /*id*/, const at::Tensor& /*value*/) {}
};

// Runs nodes in this process on a CPU or CUDA device (the embedded default).
class LocalExecutor final : public Executor {
 public:
  explicit LocalExecutor(c10::Device device);
  std::string name() const override;
  void run(const FlushRequest& request) override;
  at::Tensor fetch(const TensorRef& ref) override;
  void release(const std::vector<StorageId>& ids) override;
  bool has(StorageId id) const override;
  std::vector<c10::IValue> run_eager(const Node& node) override;
  void bind(const TensorRef& ref, const at::Tensor& value) override;
  int64_t resident_count() const override;
  int64_t resident_bytes() const override;

  // Build a real tensor on this executor's device for a recorded view.
  at::Tensor materialize(const TensorRef& ref);
  c10::Device device() const { return device_; }

 private:
  std::vector<c10::IValue> call(const Node& node);
  void bind_locked(const TensorRef& ref, const at::Tensor& value);
  void check_aliases(const Node& node, const std::vector<c10::IValue>& results);
  at::Tensor materialize_locked(const TensorRef& ref);
  c10::Device device_;
  mutable std::mutex mutex_;
  std::unordered_map<StorageId, c10::Storage> env_;
  // Outputs whose results could not be bound (Note: [Checked results]).
  struct Broken {
    std::string why;
    at::Tensor value;  // what the kernel returned (undefined if nothing usable)
    TensorRef recorded;
  };
  std::unordered_map<StorageId, Broken> broken_;
  at::Tensor input_locked(const TensorRef& ref);
};

std::string describe_inputs(const Node& node);

// A real tensor viewing `storage` on `device` with the given geometry. Raises genie's
// execution error when the storage is too small for it (Note: [Checked results]).
at::Tensor view_of(const c10::Storage& storage, c10::Device device, c10::ScalarType dtype,
                   c10::IntArrayRef sizes, c10::IntArrayRef strides, int64_t offset);

// The real tensor for one of a node's input references.
using Materialize = std::function<at::Tensor(const TensorRef&)>;

// Run one recorded node on `device` (Note: [Replaying on the host], Note: [Host fallback]);
// failures raise genie's execution error naming the op and its inputs.
std::vector<c10::IValue> call_node(const Node& node, c10::Device device, const Materialize& materialize);

// The storage that makes `value` the content of `ref`'s storage with the recorded geometry.
c10::Storage storage_for(const TensorRef& ref, const at::Tensor& value, c10::Device device);

// Note: [Checked results]
// Capture hands the user tensors whose geometry comes from meta inference; the executor's
// kernel then makes the real results. When the two disagree (CPU batch norm in eval mode
// returns empty saved statistics that its meta kernel sizes by channel; a kernel returns no
// tensor, or another count, dtype or shape), binding the real result under the recorded
// geometry would let a later view read past the end of its storage: a segfault in `.cpu()`.
// So every result is checked where it is bound. A disagreeing result is never bound under the
// recorded geometry; the executor is told why (`broken`). Fetching that output raises genie's
// ExecutionError naming the op and both geometries, while the node's other results stay
// usable. A later op that reads the whole output, as recorded (eval-mode batch norm's backward
// reading its saved statistics, embedding_bag's backward reading offset2bag), gets the kernel's
// own tensor, as it would in eager mode on that device. A result that differs from the recorded
// geometry only by dims of size 1 (the same elements in the same order) is bound reshaped.

// Why `value`, the node's k-th tensor result, cannot stand for `node.outputs[k]`; "" if it can.
std::string result_mismatch(const Node& node, size_t k, const at::Tensor& value, const c10::Device& device);
// The message for a kernel that returned `got` tensors where capture recorded another count.
std::string result_count_mismatch(const Node& node, size_t got, const c10::Device& device);

// Calls f(output ref, tensor) for each defined output of `node` that the op created (not a
// view of an input), given what the op returned, and broken(output ref, why) for each such
// output the result cannot stand for, with that result (Note: [Checked results]).
template <typename F, typename B>
void for_each_fresh_output(const Node& node, const std::vector<c10::IValue>& results, const c10::Device& device,
                           F&& f, B&& broken) {
  c10::SmallVector<at::Tensor, 4> flat;
  for (const auto& v : results) {
    if (v.isTensor()) flat.push_back(v.toTensor());
    else if (v.isTensorList())
      for (const auto& t : v.toTensorList()) flat.push_back(t);
  }
  const bool count_ok = flat.size() == node.outputs.size();
  for (size_t k = 0; k < node.outputs.size(); ++k) {
    if (node.output_alias[k] != -1) continue;
    std::string why = count_ok ? result_mismatch(node, k, flat[k], device)
                               : result_count_mismatch(node, flat.size(), device);
    if (why.empty()) f(node.outputs[k], flat[k]);
    else broken(node.outputs[k], why, count_ok ? flat[k] : at::Tensor());
  }
}

// Without a `broken` callback a disagreeing result is left unbound: reading it fails as a
// read of a storage nothing produced.
template <typename F>
void for_each_fresh_output(const Node& node, const std::vector<c10::IValue>& results, F&& f) {
  for_each_fresh_output(node, results, c10::Device(c10::DeviceType::CPU), std::forward<F>(f),
                        [](const TensorRef&, const std::string&, const at::Tensor&) {});
}

}  // namespace genie
