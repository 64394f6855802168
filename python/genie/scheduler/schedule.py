"""ExecutionSchedule: stages of groups, node placement, estimates; what the Scheduler returns.

A schedule is built for one graph but is stored by position (index in ``graph.nodes``) so
that a cached schedule serves every later recording with the same structural hash: node ids
differ between recordings, positions do not (see ``bind``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from genie.graph.ir import Graph

__all__ = ["ExecutionSchedule", "Stage", "Group"]


@dataclass
class Group:
    """Nodes of one stage that run together on one device."""

    id: int
    stage: int
    device: str
    node_ids: list[int]
    start: float = 0.0  # estimated, seconds from the start of the graph
    end: float = 0.0
    cost: float = 0.0  # estimated compute seconds


@dataclass
class Stage:
    """Groups that may run at the same time (one dependency level, or one pipeline stage)."""

    index: int
    groups: list[Group]
    start: float = 0.0
    end: float = 0.0

    @property
    def cost(self) -> float:
        return sum(g.cost for g in self.groups)

    @property
    def devices(self) -> list[str]:
        return sorted({g.device for g in self.groups})


@dataclass
class ExecutionSchedule:
    """Where and when every node runs, as estimated.

    ``placement`` maps every node id (views included) to a device name; ``recompute`` maps a
    node id to the extra devices that compute it again instead of receiving its output.
    """

    graph_hash: str
    strategy: str
    devices: list[str]
    stages: list[Stage]
    groups: list[Group]
    placement: dict[int, str]
    node_to_stage: dict[int, int]
    node_to_group: dict[int, int]
    recompute: dict[int, list[str]]
    makespan: float
    peak_memory: dict[str, int]
    memory_capacity: dict[str, int]
    device_busy: dict[str, float]
    moved_bytes: int
    notes: list[str] = field(default_factory=list)
    resident: dict[int, str] = field(default_factory=dict)
    key: tuple = ()
    node_times: dict[int, tuple[float, float]] = field(default_factory=dict)  # id -> (start, end)
    optimizer_key: Any = None
    # replicas of the program in the graph (Note: [Replicas]) that the placement pipelines
    # as micro-batches (0: none)
    micro_batches: int = 0
    # resident inputs that also have valid copies on other devices: storage -> devices
    copies: dict[int, list[str]] = field(default_factory=dict)
    topology: Any = field(default=None, repr=False, compare=False)
    estimator: Any = field(default=None, repr=False, compare=False)
    # positional form, for rebinding to another recording of the same program
    _pos: dict[str, Any] = field(default_factory=dict, repr=False)
    _node_ids: tuple[int, ...] = field(default=(), repr=False)

    # -- queries -----------------------------------------------------------------------------
    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def devices_used(self) -> list[str]:
        used = set(self.placement.values())
        return [d for d in self.devices if d in used]

    @property
    def stage_costs(self) -> list[float]:
        return [s.cost for s in self.stages]

    def nodes_on(self, device: str) -> list[int]:
        return [n for n, d in self.placement.items() if d == device]

    def device_of(self, node_id: int) -> str:
        return self.placement[node_id]

    def summary(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for d in self.placement.values():
            counts[d] = counts.get(d, 0) + 1
        return {
            "graph_hash": self.graph_hash[:16],
            "strategy": self.strategy,
            "devices": self.devices,
            "nodes_per_device": counts,
            "stages": len(self.stages),
            "groups": len(self.groups),
            "recomputed_nodes": len(self.recompute),
            "estimated_makespan_ms": self.makespan * 1e3,
            "peak_memory_bytes": self.peak_memory,
            "memory_capacity_bytes": self.memory_capacity,
            "moved_bytes": self.moved_bytes,
            "micro_batches": self.micro_batches,
            "notes": list(self.notes),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            **self.summary(),
            "placement": {str(k): v for k, v in self.placement.items()},
            "recompute": {str(k): v for k, v in self.recompute.items()},
            "stages": [
                {
                    "index": s.index,
                    "start_ms": s.start * 1e3,
                    "end_ms": s.end * 1e3,
                    "groups": [
                        {
                            "id": g.id,
                            "device": g.device,
                            "nodes": g.node_ids,
                            "start_ms": g.start * 1e3,
                            "end_ms": g.end * 1e3,
                        }
                        for g in s.groups
                    ],
                }
                for s in self.stages
            ],
        }

    def format(self, max_stages: int = 40) -> str:
        """A human-readable table (what ``genie analyze --schedule`` prints)."""
        s = self.summary()
        lines = [
            f"schedule  strategy={self.strategy}  stages={s['stages']}  groups={s['groups']}  "
            f"estimated makespan={self.makespan * 1e3:.3f} ms  moved={_mb(self.moved_bytes)}",
            f"{'device':<14}{'nodes':>7}{'busy ms':>10}{'peak mem':>12}{'capacity':>12}",
        ]
        for d in self.devices:
            lines.append(
                f"{d:<14}{s['nodes_per_device'].get(d, 0):>7}{self.device_busy.get(d, 0.0) * 1e3:>10.3f}"
                f"{_mb(self.peak_memory.get(d, 0)):>12}{_mb(self.memory_capacity.get(d, 0)):>12}"
            )
        lines.append(f"{'stage':>5} {'start ms':>9} {'end ms':>9}  groups (device: nodes)")
        for st in self.stages[:max_stages]:
            groups = ", ".join(f"{g.device}: {len(g.node_ids)}" for g in st.groups)
            lines.append(f"{st.index:>5} {st.start * 1e3:>9.3f} {st.end * 1e3:>9.3f}  {groups}")
        if len(self.stages) > max_stages:
            lines.append(f"  ... {len(self.stages) - max_stages} more stages")
        if self.recompute:
            lines.append(f"recomputed instead of moved: {len(self.recompute)} node(s)")
        for note in self.notes:
            lines.append(f"note: {note}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2)

    # -- rebinding ---------------------------------------------------------------------------
    def bind(self, graph: Graph) -> ExecutionSchedule:
        """This schedule for another recording of the same program (same structural hash)."""
        ids = tuple(n.id for n in graph.nodes)
        if ids == self._node_ids:
            return self
        if len(ids) != len(self._node_ids):
            raise ValueError("genie: cannot bind a schedule to a graph of another structure")
        p = self._pos
        dev = p["device"]
        stage = p["stage"]
        group = p["group"]
        remap = dict(zip(self._node_ids, ids, strict=True))
        groups = [
            Group(g.id, g.stage, g.device, [remap[i] for i in g.node_ids], g.start, g.end, g.cost)
            for g in self.groups
        ]
        stages = [
            Stage(s.index, [groups[g.id] for g in s.groups], s.start, s.end) for s in self.stages
        ]
        out = ExecutionSchedule(
            graph_hash=self.graph_hash,
            strategy=self.strategy,
            devices=self.devices,
            stages=stages,
            groups=groups,
            placement=dict(zip(ids, dev, strict=True)),
            node_to_stage=dict(zip(ids, stage, strict=True)),
            node_to_group=dict(zip(ids, group, strict=True)),
            recompute={remap[k]: v for k, v in self.recompute.items()},
            makespan=self.makespan,
            peak_memory=self.peak_memory,
            memory_capacity=self.memory_capacity,
            device_busy=self.device_busy,
            moved_bytes=self.moved_bytes,
            notes=self.notes,
            resident=self.resident,
            key=self.key,
            node_times={remap[k]: v for k, v in self.node_times.items()},
            optimizer_key=self.optimizer_key,
            micro_batches=self.micro_batches,
            copies=self.copies,
            topology=self.topology,
            estimator=self.estimator,
            _pos=p,
            _node_ids=ids,
        )
        return out


def _mb(n: int) -> str:
    if n >= 1 << 30:
        return f"{n / (1 << 30):.2f} GiB"
    return f"{n / (1 << 20):.2f} MiB"
