#include "capture/program_runner.h"

#include <c10/core/InferenceMode.h>

#include <string>

#include "capture/errors.h"
#include "capture/executor.h"

namespace genie {

ProgramRunner::ProgramRunner(c10::Device device, std::vector<std::shared_ptr<const Node>> nodes,
                             int64_t nlocals, std::vector<int64_t> inputs, std::vector<int64_t> produced)
    : device_(device),
      nodes_(std::move(nodes)),
      nlocals_(nlocals),
      inputs_(std::move(inputs)),
      produced_(std::move(produced)) {
  auto in_range = [&](int64_t local) { return local >= 0 && local < nlocals_; };
  for (auto l : inputs_)
    if (!in_range(l)) raise_error(ErrorKind::Protocol, "genie: a program input outside its locals");
  for (auto l : produced_)
    if (!in_range(l)) raise_error(ErrorKind::Protocol, "genie: a program output outside its locals");
  for (const auto& n : nodes_) {
    for (const auto& r : n->inputs)
      if (!in_range(r.storage)) raise_error(ErrorKind::Protocol, "genie: a step reads outside the program's locals");
    for (size_t i = 0; i < n->outputs.size(); ++i)
      if (n->output_alias[i] != kUndefinedOutput && !in_range(n->outputs[i].storage))
        raise_error(ErrorKind::Protocol, "genie: a step writes outside the program's locals");
  }
}

std::vector<c10::Storage> ProgramRunner::run(const std::vector<c10::Storage>& inputs) const {
  if (inputs.size() != inputs_.size())
    raise_error(ErrorKind::Protocol, "genie: a program run got " + std::to_string(inputs.size()) +
                                         " input storages for " + std::to_string(inputs_.size()));
  // A server runs no autograd: its tensors are views made here and dropped, only their
  // storages are kept, so skipping the autograd layer changes no kernel and no result.
  c10::InferenceMode no_autograd;
  std::vector<c10::Storage> frame(static_cast<size_t>(nlocals_));
  for (size_t i = 0; i < inputs.size(); ++i) frame[inputs_[i]] = inputs[i];
  auto materialize = [&](const TensorRef& r) -> at::Tensor {
    const auto& st = frame[r.storage];
    if (!st)
      raise_error(ErrorKind::Execution, "genie: a step reads storage " + std::to_string(r.storage) +
                                            " of its program before anything made it");
    return view_of(st, device_, r.dtype, r.sizes, r.strides, r.offset);
  };
  for (const auto& n : nodes_) {
    for_each_fresh_output(*n, call_node(*n, device_, materialize), [&](const TensorRef& ref, const at::Tensor& t) {
      frame[ref.storage] = storage_for(ref, t, device_);
    });
  }
  std::vector<c10::Storage> out;
  out.reserve(produced_.size());
  for (auto l : produced_) out.push_back(frame[l]);
  return out;
}

}  // namespace genie
