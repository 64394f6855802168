#pragma once
// Copies between the host and remote_accelerator, and the few ops that are metadata or host
// syncs rather than recorded work (set_, item, _has_compatible_shallow_copy_type).
#include <ATen/Tensor.h>
#include <c10/core/Scalar.h>
#include <c10/core/SymInt.h>

namespace genie {

at::Tensor copy_from(const at::Tensor& self, const at::Tensor& dst, bool non_blocking);
at::Tensor copy_from_and_resize(const at::Tensor& self, const at::Tensor& dst);
c10::Scalar local_scalar_dense(const at::Tensor& self);
at::Tensor& set_storage_offset(at::Tensor& self, c10::Storage source, c10::SymInt offset, c10::SymIntArrayRef size,
                               c10::SymIntArrayRef stride);
at::Tensor& set_tensor(at::Tensor& self, const at::Tensor& source);
at::Tensor& set_storage(at::Tensor& self, c10::Storage source);
bool has_compatible_shallow_copy_type(const at::Tensor& self, const at::Tensor& from);

}  // namespace genie
