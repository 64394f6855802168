"""The Scheduler: one per process or per executor, strategies plugged in as policies.

    topo = NetworkTopology.from_file("cluster.toml")
    scheduler = Scheduler(cost_estimator=GraphCostEstimator(), network_topology=topo)
    schedule = scheduler.create_schedule(graph, profile)

For every graph: analysis (compute nodes, versions, levels, KV caches, branches) -> strategy
placement -> co-location units and pins -> memory rebalancing -> recomputation -> simulated
estimate -> stages and groups. Schedules are cached by the graph's structural hash plus
everything else they depend on (topology, calibration, strategy, where the graph's inputs
live, pins), and rebound to new recordings by node position.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict
from typing import Any

from genie.graph.ir import Graph
from genie.scheduler.analysis import GraphAnalysis
from genie.scheduler.cost_model import GraphCostEstimator
from genie.scheduler.memory import Releases
from genie.scheduler.placement import (
    HOLDS,
    META_DEVICE,
    META_FUSION_GROUP,
    META_PARALLEL,
    PlacementContext,
)
from genie.scheduler.policies import make_strategy
from genie.scheduler.schedule import ExecutionSchedule, Group, Stage
from genie.scheduler.topology import NetworkTopology

logger = logging.getLogger(__name__)

__all__ = ["Scheduler"]


class Scheduler:
    """Turns a graph (and optionally its WorkloadProfile) into an ExecutionSchedule.

    Args:
        cost_estimator: the cost model (a fresh GraphCostEstimator by default).
        network_topology: devices and links (this machine's CPU and GPUs by default).
        strategy: ``auto`` (default), ``sequential``, ``parallel``, ``pipeline``, ``priority``,
            ``dynamic``, or a strategy instance.
        devices: the subset of the topology's devices to use (default: all).
        optimizer: a SemanticOptimizer or AdaptiveOptimizer whose hints are written into
            ``node.meta`` before placement.
        recompute: allow recomputing cheap producers instead of moving their outputs.
        include_uploads: count uploads of constants from the client in estimates.
        holds: how long a device keeps a value, for the memory sweep: ``last_use`` (an
            executor that frees each value after its last reader) or ``flush`` (to the end
            of the graph, as genie's executors do; Note: [What a device holds]).
        cache_size: schedules kept (LRU); 0 disables the cache.
    """

    def __init__(
        self,
        cost_estimator: GraphCostEstimator | None = None,
        network_topology: NetworkTopology | None = None,
        strategy: Any = "auto",
        *,
        devices: list[str] | None = None,
        optimizer: Any = None,
        recompute: bool = True,
        include_uploads: bool = True,
        holds: str = "last_use",
        cache_size: int = 256,
    ):
        if holds not in HOLDS:
            raise ValueError(f"genie: holds must be one of {HOLDS}, not {holds!r}")
        self.holds = holds
        self.estimator = cost_estimator or GraphCostEstimator()
        self.topology = network_topology or NetworkTopology.local()
        self.strategy = strategy
        make_strategy(strategy)  # validate early
        self.devices = list(devices) if devices else list(self.topology.devices)
        for d in self.devices:
            self.topology.device(d)
        self.optimizer = optimizer
        self.recompute = recompute
        self.include_uploads = include_uploads
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple, ExecutionSchedule] = OrderedDict()
        self._lock = threading.Lock()
        self._stats: dict[str, Any] = {
            "schedules_created": 0,
            "cache_hits": 0,
            "cache_misses": 0,
            "total_time_s": 0.0,
            "last_time_s": 0.0,
            "strategies": Counter(),
        }

    # -- public API --------------------------------------------------------------------------
    def create_schedule(
        self,
        graph: Graph,
        profile: Any = None,
        *,
        resident: dict[int, str] | None = None,
        pins: dict[int, str] | None = None,
        reserved: dict[str, int] | None = None,
        strategy: Any = None,
        holds: str | None = None,
        copies: dict[int, set[str]] | None = None,
        releases: Releases | None = None,
    ) -> ExecutionSchedule:
        """Schedule `graph`.

        Args:
            profile: the semantic layer's WorkloadProfile (``.workload_type``, ``.phases``) or None.
            resident: storage id -> device name for graph inputs already on a device (values
                from earlier flushes, such as a KV cache). Other inputs are uploaded.
            pins: node id -> device name, on top of ``node.meta["genie.device"]``.
            reserved: device -> bytes already in use there (not available to this graph).
            strategy: overrides the scheduler's strategy for this call.
            holds: overrides the scheduler's ``holds`` for this call (an executor says how
                its devices keep values: Note: [What a device holds]).
            copies: storage id -> other devices that hold a valid copy of a resident input
                (weights uploaded to every device of a data-parallel plan): read there, not
                moved, and counted in those devices' memory.
            releases: under ``holds="flush"``, the storages the executor frees before the
                graph ends and the runs it executes (Note: [What a device holds]).
        """
        t0 = time.perf_counter()
        holds = holds or self.holds
        resident = resident or {}
        copies = {s: set(ds) for s, ds in (copies or {}).items() if s in resident and ds}
        strat_spec = strategy if strategy is not None else self.strategy
        opt_key: Any = None
        if self.optimizer is not None:
            opt_key = self.optimizer.config_key(graph)
        key = self._key(graph, resident, pins, strat_spec, opt_key, holds, copies)
        if key is not None and releases is not None:
            key = (*key, releases.key(graph))
        if key is not None and self.cache_size:
            with self._lock:
                cached = self._cache.get(key)
                if cached is not None:
                    self._cache.move_to_end(key)
            if cached is not None and self._memory_still_fits(cached, reserved):
                out = cached.bind(graph)
                out.resident = dict(resident)
                out.copies = {s: sorted(ds) for s, ds in copies.items()}
                self._count(hit=True, seconds=time.perf_counter() - t0)
                return out
        if self.optimizer is not None:
            self.optimizer.apply(graph, profile)
        sched = self._build(
            graph, profile, resident, pins, reserved, strat_spec, key, holds, copies, releases
        )
        sched.optimizer_key = opt_key
        if key is not None and self.cache_size:
            with self._lock:
                self._cache[key] = sched
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        self._count(hit=False, seconds=time.perf_counter() - t0, strategy=sched.strategy)
        return sched

    def get_stats(self) -> dict[str, Any]:
        with self._lock:
            s = dict(self._stats)
            s["strategies"] = dict(s["strategies"])
            n = s["schedules_created"] + s["cache_hits"]
            s["mean_time_ms"] = (s["total_time_s"] / n * 1e3) if n else 0.0
            s["cache_entries"] = len(self._cache)
            return s

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()

    def record_execution(self, schedule: ExecutionSchedule, seconds: float) -> None:
        """Tell the adaptive optimizer (if any) how long a schedule took when it ran."""
        rec = getattr(self.optimizer, "record", None)
        if rec is not None:
            rec(schedule, seconds)

    # -- internals ---------------------------------------------------------------------------
    def _count(self, *, hit: bool, seconds: float, strategy: str | None = None) -> None:
        with self._lock:
            st = self._stats
            if hit:
                st["cache_hits"] += 1
            else:
                st["cache_misses"] += 1
                st["schedules_created"] += 1
                st["strategies"][strategy] += 1
            st["total_time_s"] += seconds
            st["last_time_s"] = seconds

    def _key(self, graph, resident, pins, strat_spec, opt_key, holds, copies) -> tuple | None:
        if not isinstance(strat_spec, str):
            strat_name: Any = id(strat_spec)
        else:
            strat_name = strat_spec
        constants = graph.constants
        where = tuple(
            resident.get(s) or ("c" if s in constants else None) for s in graph.input_storages
        )
        meta_pins = tuple(
            (i, n.meta[META_DEVICE])
            for i, n in enumerate(graph.nodes)
            if n.meta and META_DEVICE in n.meta
        )
        user_pins: tuple = ()
        if pins:
            pos = {n.id: i for i, n in enumerate(graph.nodes)}
            user_pins = tuple(sorted((pos[k], v) for k, v in pins.items() if k in pos))
        return (
            graph.structural_hash(),
            self.topology.signature(),
            self.estimator.version,
            tuple(self.devices),
            strat_name,
            where,
            meta_pins,
            user_pins,
            opt_key,
            self.recompute,
            holds,
            tuple(sorted((s, tuple(sorted(ds))) for s, ds in copies.items())),
        )

    def _memory_still_fits(self, sched: ExecutionSchedule, reserved) -> bool:
        if not reserved:
            return True
        for d, peak in sched.peak_memory.items():
            cap = self.topology.spec(d).usable_memory - int(reserved.get(d, 0))
            if peak > cap:
                return False
        return True

    def _build(
        self, graph, profile, resident, pins, reserved, strat_spec, key, holds, copies, releases
    ) -> ExecutionSchedule:
        A = GraphAnalysis.of(graph, refresh=self.optimizer is not None)
        ctx = PlacementContext(
            A,
            self.topology,
            self.estimator,
            self.devices,
            resident=resident,
            copies=copies,
            pins=pins,
            reserved=reserved,
            include_uploads=self.include_uploads,
            holds=holds,
            releases=releases,
        )
        strat = make_strategy(strat_spec)
        notes: list[str] = []
        placement = strat.place(ctx, profile) if ctx.C else []
        placement = ctx.apply_units(ctx.tidy(list(placement)))
        name = getattr(strat, "chosen", None) or strat.name
        if name != strat.name:
            notes.append(f"{strat.name} strategy chose {name}")
        if ctx.kv_pins:
            devs = sorted({ctx.devices[d] for d in ctx.kv_pins.values()})
            notes.append(
                f"KV cache and the {len(ctx.kv_pins)} ops using it stay on {', '.join(devs)}"
            )
        if ctx.C:
            placement, moved = ctx.rebalance(placement)
            notes.extend(moved)
        recompute: dict[int, set[int]] = {}
        if self.recompute and ctx.D > 1 and ctx.C:
            recompute = ctx.recompute_decisions(placement)
            if recompute:
                mem = ctx.memory(placement, recompute)
                over = set(mem.over())
                if over:
                    recompute = {w: {e for e in ds if e not in over} for w, ds in recompute.items()}
                    recompute = {w: ds for w, ds in recompute.items() if ds}
        sim = ctx.simulate(placement, recompute)
        mem = ctx.memory(placement, recompute)
        stage_of = strat.stages(ctx, placement) if ctx.C else None
        if stage_of is None:
            stage_of = A.level
        sched = self._assemble(
            graph, A, ctx, placement, recompute, sim, mem, stage_of, name, notes, resident, key
        )
        sched.micro_batches = getattr(strat, "micro_batches", 0) if ctx.D > 1 else 0
        sched.copies = {s: sorted(ctx.devices[d] for d in ds) for s, ds in ctx.copies.items()}
        if sched.micro_batches:
            notes.append(f"{sched.micro_batches} slices of the batch pipelined as micro-batches")
        return sched

    def _assemble(
        self, graph, A, ctx, placement, recompute, sim, mem, stage_of, name, notes, resident, key
    ) -> ExecutionSchedule:
        devices = ctx.devices
        C = ctx.C
        # Fused chains (genie.fusion_group) run as one: they take their first member's stage.
        stage_of = list(stage_of)
        first_stage: dict[Any, int] = {}
        branch_of: list[Any] = [None] * C
        for ci, n in enumerate(A.cnodes):
            meta = n.meta
            if meta:
                fg = meta.get(META_FUSION_GROUP)
                if fg is not None:
                    stage_of[ci] = first_stage.setdefault(fg, stage_of[ci])
                branch_of[ci] = meta.get(META_PARALLEL)
        # Groups: (stage, device, parallel branch) in order of first appearance.
        gindex: dict[tuple[int, int, Any], int] = {}
        groups: list[Group] = []
        group_of = [0] * C
        for ci in range(C):
            k = (stage_of[ci], placement[ci], branch_of[ci])
            g = gindex.get(k)
            if g is None:
                g = len(groups)
                gindex[k] = g
                groups.append(
                    Group(g, stage_of[ci], devices[placement[ci]], [], float("inf"), 0.0, 0.0)
                )
            group_of[ci] = g
            grp = groups[g]
            grp.node_ids.append(A.cnodes[ci].id)
            s, f = sim.start[ci], sim.finish[ci]
            if s < grp.start:
                grp.start = s
            if f > grp.end:
                grp.end = f
            grp.cost += ctx.dtime[placement[ci]][ci]
        # Views follow their anchors.
        nodes = graph.nodes
        N = len(nodes)
        pos_dev: list[str] = [""] * N
        pos_stage = [0] * N
        pos_group = [0] * N
        for ci, pos in enumerate(A.positions):
            pos_dev[pos] = devices[placement[ci]]
            pos_stage[pos] = stage_of[ci]
            pos_group[pos] = group_of[ci]
        default_dev = devices[placement[0]] if C else devices[0]
        if not groups:
            groups.append(Group(0, 0, default_dev, [], 0.0, 0.0, 0.0))
        for pos, anchor in A.view_anchor.items():
            if anchor >= 0:
                pos_dev[pos] = devices[placement[anchor]]
                pos_stage[pos] = stage_of[anchor]
                pos_group[pos] = group_of[anchor]
            else:
                pos_dev[pos] = default_dev
                pos_stage[pos] = groups[0].stage
                pos_group[pos] = 0
            groups[pos_group[pos]].node_ids.append(nodes[pos].id)
        for g in groups:
            if g.start == float("inf"):
                g.start = 0.0
        nstages = (max(stage_of) + 1) if C else 1
        stages = [Stage(i, []) for i in range(nstages)]
        for g in groups:
            stages[g.stage].groups.append(g)
        for st in stages:
            if st.groups:
                st.start = min(g.start for g in st.groups)
                st.end = max(g.end for g in st.groups)
        stages = [s for s in stages if s.groups]
        if len(stages) != nstages:  # renumber (pipeline stages can leave gaps)
            renum = {s.index: i for i, s in enumerate(stages)}
            for s in stages:
                s.index = renum[s.index]
                for g in s.groups:
                    g.stage = s.index
            pos_stage = [renum.get(x, 0) for x in pos_stage]
        ids = tuple(n.id for n in nodes)
        rec = {A.cnodes[w].id: [devices[e] for e in sorted(ds)] for w, ds in recompute.items()}
        sched = ExecutionSchedule(
            graph_hash=graph.structural_hash(),
            strategy=name,
            devices=list(devices),
            stages=stages,
            groups=groups,
            placement=dict(zip(ids, pos_dev, strict=True)),
            node_to_stage=dict(zip(ids, pos_stage, strict=True)),
            node_to_group=dict(zip(ids, pos_group, strict=True)),
            recompute=rec,
            makespan=sim.makespan,
            peak_memory={d: mem.peak[i] for i, d in enumerate(devices)},
            memory_capacity={d: mem.capacity[i] for i, d in enumerate(devices)},
            device_busy={d: sim.busy[i] for i, d in enumerate(devices)},
            moved_bytes=sim.moved_bytes,
            notes=notes,
            resident=dict(resident),
            key=key or (),
            node_times={A.cnodes[ci].id: (sim.start[ci], sim.finish[ci]) for ci in range(C)},
            topology=self.topology,
            estimator=self.estimator,
            _pos={"device": pos_dev, "stage": pos_stage, "group": pos_group},
            _node_ids=ids,
        )
        return sched
