#pragma once
// Note: [Backend RNG] (rng.cpp): random ops record the generator state they start from.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/ivalue.h>

#include "capture/recorder.h"
#include "capture/scan.h"

namespace genie {

// Record in `node` the state of the generator the op draws from, and advance that generator
// as eager CPU would.
void capture_rng(const c10::OperatorHandle& op, Node& node, const OpInfo& info, c10::ArrayRef<c10::IValue> args,
                 c10::DeviceIndex device);

}  // namespace genie
