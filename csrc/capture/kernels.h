#pragma once
// The capture kernels registered on PrivateUse1 (remote_accelerator).
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>

namespace genie {

// The boxed kernel that records one op: PrivateUse1's fallback, and the kernel registered
// directly for ops whose CompositeExplicitAutograd kernels would otherwise decompose.
void capture_kernel(const c10::OperatorHandle& op, c10::DispatchKeySet ks, torch::jit::Stack* stack);

// Registers the direct kernels for composite ops (idempotent). Returns how many.
int64_t register_direct_kernels();

// Target device type that shape-dependent choices (SDPA backend, Note: [CPU kernels' saved
// statistics]) should answer for.
void set_target_device_type(c10::DeviceType type);
c10::DeviceType target_device_type();

}  // namespace genie
