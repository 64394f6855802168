#include "capture/rng.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <mutex>

#include "capture/device.h"
#include "capture/stack.h"

namespace genie {

// Note: [Backend RNG]
// Random ops record the generator state they start from and advance the generator exactly
// as eager CPU would, by running the op once on dummy CPU inputs of the same geometry. Replay
// runs the op on the CPU with the recorded state, so torch.manual_seed(s) gives the values
// eager CPU gives for the same program.
void capture_rng(const c10::OperatorHandle& op, Node& node, const OpInfo& info, c10::ArrayRef<c10::IValue> args,
                 c10::DeviceIndex device) {
  at::Generator gen;
  for (const auto& v : args) {
    if (v.isGenerator()) gen = v.toGenerator();
  }
  if (!gen.defined() || gen.device().type() != kRemote) {
    TORCH_CHECK(!gen.defined(), "genie: ", node.name(), " got a generator on ", gen.device(),
                "; pass a remote_accelerator generator or none");
    gen = default_generator(device);
  }
  at::Tensor state;
  {
    std::lock_guard<std::mutex> lock(gen.mutex());
    state = gen.get_state();
  }
  auto cpu_gen = at::make_generator<at::CPUGeneratorImpl>();
  cpu_gen.set_state(state);
  auto make = [&](int32_t i) {
    const TensorRef& r = node.inputs[i];
    return at::ones(c10::IntArrayRef(r.sizes), at::TensorOptions().dtype(r.dtype));
  };
  auto stack = build_stack(node, make, c10::Device(c10::DeviceType::CPU), /*drop_generator=*/false);
  for (auto& v : stack) {
    if (v.isGenerator()) v = c10::IValue(cpu_gen);
  }
  const auto& schema_args = op.schema().arguments();
  for (size_t i = 0; i < schema_args.size(); ++i) {
    if (stack[i].isNone() && schema_args[i].type()->kind() == c10::TypeKind::OptionalType &&
        schema_args[i].type()->castRaw<c10::OptionalType>()->getElementType()->kind() ==
            c10::TypeKind::GeneratorType)
      stack[i] = c10::IValue(cpu_gen);
  }
  if (info.implicit_rng) {
    // The op reads the CPU default generator: lend it our state for the dummy run.
    auto cpu_default = at::detail::getDefaultCPUGenerator();
    at::Tensor saved;
    {
      std::lock_guard<std::mutex> lock(cpu_default.mutex());
      saved = cpu_default.get_state();
      cpu_default.set_state(state);
    }
    try {
      op.callBoxed(stack);
    } catch (...) {
      std::lock_guard<std::mutex> lock(cpu_default.mutex());
      cpu_default.set_state(saved);
      throw;
    }
    std::lock_guard<std::mutex> lock(cpu_default.mutex());
    cpu_gen.set_state(cpu_default.get_state());
    cpu_default.set_state(saved);
  } else {
    op.callBoxed(stack);
  }
  {
    std::lock_guard<std::mutex> lock(gen.mutex());
    gen.set_state(cpu_gen.get_state());
  }
  node.rng_state = state;
}

}  // namespace genie
