"""MultiDeviceExecutor: runs each flush as a multi-fragment plan over several devices.

    ex = MultiDeviceExecutor({"cpu": "cpu", "cuda:0": "cuda:0"})       # or .local()
    genie.runtime.install_executor(ex)
    y = model(x).cpu()              # scheduled, planned, run across both, moved as planned

For every flush: the node dicts become a Graph; the Scheduler places it (knowing where the
graph's inputs already live, so a KV cache stays put) and the Planner cuts it into fragments
and transfers (both cached by structural hash); fragments run in dependency order on their
device -- concurrently across devices when the plan's ``overlap_io`` flag is on -- and
transfers copy storages between devices in between (plan_execution.py). Afterwards every
storage the flush wrote and a tensor still holds has one home, the device that produced its
final value; fetch and release follow homes.

A device is anything with the small DeviceBackend interface: ``EnvironmentBackend`` wraps a
``genie.runtime.replay.Environment`` (in-process CPU or CUDA), ``ExecutorBackend`` any
Executor, such as a ``genie serve`` session (RemoteExecutor), so two servers are two devices.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from genie.envflags import env_flag
from genie.errors import ExecutionError
from genie.graph.ir import Graph, Node, TensorMeta
from genie.runtime.backends import (
    DeviceBackend,
    EnvironmentBackend,
    ExecutorBackend,
    node_to_core,
    session,
)
from genie.runtime.plan_execution import PlanExecution
from genie.runtime.releases import freeable, schedule_releasing
from genie.runtime.remote.peers import PeerLinks
from genie.runtime.replay import Environment
from genie.scheduler.cost_model import GraphCostEstimator
from genie.scheduler.devices import DeviceSpec
from genie.scheduler.planner import ExecutionPlan, Planner
from genie.scheduler.scheduler import Scheduler
from genie.scheduler.topology import NetworkTopology

logger = logging.getLogger(__name__)

__all__ = [
    "DeviceBackend",
    "EnvironmentBackend",
    "ExecutorBackend",
    "MultiDeviceExecutor",
    "install_multi_device",
    "node_to_core",
]


def _spec_for(device: torch.device) -> DeviceSpec:
    return DeviceSpec.detect(device) if device.type == "cuda" else DeviceSpec.cpu()


def topology_for(backends: Mapping[str, DeviceBackend]) -> NetworkTopology:
    """A topology for in-process devices: PCIe to and between GPUs, memory copies on the host."""
    topo = NetworkTopology()
    for name, b in backends.items():
        topo.add_device(name, _spec_for(b.device), torch_device=str(b.device))
    names = list(backends)
    for i, a in enumerate(names):
        da = backends[a].device
        topo.add_link(
            topo.client,
            a,
            kind="pcie5" if da.type == "cuda" else None,
            bandwidth=None if da.type == "cuda" else 20e9,
            latency=None if da.type == "cuda" else 1e-6,
        )
        for b in names[i + 1 :]:
            db = backends[b].device
            if da.type == "cuda" and db.type == "cuda":
                topo.add_link(a, b, kind="nvlink4")
            elif da.type == "cuda" or db.type == "cuda":
                topo.add_link(a, b, kind="pcie5")
            else:
                topo.add_link(a, b, bandwidth=20e9, latency=1e-6)
    return topo


class MultiDeviceExecutor(PlanExecution):
    """The Python Executor protocol over several devices (see the module docstring).

    Args:
        devices: name -> Environment, torch device string, or DeviceBackend. Names must be
            devices of `topology` when one is given.
        topology: defaults to ``topology_for(devices)``.
        scheduler / planner: defaults built on the topology (strategy ``auto``).
        profiler: ``graph -> WorkloadProfile`` (or ``"semantic"`` to run genie.semantic's
            analyzer on every flush); None schedules from the graph alone.
        measure: time each fragment and feed the cost model's calibration and the
            scheduler's adaptive optimizer (the adaptive path).
        concurrent: run devices concurrently when the plan says ``overlap_io`` (default);
            False runs the plan's steps one after another.
    """

    # The recorder names what is dead after each flush (Note: [Dead after the flush]).
    frees_dead = True

    def __init__(
        self,
        devices: Mapping[str, Any] | None = None,
        *,
        topology: NetworkTopology | None = None,
        scheduler: Scheduler | None = None,
        planner: Planner | None = None,
        profiler: Callable[[Graph], Any] | str | None = None,
        measure: bool = False,
        concurrent: bool = True,
        direct: bool | None = None,
    ):
        if devices is None:
            devices = _local_devices()
        self.backends: dict[str, DeviceBackend] = {}
        for name, d in devices.items():
            if isinstance(d, (Environment, str, torch.device)):
                self.backends[name] = EnvironmentBackend(name, d)
            else:
                self.backends[name] = d
        if not self.backends:
            raise ValueError("genie: MultiDeviceExecutor needs at least one device")
        self.topology = (
            topology or (scheduler.topology if scheduler else None) or topology_for(self.backends)
        )
        for name in self.backends:
            self.topology.device(name)
        self.scheduler = scheduler or Scheduler(
            GraphCostEstimator(), self.topology, devices=list(self.backends)
        )
        self.planner = planner or Planner(self.scheduler.estimator, self.topology)
        if profiler == "semantic":
            profiler = _semantic_profiler()
        self.profiler = profiler
        self.measure = measure
        self.concurrent = concurrent
        self.name = "multi:" + ",".join(self.backends)
        self.device_type = "cpu"
        self._home: dict[int, str] = {}  # storage -> device holding its current value
        self._copies: dict[int, set[str]] = {}  # storage -> devices with a valid copy
        self._eager_device: str | None = None
        self._run_budget: dict[str, int] = {}  # program -> runs that fitted (Note: [Runs])
        self._lock = threading.RLock()
        self.last_schedule = None
        self.last_plan: ExecutionPlan | None = None
        self.stats = {
            "flushes": 0,
            "fragments": 0,
            "transfers": 0,
            "transfer_bytes": 0,
            "schedule_s": 0.0,
            "execute_s": 0.0,
            "direct_transfers": 0,
            "direct_bytes": 0,
            "released_early": 0,
            "runs": 0,
        }
        # Servers move tensors between themselves (Note: [Server-to-server moves]);
        # GENIE_DIRECT_MOVES=0 (or direct=False) relays them through this process instead.
        if direct is None:
            direct = env_flag("GENIE_DIRECT_MOVES", True)
        self.direct = direct
        self._links = PeerLinks()

    @classmethod
    def local(cls, **kwargs) -> MultiDeviceExecutor:
        """The CPU plus every CUDA device of this machine."""
        return cls(_local_devices(), **kwargs)

    @classmethod
    def from_topology(
        cls, topology: NetworkTopology, *, token: str | bytes | None = None, **kwargs
    ) -> MultiDeviceExecutor:
        """Every device of `topology`: one with an ``endpoint`` is a ``genie serve`` session
        (token from its ``token_file``, else `token`, else ``$GENIE_TOKEN``); the others run in
        this process on their ``torch_device`` (default cpu)."""
        devices: dict[str, Any] = {}
        for name, dev in topology.devices.items():
            if dev.endpoint:
                devices[name] = ExecutorBackend(name, session(dev.endpoint, dev.token_file, token))
            else:
                devices[name] = dev.torch_device or "cpu"
        return cls(devices, topology=topology, **kwargs)

    @classmethod
    def from_servers(
        cls,
        servers: list,
        *,
        token: str | bytes | None = None,
        spec: str = "H100",
        link: str = "eth100",
        **kwargs,
    ) -> MultiDeviceExecutor:
        """Several ``genie serve`` endpoints (``"host:port"`` or ``{"address", "token" |
        "token_file", "type"}`` entries, as ``servers_from_topology`` reads them) as devices
        ``server0``, ``server1``... of a uniform topology."""
        topo = NetworkTopology()
        devices: dict[str, Any] = {}
        for i, entry in enumerate(servers):
            entry = {"address": entry} if isinstance(entry, str) else dict(entry)
            name = str(entry.get("name", f"server{i}"))
            client = session(entry["address"], entry.get("token_file"), entry.get("token", token))
            # What the server says it runs on (its device, memory, session limit), unless the
            # entry names a type.
            info = getattr(client, "info", None)
            kind = (
                entry["type"] if "type" in entry else DeviceSpec.from_server(info) if info else spec
            )
            topo.add_device(name, kind, endpoint=entry["address"])
            topo.add_link(topo.client, name, kind=link)
            devices[name] = ExecutorBackend(name, client)
        names = list(devices)
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                topo.add_link(a, b, kind=link)
        return cls(devices, topology=topo, **kwargs)

    # -- the Executor protocol ---------------------------------------------------------------
    def run(
        self,
        nodes: list[dict],
        constants: dict[int, torch.Tensor],
        targets: list[int],
        dead: Sequence[int] = (),
    ) -> None:
        with self._lock:
            t0 = time.perf_counter()
            graph = Graph(
                (Node.from_core(d) for d in nodes), {int(k): v for k, v in constants.items()}
            )
            if not graph.nodes:
                for s, t in graph.constants.items():
                    self._upload(s, t, next(iter(self.backends)))
                return
            # Dead values from earlier flushes that this one does not touch go now, not
            # after it: the memory they held is this flush's (Note: [What a device holds]).
            if dead:
                touched = {t.storage for n in graph.nodes for t in (*n.inputs, *n.outputs)}
                self.release([s for s in dead if s in self._home and s not in touched])
            resident = {
                s: self._home[s]
                for s in graph.input_storages
                if s in self._home and s not in graph.constants
            }
            profile = self.profiler(graph) if callable(self.profiler) else None
            # A device keeps what a flush creates until the flush ends, but for the dead
            # values this executor frees after their last use (Note: [What a device holds] in
            # scheduler/memory.py): the memory sweep counts them so, and the copies of
            # resident inputs kept on other devices (read there, never moved again).
            copies = {s: self._copies[s] - {resident[s]} for s in resident if s in self._copies}
            key = graph.structural_hash()
            schedule, releases, budget = schedule_releasing(
                self.scheduler,
                graph,
                profile,
                freeable(graph, dead),
                self._run_budget.get(key),
                resident=resident,
                reserved=self._reserved(graph),
                holds="flush",
                copies=copies,
            )
            # Most programs fit whole: remember only the ones that did not.
            if budget is None:
                self._run_budget.pop(key, None)
            else:
                self._run_budget[key] = budget
            plan = self.planner.generate_plan(graph, profile, schedule)
            t1 = time.perf_counter()
            self._execute(graph, plan, releases)
            t2 = time.perf_counter()
            self.last_schedule, self.last_plan = schedule, plan
            st = self.stats
            st["flushes"] += 1
            st["fragments"] += len(plan.fragments)
            st["schedule_s"] += t1 - t0
            st["execute_s"] += t2 - t1
            if self.measure:
                self.scheduler.record_execution(schedule, t2 - t1)

    def fetch(self, ref: dict) -> torch.Tensor:
        with self._lock:
            meta = TensorMeta.from_core(ref)
            return self._backend_holding(meta.storage).view(meta)

    def release(self, ids) -> None:
        with self._lock:
            ids = list(ids)
            for b in self.backends.values():
                b.release(ids)
            for s in ids:
                self._home.pop(s, None)
                self._copies.pop(s, None)

    def has(self, storage: int) -> bool:
        return storage in self._home or any(b.has(storage) for b in self.backends.values())

    def run_eager(self, node: dict) -> list[Any]:
        with self._lock:
            n = Node.from_core(node)
            dev = next(
                (self._home[t.storage] for t in n.inputs if t.storage in self._home),
                next(iter(self.backends)),
            )
            backend = self.backends[dev]
            for t in n.inputs:
                self._ensure(t.storage, dev)
            self._eager_device = dev
            return backend.run_eager(n)

    def bind(self, ref: dict, value: torch.Tensor) -> None:
        with self._lock:
            meta = TensorMeta.from_core(ref)
            dev = self._eager_device or next(iter(self.backends))
            self.backends[dev].bind(meta, value)
            self._set_home(meta.storage, dev)

    def resident_count(self) -> int:
        ids: set[int] = set(self._home)
        for b in self.backends.values():
            if isinstance(b, EnvironmentBackend):
                ids.update(b.env.storages)
        return len(ids)

    def resident_bytes(self) -> int:
        return sum(b.nbytes() for b in self.backends.values())

    # -- plans by hand ------------------------------------------------------------------------
    def close(self) -> None:
        """End the sessions this executor opened with servers."""
        for b in self.backends.values():
            close = getattr(getattr(b, "executor", None), "close", None)
            if close is not None:
                close()
        self._links.close()

    def execute(self, graph: Graph, plan: ExecutionPlan) -> None:
        """Run a given plan of `graph` (uploading ``graph.constants`` as it says)."""
        with self._lock:
            self._execute(graph, plan)

    def read(self, meta: TensorMeta) -> torch.Tensor:
        """The current value of a tensor (a view of a resident storage), wherever it lives."""
        with self._lock:
            return self._backend_holding(meta.storage).view(meta)

    # -- residency ---------------------------------------------------------------------------
    def _upload(self, storage: int, tensor: torch.Tensor, dev: str) -> None:
        self.backends[dev].put_constant(storage, tensor)
        if storage not in self._home:
            self._home[storage] = dev
        else:
            self._copies.setdefault(storage, set()).add(dev)

    def _set_home(self, storage: int, dev: str) -> None:
        old = self._copies.pop(storage, None) or set()
        prev = self._home.get(storage)
        if prev is not None and prev != dev:
            old.add(prev)
        self._home[storage] = dev
        stale = [d for d in old if d != dev]
        for d in stale:
            self.backends[d].release([storage])
        # Recomputed copies and transferred versions left on other devices are stale too.
        for name, b in self.backends.items():
            if name != dev and name not in stale and b.has(storage):
                b.release([storage])

    def _backend_holding(self, storage: int) -> DeviceBackend:
        dev = self._home.get(storage)
        if dev is not None:
            return self.backends[dev]
        for b in self.backends.values():
            if b.has(storage):
                return b
        raise ExecutionError(
            f"genie: storage {storage} is not resident on any device ({', '.join(self.backends)})"
        )

    def _ensure(self, storage: int, dev: str) -> None:
        """Make `storage` available on `dev` (a copy from its home)."""
        b = self.backends[dev]
        if b.has(storage):
            return
        src = self._backend_holding(storage)
        b.import_(storage, src.export(storage))
        self._copies.setdefault(storage, set()).add(dev)

    def _reserved(self, graph: Graph) -> dict[str, int]:
        """Bytes each device holds for values this graph does not read: their homes and
        the copies kept elsewhere (uploads and inputs moved to a second device)."""
        read = set(graph.input_storages)
        out: dict[str, int] = {}
        for s, dev in self._home.items():
            if s not in read:
                for d in {dev, *self._copies.get(s, ())}:
                    out[d] = out.get(d, 0) + self.backends[d].storage_nbytes(s)
        return out


def _local_devices() -> dict[str, Any]:
    devices: dict[str, Any] = {"cpu": "cpu"}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            devices[f"cuda:{i}"] = f"cuda:{i}"
    return devices


def _semantic_profiler() -> Callable[[Graph], Any]:
    try:
        from genie.semantic import SemanticAnalyzer
    except ImportError as e:  # the semantic layer is optional for scheduling
        raise ExecutionError(f"genie: profiler='semantic' needs genie.semantic: {e}") from e
    analyzer = SemanticAnalyzer()
    return analyzer.analyze_graph


def install_multi_device(devices: Mapping[str, Any] | None = None, **kwargs) -> MultiDeviceExecutor:
    """Create a MultiDeviceExecutor and route every following flush through it."""
    from genie.runtime.executor import install_executor

    ex = MultiDeviceExecutor(devices, **kwargs)
    install_executor(ex, "cpu")
    return ex
