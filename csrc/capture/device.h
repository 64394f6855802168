#pragma once
// The remote_accelerator device: PrivateUse1 guard, hooks and generators.
#include <ATen/core/Generator.h>
#include <c10/core/Device.h>

namespace genie {

// How many remote_accelerator devices exist; set from Python (configuration) before use.
void set_device_count(c10::DeviceIndex n);
c10::DeviceIndex device_count();
c10::DeviceIndex current_device_index();
void set_current_device_index(c10::DeviceIndex index);
// Raises a clear error for an index outside [0, device_count()).
void check_device_index(c10::DeviceIndex index);

// The default generator of remote_accelerator:index. Its state is a CPU mt19937 state, so
// replaying a random op on the CPU with that state gives the values eager CPU gives.
const at::Generator& default_generator(c10::DeviceIndex index);

void register_device();

}  // namespace genie
