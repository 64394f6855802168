#pragma once
// Registration-cache bindings and the storage free hook (csrc/bindings/registration.cpp).
#include <memory>

#include <c10/core/StorageImpl.h>
#include <pybind11/pybind11.h>

#include "dataplane/registration.h"

using InvalidateFn = void (*)(const void*, size_t);

// True when freeing `impl` now invalidates its range in `cache` (or, with `in_process`, in the
// in-process agents' caches) before the memory goes back (Note: [Registration cache]).
bool install_free_hook(c10::StorageImpl* impl,
                       const std::shared_ptr<genie::dataplane::RegistrationCache>& cache,
                       InvalidateFn in_process = nullptr);

void register_registration(pybind11::module_& m);
