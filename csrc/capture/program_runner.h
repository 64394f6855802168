#pragma once
// Note: [Running programs in C++]
// A genie server checks each program once in Python (python/genie/runtime/program/) and then
// runs it many times. Running it step by step in Python costs 10-40 us of interpreter per op,
// which on a GPU is longer than most decode-step kernels take, and a program with new shapes
// (a KV cache that grows every step) cannot be a CUDA graph. A ProgramRunner holds the checked
// steps as recorded-style Nodes (storage ids are the program's local indices) and runs them
// with the local executor's own call path (call_node: the same kernels, host fallback and
// errors), with the GIL released. Programs with random steps stay in Python: their generator
// states come with each run.
#include <c10/core/Storage.h>

#include <memory>
#include <vector>

#include "capture/recorder.h"

namespace genie {

class ProgramRunner {
 public:
  // `inputs`: locals read before the program writes them, in the order run() gets them;
  // `produced`: locals run() returns, in that order.
  // `zero_steps`: steps whose results start uninitialized and are zeroed
  // (Note: [No uninitialized bytes] in python/genie/runtime/program/run.py).
  ProgramRunner(c10::Device device, std::vector<std::shared_ptr<const Node>> nodes, int64_t nlocals,
                std::vector<int64_t> inputs, std::vector<int64_t> produced,
                const std::vector<int64_t>& zero_steps = {});

  // The storages of `produced` after running on `inputs` (a null storage where the run made
  // none). Raises genie's execution error when a step fails.
  std::vector<c10::Storage> run(const std::vector<c10::Storage>& inputs) const;

  size_t size() const { return nodes_.size(); }

 private:
  c10::Storage bind(const TensorRef& ref, const at::Tensor& t) const;

  c10::Device device_;
  std::vector<std::shared_ptr<const Node>> nodes_;
  int64_t nlocals_;
  std::vector<int64_t> inputs_;
  std::vector<int64_t> produced_;
  std::vector<bool> zero_;     // per step: zero what it returns
  std::vector<bool> mutable_;  // per step: may write (and grow) its inputs' storages
};

// Bytes of storage a view needs (0 when it is empty), or -1 when its numbers are negative or
// overflow: the runner never trusts a size from the wire.
int64_t view_extent(const TensorRef& r);

}  // namespace genie
