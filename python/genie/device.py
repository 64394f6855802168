"""The ``remote_accelerator`` device: registration with PyTorch, configuration, sync points.

Importing genie renames PyTorch's PrivateUse1 backend to ``remote_accelerator``, registers the
device module ``torch.remote_accelerator`` and generates the usual tensor/module methods
(``Tensor.remote_accelerator()``, ``Tensor.is_remote_accelerator``...).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import types
from collections.abc import Iterator

import torch

from genie import _C, errors

logger = logging.getLogger(__name__)

BACKEND = "remote_accelerator"

__all__ = [
    "BACKEND",
    "capture",
    "configure",
    "device_count",
    "synchronize",
    "local_device",
    "stats",
]

_lock = threading.Lock()
_installed = False
_local_device: str | None = None
_target_type = "cpu"  # the kind of device flushes run on: shapes and kernel choices follow it


def _default_local_device() -> str:
    env = os.environ.get("GENIE_LOCAL_DEVICE")
    if env:
        return env
    return "cuda" if torch.cuda.is_available() else "cpu"


def _make_device_module() -> types.ModuleType:
    mod = types.ModuleType(f"torch.{BACKEND}")

    def device_count() -> int:
        return _C._device_count()

    def manual_seed_all(seed: int) -> None:
        for i in range(_C._device_count()):
            _C._default_generator(i).manual_seed(int(seed))

    def manual_seed(seed: int) -> None:
        _C._default_generator(_C._current_device()).manual_seed(int(seed))

    def seed_all() -> None:
        for i in range(_C._device_count()):
            _C._default_generator(i).seed()

    def get_rng_state(device: int | str | torch.device = BACKEND) -> torch.Tensor:
        return _C._default_generator(_index(device)).get_state()

    def set_rng_state(state: torch.Tensor, device: int | str | torch.device = BACKEND) -> None:
        _C._default_generator(_index(device)).set_state(state)

    def get_rng_state_all() -> list[torch.Tensor]:
        return [_C._default_generator(i).get_state() for i in range(_C._device_count())]

    def set_rng_state_all(states: list[torch.Tensor]) -> None:
        for i, s in enumerate(states):
            _C._default_generator(i).set_state(s)

    mod.is_available = lambda: True
    mod.is_initialized = lambda: True
    mod._is_in_bad_fork = lambda: False
    mod.device_count = device_count
    mod.current_device = _C._current_device
    mod.set_device = lambda d: _C._set_device(_index(d))
    mod.synchronize = lambda device=None: synchronize()
    mod.manual_seed = manual_seed
    mod.manual_seed_all = manual_seed_all
    mod.seed = lambda: _C._default_generator(_C._current_device()).seed()
    mod.seed_all = seed_all
    mod.initial_seed = lambda: _C._default_generator(_C._current_device()).initial_seed()
    mod.get_rng_state = get_rng_state
    mod.set_rng_state = set_rng_state
    mod.get_rng_state_all = get_rng_state_all
    mod.set_rng_state_all = set_rng_state_all
    mod.default_generators = tuple(_C._default_generator(i) for i in range(_C._device_count()))
    return mod


def _index(device: int | str | torch.device | None) -> int:
    if device is None:
        return _C._current_device()
    if isinstance(device, int):
        return device
    d = torch.device(device)
    return _C._current_device() if d.index is None else d.index


def _patch_tensor_methods() -> None:
    """Sync points PyTorch does not route through a kernel: ``numpy()`` and ``repr``.

    Note: [One download per print]
    PyTorch's default repr of a non-CPU tensor issues one ``item()`` per printed element
    (64 for a 6x5 tensor). Printing downloads the tensor once instead and formats the copy.
    """
    import torch._tensor_str as tensor_str

    orig_numpy = torch.Tensor.numpy
    orig_str = tensor_str._str

    def numpy(self: torch.Tensor, *, force: bool = False):
        if self.device.type == BACKEND:
            return orig_numpy(self.cpu(), force=force)
        return orig_numpy(self, force=force)

    def _str(self: torch.Tensor, *, tensor_contents=None) -> str:
        if self.device.type != BACKEND:
            return orig_str(self, tensor_contents=tensor_contents)
        with torch.no_grad():
            host = self.detach().cpu()
        text = orig_str(host, tensor_contents=tensor_contents)
        extra = f", device='{self.device}'"
        if self.grad_fn is not None:
            extra += f", grad_fn=<{type(self.grad_fn).__name__}>"
        elif self.requires_grad:
            extra += ", requires_grad=True"
        return text[:-1] + extra + ")"

    numpy.__doc__ = orig_numpy.__doc__
    torch.Tensor.numpy = numpy
    tensor_str._str = _str
    _patch_optimizer_defaults()


def _patch_optimizer_defaults() -> None:
    """Note: [Kernel choices follow the target]
    PyTorch lists every PrivateUse1 backend as supporting foreach/fused optimizer kernels, so
    optimizers would take their multi-tensor path on remote_accelerator, while eager CPU takes
    the single-tensor one and gets different bits. Report support only when flushes run on a
    device whose eager default is the multi-tensor path (CUDA). The SDPA backend choice follows
    the target the same way (csrc/capture/kernels.cpp)."""
    import torch.optim.optimizer as optimizer
    import torch.utils._foreach_utils as foreach_utils

    for name in ("_get_foreach_kernels_supported_devices", "_get_fused_kernels_supported_devices"):
        orig = getattr(foreach_utils, name)

        def supported(orig=orig) -> list[str]:
            devices = orig()
            if _target_type == "cpu":
                devices = [d for d in devices if d != BACKEND]
            return devices

        setattr(foreach_utils, name, supported)
        if hasattr(optimizer, name):
            setattr(optimizer, name, supported)


def set_target_type(device_type: str) -> None:
    """Record which kind of device flushes run on (set by executors when installed)."""
    global _target_type
    _target_type = torch.device(device_type).type
    from genie import decompositions

    decompositions.install(_target_type)  # Note: [Ops chosen by device type]


def install() -> None:
    """Register the backend with PyTorch (idempotent; called by ``import genie``)."""
    global _installed
    with _lock:
        if _installed:
            return
        count = os.environ.get("GENIE_DEVICE_COUNT")
        if count:
            _C._set_device_count(int(count))
        direct = _C._register()
        torch.utils.rename_privateuse1_backend(BACKEND)
        torch._register_device_module(BACKEND, _make_device_module())
        torch.utils.generate_methods_for_privateuse1_backend(
            for_tensor=True, for_module=True, for_packed_sequence=True, for_storage=True
        )
        _C._set_error_hook(errors._from_core)
        _set_local(_default_local_device())
        _patch_tensor_methods()
        _installed = True
        logger.debug("genie: %d composite ops captured as single nodes", direct)


def _set_local(device: str) -> None:
    global _local_device
    torch.device(device)  # validates the string
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise errors.GenieError(
            f"genie: local device {device!r} requested but CUDA is not available"
        )
    _C._set_local_executor(device)
    _local_device = device
    set_target_type(device)


def configure(*, device_count: int | None = None, local_device: str | None = None) -> None:
    """Set how many ``remote_accelerator`` devices exist and where the embedded executor runs.

    Changing the local device drops whatever the previous executor held, so do it before
    creating remote tensors.
    """
    if device_count is not None:
        _C._set_device_count(int(device_count))
    if local_device is not None:
        _set_local(local_device)


def local_device() -> str | None:
    """The device the embedded local executor runs on ("cpu", "cuda"...)."""
    return _local_device


def device_count() -> int:
    return _C._device_count()


@contextlib.contextmanager
def capture(device: int | str | torch.device = 0) -> Iterator[torch.device]:
    """Record instead of running: tensors created without a device inside are lazy
    ``remote_accelerator`` tensors; CPU tensors that meet them become graph inputs."""
    index = _index(device) if not isinstance(device, int) else device
    if not 0 <= index < _C._device_count():
        raise IndexError(
            f"genie: {BACKEND}:{index} is not configured; {_C._device_count()} device(s) exist"
        )
    dev = torch.device(BACKEND, index)
    with dev:
        yield dev


def synchronize() -> None:
    """Run everything still pending whose result can be observed."""
    _C._flush_all()


def stats() -> dict:
    """Counters of the recorder, the shape cache and the executor."""
    return dict(_C._stats())
