#pragma once
// The thread-safe graph recorder: the pending program of recorded aten ops.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/ivalue.h>
#include <ATen/Tensor.h>
#include <c10/util/SmallVector.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "capture/speculation_hook.h"
#include "capture/storage.h"

namespace genie {

// Inline up to 6 dims: refs are made for every tensor of every recorded op.
using Dims = c10::SmallVector<int64_t, 6>;

// A tensor as one op saw it: a view (dtype, sizes, strides, offset) of a storage.
struct TensorRef {
  StorageId storage = 0;
  c10::ScalarType dtype = c10::ScalarType::Float;
  Dims sizes;
  Dims strides;
  int64_t offset = 0;
  int64_t storage_nbytes = 0;  // size of the whole storage when it was seen
  c10::DeviceIndex device = 0;
  bool requires_grad = false;
};

TensorRef make_ref(const at::Tensor& t, StorageId id);

// One argument of a recorded op. Tensors are replaced by indices into Node::inputs.
struct Arg {
  enum class Kind : uint8_t { Value, Tensor, TensorList, OptionalTensorList };
  Kind kind = Kind::Value;
  c10::IValue value;          // Kind::Value
  std::vector<int32_t> refs;  // indices into Node::inputs; -1 = None / undefined
};

constexpr int32_t kUndefinedOutput = -2;

struct Node {
  int64_t id = 0;
  std::optional<c10::OperatorHandle> op;  // always set; optional only because it has no default
  std::vector<Arg> args;
  std::vector<TensorRef> inputs;
  std::vector<TensorRef> outputs;           // the op's tensor returns, flattened in order
  std::vector<int32_t> output_alias;        // per output: index into inputs it aliases, -1 fresh,
                                            // kUndefinedOutput for an undefined tensor
  std::vector<StorageId> writes;            // storages the op mutates (in-place, out=)
  std::vector<StorageId> fresh;             // storages the op creates
  std::optional<at::Tensor> rng_state;      // CPU mt19937 state the op draws from
  int64_t context = 0;                      // module context id (semantic tier 3)
  bool eager = false;                       // ran at capture (data-dependent output)
  bool empty_factory = false;               // creates uninitialised storage (empty*)

  std::string name() const;
};

// A CPU tensor that became a graph input (an upload): the logical-device rule.
struct Constant {
  at::Tensor tensor;
  int64_t version = 0;  // the source tensor's version counter when captured
  c10::DeviceIndex device = 0;
};

class Executor;

// Everything needed to run one flush.
struct FlushRequest {
  std::vector<std::shared_ptr<Node>> nodes;                 // program order
  std::unordered_map<StorageId, Constant> constants;       // uploads this flush needs
  std::vector<StorageId> targets;                           // storages the host asked for
  // What the recorder releases as soon as this flush returns: storages no live tensor holds
  // and no pending node mentions (Note: [Dead after the flush] in recorder.cpp).
  std::vector<StorageId> dead;
  // The value the host fetches as soon as this flush returns (a materialization), so an
  // executor may ask for it together with the run (Note: [Run then fetch] in python/genie/runtime/remote/client.py).
  std::optional<TensorRef> then_fetch;
};

struct RecorderStats {
  int64_t nodes_recorded = 0;
  int64_t nodes_executed = 0;
  int64_t nodes_dropped = 0;  // dead code never executed
  int64_t flushes = 0;
  int64_t constants_uploaded = 0;
  int64_t eager_ops = 0;
};

// Process-wide; see recorder() for its lifetime.
class Recorder {
 public:
  void record(std::shared_ptr<Node> node);
  // A CPU tensor used by remote computation: returns the storage id that stands for it.
  StorageId add_constant(const at::Tensor& cpu, c10::DeviceIndex device, bool snapshot);
  // The pending producer of a storage created by an empty-like factory, if nothing wrote it yet.
  bool replace_empty_with_constant(StorageId storage, const at::Tensor& cpu);

  // Run what is needed to make these storages real on the executor. With `keep_targets`,
  // the targets stay there after the flush even where nothing pending reads them (the
  // inputs of an op run at once, Note: [Inputs of an op run at once] in kernels.cpp).
  void flush(const std::vector<StorageId>& targets,
             std::optional<TensorRef> then_fetch = std::nullopt, bool keep_targets = false);
  void flush_all();
  // Drop pending work whose results nobody can observe; free released storages.
  void collect();

  std::vector<std::shared_ptr<Node>> pending() const;
  std::unordered_map<StorageId, Constant> pending_constants() const;
  std::vector<std::shared_ptr<Node>> last_flushed() const;
  RecorderStats stats() const;
  size_t pending_count() const;

  // Installing an executor removes the speculation hook (Note: [Speculation hook]).
  void set_executor(std::shared_ptr<Executor> executor);
  std::shared_ptr<Executor> executor() const;
  void set_speculation_hook(std::shared_ptr<SpeculationHook> hook);

  std::mutex& mutex() { return mutex_; }
  // Throws the original error if the flush that should have produced this storage failed.
  void check_not_poisoned(StorageId id) const;

 private:
  // Returns an error message instead of raising, so callers raise after unlocking.
  std::string flush_locked(const std::vector<StorageId>& targets, bool all,
                           std::optional<TensorRef> then_fetch = std::nullopt,
                           bool keep_targets = false);
  void apply_releases_locked();
  // Results nobody can observe become undefined (Note: [Dead outputs]).
  void drop_dead_outputs(FlushRequest& req, const std::vector<std::shared_ptr<Node>>& remaining);

  mutable std::mutex mutex_;
  std::vector<std::shared_ptr<Node>> pending_;
  std::vector<std::shared_ptr<Node>> last_flushed_;
  std::unordered_map<StorageId, Constant> constants_;
  std::unordered_map<StorageId, std::shared_ptr<Node>> empty_producer_;
  std::unordered_set<StorageId> released_;
  std::unordered_set<StorageId> pure_constants_;  // constant ids no remote tensor refers to
  std::unordered_map<StorageId, std::string> poisoned_;  // storages whose producing flush failed
  std::shared_ptr<Executor> executor_;
  std::shared_ptr<SpeculationHook> hook_;  // Note: [Speculation hook]
  RecorderStats stats_;
  int64_t next_node_id_ = 1;
  // The first nodes recorded since the last flush that ran, for the speculation hook.
  std::vector<std::shared_ptr<Node>> window_;
};

Recorder& recorder();

// The module context stamped on each node (set by Python forward hooks).
void set_context(int64_t id);
int64_t current_context();

}  // namespace genie
