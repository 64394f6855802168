#pragma once
// Shape inference for recorded ops: C++ shape functions for hot ops, meta execution for the
// rest (Note: [C++ shape functions], Note: [Shape cache]), and the outputs whose geometry
// follows the target device (Note: [CPU kernels' saved statistics]).
#include <memory>

#include "capture/scan.h"
#include "capture/shape_cache.h"

namespace genie {

// The outputs (and mutated arguments) of the op call `s` scans, not cached here.
std::shared_ptr<const ShapeResult> output_shapes(const c10::OperatorHandle& op, const Scan& s);

}  // namespace genie
