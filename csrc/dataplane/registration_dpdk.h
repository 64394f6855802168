#pragma once
// Registration backends that need DPDK's EAL (Note: [Registration cache]).
#include <memory>
#include <vector>

#include "dataplane/registration.h"

struct rte_device;

namespace genie::dataplane {

// Host memory as DPDK external memory (rte_extmem_register over whole pages), DMA-mapped for
// each of `devices` (rte_dev_dma_map; devices that do no DMA, such as memif, are skipped).
std::unique_ptr<RegistrationBackend> make_dpdk_extmem_backend(std::vector<rte_device*> devices,
                                                              Status* why);
// GPU memory for NIC DMA through gpudev (GPUDirect): unavailable unless a gpudev driver
// reports a GPU (Debian's DPDK ships librte_gpudev without the CUDA driver).
std::unique_ptr<RegistrationBackend> make_gpudev_backend(std::vector<rte_device*> devices,
                                                         Status* why);

}  // namespace genie::dataplane
