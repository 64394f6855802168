"""Genie: run ordinary PyTorch programs on GPUs elsewhere on the network.

    import torch, genie
    x = torch.randn(8, 8, device="remote_accelerator:0")   # recorded, not run
    y = (x @ x).relu()
    print(y.cpu())                                           # flush: the graph runs

See README.md for what works today.
"""

from __future__ import annotations

from genie import _C
from genie.device import (
    BACKEND,
    capture,
    configure,
    device_count,
    local_device,
    stats,
    synchronize,
)
from genie.errors import (
    ExecutionError,
    GenieError,
    GraphValidationError,
    ProtocolError,
    RemoteError,
    TransportError,
    UnsupportedOperationError,
)
from genie.graph import Graph, GraphHandoff, Node, TensorMeta

__version__ = "0.1.0"

# Layers above capture load on first use, so `import genie` stays cheap.
_LAZY = {
    # semantic layer
    "SemanticAnalyzer": "genie.semantic",
    "AnalyzerConfig": "genie.semantic",
    "MatchedPattern": "genie.semantic",
    "ModuleContextTracker": "genie.semantic",
    "PatternRegistry": "genie.semantic",
    "PhaseDetector": "genie.semantic",
    "WorkloadProfile": "genie.semantic",
    "WorkloadType": "genie.semantic",
    "register_pattern": "genie.semantic",
    # scheduler
    "AdaptiveOptimizer": "genie.scheduler",
    "DeviceSpec": "genie.scheduler",
    "ExecutionPlan": "genie.scheduler",
    "ExecutionSchedule": "genie.scheduler",
    "GraphCostEstimator": "genie.scheduler",
    "Link": "genie.scheduler",
    "MemoryPlacementError": "genie.scheduler",
    "NetworkTopology": "genie.scheduler",
    "Planner": "genie.scheduler",
    "Scheduler": "genie.scheduler",
    "SchedulingError": "genie.scheduler",
    "SemanticOptimizer": "genie.scheduler",
    # runtime
    "MultiDeviceExecutor": "genie.runtime.multi_device",
    "connect": "genie.runtime.remote",
    "disconnect": "genie.runtime.remote",
}

__all__ = [
    *sorted(_LAZY),
    "BACKEND",
    "ExecutionError",
    "GenieError",
    "Graph",
    "GraphHandoff",
    "GraphValidationError",
    "Node",
    "ProtocolError",
    "RemoteError",
    "TensorMeta",
    "TransportError",
    "UnsupportedOperationError",
    "capture",
    "configure",
    "device_count",
    "get_graph",
    "last_graph",
    "local_device",
    "stats",
    "synchronize",
]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'genie' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def get_graph() -> Graph:
    """The pending (recorded, not yet run) program as a Graph."""
    return Graph((Node.from_core(d) for d in _C._pending_nodes()), _C._pending_constants())


def last_graph() -> Graph:
    """The program the most recent flush ran."""
    return Graph(Node.from_core(d) for d in _C._last_flushed_nodes())


from genie import device as _device  # noqa: E402

_device.install()


def _select_executor_from_env() -> None:
    import os

    if os.environ.get("GENIE_SERVER") or os.environ.get("GENIE_TOPOLOGY"):
        from genie.runtime.remote import connect_from_env

        connect_from_env()


_select_executor_from_env()


def _register_dynamo_backend() -> None:
    """torch.compile(backend="genie") finds the backend through its entry point; when
    torch._dynamo is already loaded, register it now as well (never import it here: slow)."""
    import sys

    if "torch._dynamo" in sys.modules:
        from genie.compile import register

        register()


_register_dynamo_backend()
