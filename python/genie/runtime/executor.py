"""The Executor protocol and a pure-Python in-process executor.

The recorder (C++) calls an executor object with these methods whenever a flush needs to run
(see Note: [Python executors] in csrc/bindings/python_executor.cpp). The embedded default is the
compiled local executor; Python executors plug in with ``install_executor``.
"""

from __future__ import annotations

import threading
from typing import Any, Protocol, runtime_checkable

import torch

from genie import _C
from genie.graph.ir import Node, TensorMeta
from genie.runtime.replay import Environment, run_node

__all__ = ["Executor", "PythonExecutor", "install_executor", "use_local"]


@runtime_checkable
class Executor(Protocol):
    """What the recorder needs from an executor."""

    name: str

    def run(
        self, nodes: list[dict], constants: dict[int, torch.Tensor], targets: list[int]
    ) -> None:
        """Upload `constants`, then run `nodes` (core dicts, program order). An executor
        whose ``frees_dead`` attribute is true is called with a fourth argument, ``dead``: the
        storages the recorder releases as soon as this call returns, which it may free once
        their last reader ran (Note: [Dead after the flush] in csrc/capture/recorder.cpp)."""

    def fetch(self, ref: dict) -> torch.Tensor:
        """The value of a view of a resident storage, as a tensor the host can copy from."""

    def release(self, ids: list[int]) -> None:
        """Storages nobody can reach any more."""

    def has(self, storage: int) -> bool: ...

    def run_eager(self, node: dict) -> list[Any]:
        """Run one node now (data-dependent output shape); return its results."""

    def bind(self, ref: dict, value: torch.Tensor) -> None:
        """Make a result of run_eager the content of `ref`'s storage."""

    def resident_count(self) -> int: ...

    def resident_bytes(self) -> int: ...


class PythonExecutor:
    """Runs flushes in this process with the Python replay engine. Slower than the compiled
    default; it is the reference the remote server and multi-device plans build on."""

    frees_dead = True  # Note: [Dead after the flush] in csrc/capture/recorder.cpp

    def __init__(self, device: str | torch.device = "cpu"):
        self.env = Environment(device)
        self.name = f"python:{self.env.device}"
        self._lock = threading.Lock()

    def run(self, nodes, constants, targets, dead=()) -> None:
        with self._lock:
            for sid, t in constants.items():
                self.env.put_constant(int(sid), t)
            steps = [Node.from_core(d) for d in nodes]
            # A dead storage goes once the last node touching it ran, as in eager.
            dead = set(dead)
            last: dict[int, int] = {}
            for i, n in enumerate(steps):
                for s in (*(t.storage for t in (*n.inputs, *n.outputs)), *n.writes):
                    if s in dead:
                        last[s] = i
            self.env.release([s for s in dead if s not in last])
            drop: dict[int, list[int]] = {}
            for s, i in last.items():
                drop.setdefault(i, []).append(s)
            for i, n in enumerate(steps):
                run_node(n, self.env)
                if i in drop:
                    self.env.release(drop[i])

    def fetch(self, ref: dict) -> torch.Tensor:
        with self._lock:
            return self.env.view(TensorMeta.from_core(ref))

    def release(self, ids) -> None:
        with self._lock:
            self.env.release(ids)

    def has(self, storage: int) -> bool:
        return storage in self.env

    def run_eager(self, node: dict) -> list[Any]:
        with self._lock:
            return run_node(Node.from_core(node), self.env, bind=False)

    def bind(self, ref: dict, value: torch.Tensor) -> None:
        with self._lock:
            self.env.bind(TensorMeta.from_core(ref), value)

    def resident_count(self) -> int:
        return len(self.env.storages)

    def resident_bytes(self) -> int:
        return self.env.nbytes()


def install_executor(executor: Executor, target_device_type: str = "cpu") -> None:
    """Route every following flush through `executor`. What the previous executor held is
    dropped, so install before creating remote tensors."""
    from genie import device as _device

    _C._set_python_executor(executor, target_device_type)
    hook = getattr(executor, "speculation_hook", None)
    if hook is not None:  # Note: [Speculation hook] in csrc/capture/speculation_hook.h
        _C._set_speculation_hook(hook)
    _device.set_target_type(target_device_type)


def use_local(device: str | None = None) -> None:
    """Go back to the compiled in-process executor."""
    from genie import device as _device

    _device.configure(local_device=device or _device._default_local_device())
