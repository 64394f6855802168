#pragma once
// Rebuilding a recorded node's argument stack for a real call (meta inference, the RNG dummy
// run, replay on an executor): the one place that turns Arg entries back into IValues.
#include <ATen/core/stack.h>

#include <optional>

#include "capture/recorder.h"

namespace genie {

// `make(i)` supplies the tensor for input i (i >= 0). Remote devices in plain arguments
// become `device`; generators become None when `drop_generator` (callers put their own in).
template <typename F>
torch::jit::Stack build_stack(const Node& node, F&& make, c10::Device device, bool drop_generator) {
  torch::jit::Stack stack;
  stack.reserve(node.args.size());
  for (const auto& a : node.args) {
    switch (a.kind) {
      case Arg::Kind::Value: {
        const auto& v = a.value;
        if (v.isDevice() && v.toDevice().type() == c10::DeviceType::PrivateUse1) stack.emplace_back(device);
        else if (drop_generator && v.isGenerator()) stack.emplace_back();
        else stack.push_back(v);
        break;
      }
      case Arg::Kind::Tensor:
        stack.emplace_back(a.refs[0] < 0 ? at::Tensor() : make(a.refs[0]));
        break;
      case Arg::Kind::TensorList: {
        c10::List<at::Tensor> l;
        for (auto r : a.refs) l.push_back(r < 0 ? at::Tensor() : make(r));
        stack.emplace_back(std::move(l));
        break;
      }
      case Arg::Kind::OptionalTensorList: {
        c10::List<std::optional<at::Tensor>> l;
        for (auto r : a.refs) l.push_back(r < 0 ? std::optional<at::Tensor>() : make(r));
        stack.emplace_back(std::move(l));
        break;
      }
    }
  }
  return stack;
}

}  // namespace genie
