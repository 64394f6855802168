#pragma once
// Executors run flushed nodes on a real device and keep results resident.
#include <ATen/Tensor.h>
#include <c10/core/Device.h>

#include <array>
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
  // How many freshly recorded nodes the recorder should fingerprint before calling
  // speculate() (0: never). See Note: [Program digests].
  virtual size_t speculation_window() const { return 0; }
  // The fingerprint of the first speculation_window() nodes recorded since the last flush
  // that ran. Called without the recorder's lock.
  virtual void speculate(const std::array<uint64_t, 2>& /*prefix*/) {}
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
  std::vector<c10::IValue> call_on(const Node& node, bool host);
  void bind_locked(const TensorRef& ref, const at::Tensor& value);
  at::Tensor materialize_locked(const TensorRef& ref);
  c10::Device device_;
  mutable std::mutex mutex_;
  std::unordered_map<StorageId, c10::Storage> env_;
};

std::string describe_inputs(const Node& node);

}  // namespace genie
