"""Placement machinery shared by every strategy: the context (costs per device, co-location
units, pins), the makespan simulator and recomputation decisions; the memory liveness sweep
and rebalancing are in memory.py.

A placement is a list: compute index -> device index (see genie.scheduler.analysis).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from genie.scheduler.analysis import GraphAnalysis
from genie.scheduler.cost_model import GraphCostEstimator
from genie.scheduler.errors import PlacementError
from genie.scheduler.memory import HOLDS, MemoryMixin, MemoryReport, Releases, format_bytes
from genie.scheduler.topology import NetworkTopology

logger = logging.getLogger(__name__)

__all__ = ["HOLDS", "PlacementContext", "SimResult", "MemoryReport", "format_bytes"]

# node.meta keys the scheduler reads (SemanticOptimizer and users write them)
META_DEVICE = "genie.device"  # pin: a device name
META_COLOCATE = "genie.colocate"  # nodes with the same key share a device
META_FUSION_GROUP = "genie.fusion_group"  # conv-bn-relu and similar: never split
META_EARLY = "genie.early"  # cheap, input-only work: compute early / recompute freely
META_PRIORITY = "genie.priority"  # added to the node's list-scheduling rank
META_PARALLEL = "genie.parallel_branch"  # independent work of one stage: its own group


@dataclass
class SimResult:
    start: list[float]
    finish: list[float]
    makespan: float
    busy: list[float]  # per device, seconds of compute
    moved_bytes: int
    dup_finish: dict[tuple[int, int], float] = field(default_factory=dict)


class PlacementContext(MemoryMixin):
    """Everything a strategy needs, with per-device times precomputed (its memory sweep and
    rebalancing: MemoryMixin in memory.py)."""

    def __init__(
        self,
        analysis: GraphAnalysis,
        topology: NetworkTopology,
        estimator: GraphCostEstimator,
        devices: list[str],
        *,
        resident: dict[int, str] | None = None,
        copies: dict[int, set[str]] | None = None,
        pins: dict[int, str] | None = None,
        reserved: dict[str, int] | None = None,
        include_uploads: bool = True,
        holds: str = "last_use",
        releases: Releases | None = None,
    ):
        if not devices:
            raise PlacementError("genie: no devices to place the graph on")
        if holds not in HOLDS:
            raise PlacementError(f"genie: holds must be one of {HOLDS}, not {holds!r}")
        self.holds = holds
        self.releases = releases  # Note: [What a device holds]
        self.A = analysis
        self.topology = topology
        self.estimator = estimator
        self.devices = list(devices)
        self.D = len(devices)
        self.dindex = {d: i for i, d in enumerate(self.devices)}
        self.specs = [topology.spec(d) for d in self.devices]
        self.include_uploads = include_uploads
        C = len(analysis)
        self.C = C
        # Times per distinct spec, shared by devices of the same kind.
        by_spec: dict[tuple, list[float]] = {}
        per_device: list[list[float]] = []
        for spec in self.specs:
            key = spec.signature()
            col = by_spec.get(key)
            if col is None:
                col = [estimator.time(c, spec) for c in analysis.costs]
                by_spec[key] = col
            per_device.append(col)
        self.dtime = per_device  # dtime[d][ci]
        self.avg_time = [sum(per_device[d][ci] for d in range(self.D)) / self.D for ci in range(C)]
        self.queue = [estimator.queueing_delay(topology.device(d)) for d in self.devices]
        self.capacity = [
            max(0, s.usable_memory - int((reserved or {}).get(d, 0)))
            for d, s in zip(self.devices, self.specs, strict=False)
        ]
        # Paths between devices and from the client, resolved once.
        self._paths = [
            [topology.path(a, b) if a != b else None for b in self.devices] for a in self.devices
        ]
        self._upload = [topology.path(topology.client, d) for d in self.devices]
        # Note: [Uploads]
        # Constants (weights on their first flush) leave the client one after another, in
        # the order the program first needs them: seconds per byte of the client's route.
        self._upload_spb = [
            (1.0 / p.bandwidth) / (1.0 - min(p.utilization, 0.99)) for p in self._upload
        ]
        self.resident: dict[int, int] = {}
        for s, dev in (resident or {}).items():
            if dev in self.dindex:
                self.resident[s] = self.dindex[dev]
        # Resident inputs with valid copies on other devices too (weights uploaded to each
        # device of a data-parallel plan): read there, nothing moves.
        self.copies: dict[int, set[int]] = {}
        for s, devs in (copies or {}).items():
            idx = {self.dindex[d] for d in devs if d in self.dindex} - {self.resident.get(s)}
            if s in self.resident and idx:
                self.copies[s] = idx
        self._build_units(pins or {})

    # -- transfer times --------------------------------------------------------------------
    def xfer(self, nbytes: int, src: int, dst: int) -> float:
        if src == dst or nbytes <= 0:
            return 0.0
        return self._paths[src][dst].time(nbytes)

    def upload(self, nbytes: int, dst: int) -> float:
        return self._upload[dst].time(nbytes) if self.include_uploads else 0.0

    def input_arrival(self, storage: int, d: int) -> float:
        """When a graph input is available on device d (uploads start at time 0)."""
        r = self.resident.get(storage)
        nbytes = self.A.storage_bytes.get(storage, 0)
        if r is not None:
            return 0.0 if d in self.copies.get(storage, ()) else self.xfer(nbytes, r, d)
        if storage in self.A.constants:
            return self.upload(nbytes, d)
        return 0.0

    # -- co-location units and pins --------------------------------------------------------
    def _build_units(self, user_pins: dict[int, str]) -> None:
        A = self.A
        parent = list(range(self.C))

        def find(x: int) -> int:
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        def union(a: int, b: int) -> None:
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)

        keyed: dict[tuple[str, object], int] = {}
        pins: dict[int, int] = {}
        for ci, n in enumerate(A.cnodes):
            meta = n.meta
            if meta:
                for key in (META_COLOCATE, META_FUSION_GROUP):
                    v = meta.get(key)
                    if v is not None:
                        first = keyed.setdefault((key, v), ci)
                        union(first, ci)
                dev = meta.get(META_DEVICE)
                if dev is not None:
                    pins[ci] = self._device_index(dev, n)
            dev = user_pins.get(n.id)
            if dev is not None:
                pins[ci] = self._device_index(dev, n)
        self.kv_pins: dict[int, int] = {}
        for unit in A.kv_units():
            for m in unit.nodes[1:]:
                union(unit.nodes[0], m)
            where = [self.resident[s] for s in unit.cache_storages if s in self.resident]
            if where:
                # The cache stays where it lives (moving it every step costs more than any op).
                best = max(
                    set(where),
                    key=lambda d: sum(
                        A.storage_bytes.get(s, 0)
                        for s in unit.cache_storages
                        if self.resident.get(s) == d
                    ),
                )
                for m in unit.nodes:
                    pins.setdefault(m, best)
                    self.kv_pins[m] = best
        roots = [find(ci) for ci in range(self.C)]
        self.unit_of = roots
        members: dict[int, list[int]] = {}
        for ci, r in enumerate(roots):
            members.setdefault(r, []).append(ci)
        self.units = members  # root -> members in program order
        self.pin: dict[int, int] = {}  # unit root -> device index
        for ci, d in pins.items():
            r = roots[ci]
            old = self.pin.get(r)
            if old is not None and old != d:
                n = A.cnodes[ci]
                raise PlacementError(
                    f"genie: node {n.id} ({n.op}) is pinned to {self.devices[d]} but must share a device "
                    f"with nodes pinned to {self.devices[old]} (co-location unit of node "
                    f"{A.cnodes[r].id}); remove one of the pins"
                )
            self.pin[r] = d

    def _device_index(self, dev, node) -> int:
        if isinstance(dev, int) and 0 <= dev < self.D:
            return dev
        try:
            return self.dindex[str(dev)]
        except KeyError:
            raise PlacementError(
                f"genie: node {node.id} ({node.op}) is pinned to unknown device {dev!r}; "
                f"devices: {self.devices}"
            ) from None

    def pinned(self, ci: int) -> int:
        """Device index a compute node must run on, or -1."""
        return self.pin.get(self.unit_of[ci], -1)

    def apply_units(self, placement: list[int]) -> list[int]:
        """Make every unit follow its pin, else its first member."""
        for root, mem in self.units.items():
            d = self.pin.get(root, placement[mem[0]])
            for ci in mem:
                placement[ci] = d
        return placement

    def device_classes(self) -> list[int]:
        """One representative device per class of interchangeable devices (same figures,
        same route from the client, no resident inputs or pins of their own)."""
        special = set(self.resident.values()) | set(self.pin.values())
        special.update(d for ds in self.copies.values() for d in ds)
        reps: dict[tuple, int] = {}
        out = []
        for d in range(self.D):
            if d in special:
                out.append(d)
                continue
            p = self._upload[d]
            key = (
                self.specs[d].signature(),
                p.bandwidth,
                p.latency,
                p.utilization,
                self.queue[d],
                self.capacity[d],
            )
            if key not in reps:
                reps[key] = d
                out.append(d)
        return out

    def tidy(self, placement: list[int]) -> list[int]:
        """Isolated nodes (nothing read from earlier nodes, nothing read by later ones, such
        as an unused ``empty``) run next to their program-order neighbour instead of
        opening a fragment of their own somewhere else."""
        A = self.A
        for ci in range(self.C):
            if A.preds[ci] or A.succs[ci] or self.pinned(ci) >= 0:
                continue
            if any(True for _ in A.consumers_of(ci)):
                continue
            placement[ci] = placement[ci - 1] if ci else placement[min(1, self.C - 1)]
        return placement

    def single(self, d: int) -> list[int]:
        return self.apply_units([d] * self.C)

    # -- simulation ------------------------------------------------------------------------
    def simulate(
        self, placement: list[int], recompute: dict[int, set[int]] | None = None
    ) -> SimResult:
        """Start/finish of every compute node when each device runs its nodes in program
        order and values move as soon as they are produced."""
        A = self.A
        C = self.C
        start = [0.0] * C
        finish = [0.0] * C
        free = list(self.queue)
        busy = [0.0] * self.D
        avail: dict[tuple[int, int, int], float] = {}
        moved = 0
        sbytes = A.storage_bytes
        dup_finish: dict[tuple[int, int], float] = {}
        recompute = recompute or {}
        dtime = self.dtime
        constants = A.constants
        uploads = self.include_uploads
        upclock = 0.0
        for ci in range(C):
            d = placement[ci]
            targets = [d]
            extra = recompute.get(ci)
            if extra:
                targets.extend(e for e in extra if e != d)
            for k, dev in enumerate(targets):
                ready = 0.0
                for s, w in A.reads[ci]:
                    if w >= 0:
                        if (w, dev) in dup_finish:
                            t = dup_finish[(w, dev)]
                        else:
                            src = placement[w]
                            if src == dev:
                                t = finish[w]
                            else:
                                key = (s, w, dev)
                                t = avail.get(key)
                                if t is None:
                                    nb = sbytes.get(s, 0)
                                    t = finish[w] + self.xfer(nb, src, dev)
                                    avail[key] = t
                                    moved += nb
                    else:
                        key = (s, -1, dev)
                        t = avail.get(key)
                        if t is None:
                            r = self.resident.get(s)
                            nb = sbytes.get(s, 0)
                            if r is not None and dev in self.copies.get(s, ()):
                                t = 0.0  # a copy is there already
                            elif r is not None:
                                t = self.xfer(nb, r, dev)
                                if r != dev:
                                    moved += nb
                            elif uploads and s in constants:
                                # Note: [Uploads] one client link, in order of first use
                                service = nb * self._upload_spb[dev]
                                t = upclock + self._upload[dev].latency + service
                                upclock += service
                                moved += nb
                            else:
                                t = 0.0
                            avail[key] = t
                    if t > ready:
                        ready = t
                if k == 0:
                    for p in A.preds[ci]:  # write-after-read ordering
                        if finish[p] > ready and placement[p] == dev:
                            ready = finish[p]
                st = ready if ready > free[dev] else free[dev]
                dt = dtime[dev][ci]
                free[dev] = st + dt
                busy[dev] += dt
                if k == 0:
                    start[ci] = st
                    finish[ci] = st + dt
                else:
                    dup_finish[(ci, dev)] = st + dt
        makespan = max(free) if C else 0.0
        return SimResult(start, finish, makespan, busy, moved, dup_finish)

    # -- recomputation ---------------------------------------------------------------------
    def recompute_decisions(self, placement: list[int], margin: float = 0.9) -> dict[int, set[int]]:
        """Where moving a value costs more than computing it again next to its consumer,
        recompute it there: the producer must be deterministic, write nothing in place, and
        its own inputs must already be on the consumer's device (or be constants, whose
        upload is then counted)."""
        A = self.A
        sbytes = A.storage_bytes
        # What each device has without any move: inputs it reads, values it produces.
        have: list[set[tuple[int, int]]] = [set() for _ in range(self.D)]
        for ci in range(self.C):
            d = placement[ci]
            for s in A.writes[ci]:
                have[d].add((s, ci))
            for s, w in A.reads[ci]:
                if w < 0:
                    have[d].add((s, -1))
        for s, r in self.resident.items():
            have[r].add((s, -1))
        for s, ds in self.copies.items():
            for d in ds:
                have[d].add((s, -1))
        decisions: dict[int, set[int]] = {}
        for w in range(self.C):
            n = A.cnodes[w]
            if n.random or n.writes or n.eager or not A.writes[w]:
                continue
            src = placement[w]
            remote: dict[int, int] = {}  # consumer device -> bytes it needs from w
            for s, r in A.consumers_of(w):
                e = placement[r]
                if e != src:
                    remote[e] = remote.get(e, 0) + sbytes.get(s, 0)
            if not remote:
                continue
            early = bool(n.meta.get(META_EARLY))
            for e, nbytes in remote.items():
                move = self.xfer(nbytes, src, e)
                redo = self.dtime[e][w]
                for s, v in A.reads[w]:
                    if (s, v) in have[e]:
                        continue
                    if v < 0 and s in A.constants:
                        redo += self.upload(sbytes.get(s, 0), e)
                    elif v < 0 and s in self.resident:
                        redo += self.xfer(sbytes.get(s, 0), self.resident[s], e)
                    elif v >= 0:
                        redo += self.xfer(sbytes.get(s, 0), placement[v], e)
                    else:
                        redo = float("inf")
                if redo < move * (1.0 if early else margin):
                    decisions.setdefault(w, set()).add(e)
        return decisions
