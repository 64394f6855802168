#pragma once
// Storage on remote_accelerator holds no bytes: it is an identity.
//
// Note: [Storage identity]
// Every allocation on remote_accelerator gets a fresh StorageId that is never reused. The
// DataPtr's address encodes that id in a non-canonical x86-64 address, so a kernel that
// dereferences it by mistake faults instead of reading garbage, and views (which share the
// StorageImpl) resolve to the same id without any bookkeeping. Replay keys every tensor by
// (storage id, dtype, sizes, strides, offset), which is what makes views, in-place ops, out=
// and aliasing replay exactly as eager PyTorch ran them. When the last reference to a storage
// dies, the allocator's deleter queues a release event that the recorder drains at the next
// flush, which is how intermediates are freed on the executor.
#include <c10/core/Allocator.h>
#include <c10/core/Storage.h>

#include <cstdint>
#include <vector>

namespace genie {

using StorageId = int64_t;

c10::Allocator* remote_allocator();

bool is_remote_storage(const c10::Storage& storage);
StorageId storage_id(const c10::Storage& storage);
// A fresh id for a storage that is not a remote allocation (a CPU constant, say).
StorageId new_storage_id();

// Release events queued by the deleter since the last call.
std::vector<StorageId> take_released();
int64_t live_remote_storages();

}  // namespace genie
