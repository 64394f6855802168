#include "capture/program_runner.h"

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <string>

#include "capture/errors.h"
#include "capture/executor.h"

namespace genie {

int64_t view_extent(const TensorRef& r) {
  int64_t last = r.offset;
  if (last < 0 || r.sizes.size() != r.strides.size()) return -1;
  for (size_t d = 0; d < r.sizes.size(); ++d) {
    int64_t size = r.sizes[d], stride = r.strides[d], step = 0;
    if (size == 0) return 0;
    if (size < 0 || stride < 0) return -1;
    if (__builtin_mul_overflow(size - 1, stride, &step) || __builtin_add_overflow(last, step, &last)) return -1;
  }
  int64_t bytes = 0;
  if (__builtin_add_overflow(last, 1, &last) ||
      __builtin_mul_overflow(last, static_cast<int64_t>(c10::elementSize(r.dtype)), &bytes))
    return -1;
  return bytes;
}

ProgramRunner::ProgramRunner(c10::Device device, std::vector<std::shared_ptr<const Node>> nodes, int64_t nlocals,
                             std::vector<int64_t> inputs, std::vector<int64_t> produced,
                             const std::vector<int64_t>& zero_steps)
    : device_(device),
      nodes_(std::move(nodes)),
      nlocals_(nlocals),
      inputs_(std::move(inputs)),
      produced_(std::move(produced)),
      zero_(nodes_.size(), false),
      mutable_(nodes_.size(), false) {
  auto in_range = [&](int64_t local) { return local >= 0 && local < nlocals_; };
  for (auto l : inputs_)
    if (!in_range(l)) raise_error(ErrorKind::Protocol, "genie: a program input outside its locals");
  for (auto l : produced_)
    if (!in_range(l)) raise_error(ErrorKind::Protocol, "genie: a program output outside its locals");
  for (auto k : zero_steps)
    if (k >= 0 && k < static_cast<int64_t>(nodes_.size())) zero_[k] = true;
  for (size_t k = 0; k < nodes_.size(); ++k) {
    const auto& n = nodes_[k];
    // Note: [Complete argument lists] (program.py): a short stack is read past its end.
    if (n->args.size() != n->op->schema().arguments().size())
      raise_error(ErrorKind::Protocol, "genie: step " + std::to_string(k) + " (" + n->name() + ") has " +
                                           std::to_string(n->args.size()) + " arguments, its schema " +
                                           std::to_string(n->op->schema().arguments().size()));
    mutable_[k] = n->op->schema().is_mutable();
    for (const auto& r : n->inputs)
      if (!in_range(r.storage)) raise_error(ErrorKind::Protocol, "genie: a step reads outside the program's locals");
    for (size_t i = 0; i < n->outputs.size(); ++i)
      if (n->output_alias[i] != kUndefinedOutput && !in_range(n->outputs[i].storage))
        raise_error(ErrorKind::Protocol, "genie: a step writes outside the program's locals");
  }
}

// Note: [Binding a result on a server] (program/run.py) gives the rules, and the Python steps
// follow the same ones. `t` already passed result_mismatch (for_each_fresh_output): its dtype
// is the declared one and its sizes are, up to dimensions of size 1.
c10::Storage ProgramRunner::bind(const TensorRef& ref, const at::Tensor& t) const {
  const auto& st = t.storage();
  if (t.device() == device_ && t.strides() == c10::IntArrayRef(ref.strides) && t.storage_offset() == ref.offset &&
      static_cast<int64_t>(st.nbytes()) == ref.storage_nbytes)
    return st;
  auto bytes = at::zeros({std::max<int64_t>(ref.storage_nbytes, 1)}, at::TensorOptions().dtype(at::kByte).device(device_));
  view_of(bytes.storage(), device_, ref.dtype, ref.sizes, ref.strides, ref.offset).copy_(t.reshape(ref.sizes));
  return bytes.storage();
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
  // Defence in depth: validation proved every view fits its declared storage and that inputs
  // are large enough; the runner still checks each view against the storage it really has.
  auto materialize = [&](const TensorRef& r) -> at::Tensor {
    const auto& st = frame[r.storage];
    if (!st)
      raise_error(ErrorKind::Execution, "genie: a step reads storage " + std::to_string(r.storage) +
                                            " of its program, which nothing made (or whose kernel returned nothing)");
    auto need = view_extent(r);
    if (need < 0 || need > static_cast<int64_t>(st.nbytes()))
      raise_error(ErrorKind::Execution, "genie: a view of storage " + std::to_string(r.storage) + " needs " +
                                            std::to_string(need) + " bytes; it holds " + std::to_string(st.nbytes()));
    return view_of(st, device_, r.dtype, r.sizes, r.strides, r.offset);
  };
  std::vector<std::pair<int64_t, size_t>> sizes;  // written local -> bytes before the step
  for (size_t k = 0; k < nodes_.size(); ++k) {
    const auto& n = *nodes_[k];
    sizes.clear();
    if (mutable_[k])
      for (const auto& r : n.inputs)
        if (frame[r.storage]) sizes.emplace_back(r.storage, frame[r.storage].nbytes());
    auto results = call_node(n, device_, materialize);
    // Note: [No uninitialized bytes] (program.py)
    if (zero_[k]) {
      for (const auto& v : results) {
        if (v.isTensor() && v.toTensor().defined()) {
          const auto& st = v.toTensor().storage();
          view_of(st, v.toTensor().device(), at::kByte, {static_cast<int64_t>(st.nbytes())}, {1}, 0).zero_();
        }
      }
    }
    for (const auto& [local, before] : sizes) {
      const auto& st = frame[local];
      if (st.nbytes() > before)
        view_of(st, device_, at::kByte, {static_cast<int64_t>(st.nbytes() - before)}, {1},
                static_cast<int64_t>(before))
            .zero_();
    }
    for_each_fresh_output(n, results, [&](const TensorRef& ref, const at::Tensor& t) {
      frame[ref.storage] = bind(ref, t);
    });
  }
  std::vector<c10::Storage> out;
  out.reserve(produced_.size());
  for (auto l : produced_) out.push_back(frame[l]);
  return out;
}

}  // namespace genie
