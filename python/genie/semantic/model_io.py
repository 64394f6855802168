"""How ``SemanticAnalyzer.analyze`` meets a model: the device its inputs go to, and which
graph inputs are the model's own parameters and buffers (see Note: [Residency of graph
inputs] in genie.semantic.annotate)."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["param_storages", "remote_device", "tensors", "to_device"]

_BACKEND = "remote_accelerator"


def param_storages(graph, model: torch.nn.Module) -> frozenset[int]:
    """Storage ids of the model's parameters and buffers among the graph's inputs: by
    ``genie._C._storage_id`` for tensors on remote_accelerator, by data pointer for CPU
    tensors uploaded as graph constants."""
    from genie import _C

    out: set[int] = set()
    cpu_ptrs: set[int] = set()
    for t in tensors(model):
        if t.device.type == _BACKEND:
            try:
                out.add(int(_C._storage_id(t)))
            except Exception:  # noqa: BLE001 - a tensor the recorder does not know
                continue
        elif t.device.type == "cpu":
            cpu_ptrs.add(t.untyped_storage().data_ptr())
    if cpu_ptrs:
        for s, c in graph.constants.items():
            if c.untyped_storage().data_ptr() in cpu_ptrs:
                out.add(s)
    return frozenset(out)


def tensors(model: torch.nn.Module):
    yield from model.parameters()
    yield from model.buffers()


def remote_device(model: torch.nn.Module) -> torch.device:
    for t in tensors(model):
        if t.device.type == _BACKEND:
            return t.device
    return torch.device(_BACKEND, 0)


def to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device) if obj.device.type == "cpu" else obj
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj
