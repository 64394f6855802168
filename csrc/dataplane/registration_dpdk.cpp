#include "dataplane/registration_dpdk.h"

#include <unistd.h>

#include <cerrno>
#include <string>

#include <rte_bus.h>
#include <rte_dev.h>
#include <rte_eal.h>
#include <rte_errno.h>
#include <rte_gpudev.h>
#include <rte_memory.h>

#include "dataplane/eal.h"

namespace genie::dataplane {

namespace {

constexpr size_t kGpuPage = 64 * 1024;  // GPU memory is mapped for DMA in 64 KiB pages

bool dma_capable(rte_device* dev) {
  const rte_bus* bus = dev ? rte_dev_bus(dev) : nullptr;
  return bus && std::string(rte_bus_name(bus)) != "vdev";
}

// External memory over whole pages of `page` bytes, DMA-mapped for the devices that do DMA.
class ExtmemBackend : public RegistrationBackend {
 public:
  ExtmemBackend(std::string name, std::vector<rte_device*> devices, size_t page)
      : name_(std::move(name)), page_(page) {
    for (auto* d : devices) {
      if (dma_capable(d)) devices_.push_back(d);
    }
  }

  std::string name() const override { return name_; }

  Status available() const override {
    if (!Eal::initialized()) {
      return {Code::Unavailable,
              "genie: the " + name_ + " backend needs DPDK's EAL initialised in this process"};
    }
    return Status::ok();
  }

  Status register_region(Region* r) override {
    uintptr_t base = r->addr & ~(uintptr_t(page_) - 1);
    uintptr_t end = (r->addr + r->len + page_ - 1) & ~(uintptr_t(page_) - 1);
    size_t len = end - base;
    void* va = reinterpret_cast<void*>(base);
    if (rte_extmem_register(va, len, nullptr, 0, page_) != 0) {
      return {Code::RegistrationFailed,
              "genie: rte_extmem_register(" + std::to_string(len) +
                  " bytes) failed: " + rte_strerror(rte_errno) +
                  (rte_errno == EEXIST
                       ? " (it overlaps memory registered before; invalidate that first)"
                       : "")};
    }
    // IOVA as VA is what vfio uses for external memory; in PA mode a NIC cannot reach it.
    bool va_mode = rte_eal_iova_mode() == RTE_IOVA_VA;
    for (size_t i = 0; i < devices_.size(); ++i) {
      if (rte_dev_dma_map(devices_[i], va, base, len) != 0 && rte_errno != ENOTSUP) {
        std::string why = rte_strerror(rte_errno);
        for (size_t j = 0; j < i; ++j) rte_dev_dma_unmap(devices_[j], va, base, len);
        rte_extmem_unregister(va, len);
        return {Code::RegistrationFailed, "genie: rte_dev_dma_map failed: " + why};
      }
    }
    r->handle = base;
    r->iova = (va_mode || devices_.empty()) ? r->addr : ~0ull;
    return Status::ok();
  }

  void unregister_region(const Region& r) override {
    uintptr_t base = r.handle;
    uintptr_t end = (r.addr + r.len + page_ - 1) & ~(uintptr_t(page_) - 1);
    void* va = reinterpret_cast<void*>(base);
    for (auto* d : devices_) rte_dev_dma_unmap(d, va, base, end - base);
    rte_extmem_unregister(va, end - base);
  }

 private:
  std::string name_;
  std::vector<rte_device*> devices_;
  size_t page_;
};

}  // namespace

std::unique_ptr<RegistrationBackend> make_dpdk_extmem_backend(std::vector<rte_device*> devices,
                                                              Status* why) {
  auto b = std::make_unique<ExtmemBackend>("dpdk", std::move(devices),
                                           static_cast<size_t>(sysconf(_SC_PAGESIZE)));
  Status s = b->available();
  if (!s) {
    *why = s;
    return nullptr;
  }
  return b;
}

std::unique_ptr<RegistrationBackend> make_gpudev_backend(std::vector<rte_device*> devices,
                                                         Status* why) {
  if (!Eal::initialized()) {
    *why = {Code::Unavailable,
            "genie: the gpudev backend needs DPDK's EAL initialised in this process"};
    return nullptr;
  }
  if (rte_gpu_count_avail() == 0) {
    *why = {Code::Unavailable,
            "genie: no gpudev driver on this machine: DPDK's gpudev library reports no GPU "
            "(Debian's DPDK ships librte_gpudev without the CUDA driver; build DPDK with "
            "drivers/gpu/cuda for GPUDirect)"};
    return nullptr;
  }
  return std::make_unique<ExtmemBackend>("gpudev", std::move(devices), kGpuPage);
}

}  // namespace genie::dataplane
