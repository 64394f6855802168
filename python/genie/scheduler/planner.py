"""The Planner: cuts a placed graph into fragments (connected runs of work on one device)
with explicit transfers between them: an ExecutionPlan (plan.py).

    plan = Planner().generate_plan(graph, profile, schedule)
    plan.validate()
    for kind, i in plan.steps:            # a valid sequential order
        ...                               # run plan.fragments[i] or perform plan.transfers[i]

Note: [Fragments]
Tasks (compute nodes, plus copies of recomputed nodes on the devices that recompute them)
are visited in program order. A task joins the open fragment of its device unless
- one of the fragments it depends on already depends on that fragment (joining would close
  a cycle);
- the open fragment already holds work that reads something (not only allocations) and does
  not yet wait for a fragment the task depends on (joining would hold that work back until
  the other fragment finished: two modality branches joined at a fusion point would run one
  after the other);
- another device reads a value of the open fragment and the task reads nothing of it (that
  fragment's transfer then leaves when its own work is done, not after unrelated later work,
  which is what lets slices of a batch flow through a pipeline as micro-batches: Note:
  [Replicas] in replicas.py).
Then it opens a new fragment, which also follows the previous fragment of its device (a
device runs its fragments in order). Dependencies are read-after-write on versions and
write-after-read (Note: [Versions] in analysis.py), so a transfer always carries the version
its reader expects: a later in-place write of the same storage can never be folded into the
fragment the transfer leaves from.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Any

from genie.graph.ir import Graph
from genie.scheduler.analysis import GraphAnalysis
from genie.scheduler.cost_model import GraphCostEstimator
from genie.scheduler.plan import ExecutionPlan, Fragment, Transfer
from genie.scheduler.schedule import ExecutionSchedule
from genie.scheduler.topology import NetworkTopology

logger = logging.getLogger(__name__)

__all__ = ["Planner", "ExecutionPlan", "Fragment", "Transfer"]


class Planner:
    """Builds ExecutionPlans from schedules; plans are cached by the schedule's key.

    Args:
        overlap_io: transfers run while other fragments compute (executors may run devices
            concurrently); off, a device waits for its transfers.
        micro_batching: estimate the plan as a pipeline over ``num_micro_batches`` slices of
            the batch. Executors cannot slice a recorded batch (Note: [Replicas]): the
            MultiDeviceExecutor refuses such a plan with NotImplementedError. A program that
            slices the batch itself is pipelined for real, and its plan says so
            (``flags["sliced"]``).
    """

    def __init__(
        self,
        cost_estimator: GraphCostEstimator | None = None,
        network_topology: NetworkTopology | None = None,
        *,
        overlap_io: bool = True,
        micro_batching: bool = False,
        num_micro_batches: int = 4,
        cache_size: int = 256,
    ):
        self.estimator = cost_estimator
        self.topology = network_topology
        self.overlap_io = overlap_io
        self.micro_batching = micro_batching
        self.num_micro_batches = max(1, int(num_micro_batches))
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple, ExecutionPlan] = OrderedDict()
        self._lock = threading.Lock()
        self.stats = {"plans_created": 0, "cache_hits": 0}

    def generate_plan(
        self,
        graph: Graph,
        profile: Any = None,
        schedule: ExecutionSchedule | None = None,
        *,
        overlap_io: bool | None = None,
        micro_batching: bool | None = None,
    ) -> ExecutionPlan:
        """Fragments and transfers for `graph` as `schedule` places it (a schedule from a
        default Scheduler when None)."""
        if schedule is None:
            from genie.scheduler.scheduler import Scheduler

            schedule = Scheduler(
                self.estimator or GraphCostEstimator(), self.topology
            ).create_schedule(graph, profile)
        flags = {
            "overlap_io": self.overlap_io if overlap_io is None else bool(overlap_io),
            "micro_batching": self.micro_batching
            if micro_batching is None
            else bool(micro_batching),
            "num_micro_batches": self.num_micro_batches,
        }
        if schedule.micro_batches:
            # The slices are in the graph (Note: [Replicas]): the plan runs them for real.
            flags.update(micro_batching=True, num_micro_batches=schedule.micro_batches, sliced=True)
        key = (schedule.key, tuple(sorted(flags.items()))) if schedule.key else None
        if key is not None and self.cache_size:
            with self._lock:
                cached = self._cache.get(key)
                if cached is not None:
                    self._cache.move_to_end(key)
                    self.stats["cache_hits"] += 1
            if cached is not None:
                return cached.bind(graph, schedule.resident, schedule.copies)
        plan = self._build(graph, schedule, flags)
        if key is not None and self.cache_size:
            with self._lock:
                self._cache[key] = plan
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        with self._lock:
            self.stats["plans_created"] += 1
        return plan

    # -- building ----------------------------------------------------------------------------
    def _build(self, graph: Graph, schedule: ExecutionSchedule, flags: dict) -> ExecutionPlan:
        A = GraphAnalysis.of(graph)
        topo = self.topology or schedule.topology
        devices = list(schedule.devices)
        placement_by_id = schedule.placement
        place = [placement_by_id[n.id] for n in A.cnodes]
        cid = [n.id for n in A.cnodes]
        rec_by_ci: dict[int, list[str]] = {}
        if schedule.recompute:
            pos_of = {n.id: ci for ci, n in enumerate(A.cnodes)}
            for nid, devs in schedule.recompute.items():
                ci = pos_of.get(nid)
                if ci is not None:
                    rec_by_ci[ci] = [d for d in devs if d != place[ci]]
        resident = schedule.resident or {}
        copies = schedule.copies or {}
        # Fragments (Note: [Fragments]).
        frag_of: dict[tuple[int, str], int] = {}
        open_frag: dict[str, int] = {}
        last_on: dict[str, int] = {}
        anc: list[int] = []  # transitive dependencies per fragment (bitmask)
        direct: list[set[int]] = []
        frags: list[Fragment] = []
        leaving: set[int] = set()  # fragments another device reads a value of
        working: set[int] = set()  # fragments with a node that reads something
        estimator = self.estimator or schedule.estimator or GraphCostEstimator()
        times = self._times(A, devices, topo, estimator)

        def new_fragment(dev: str) -> int:
            f = len(frags)
            frags.append(Fragment(f, dev, []))
            anc.append(0)
            direct.append(set())
            prev = last_on.get(dev)
            if prev is not None:
                direct[f].add(prev)
                anc[f] = anc[prev] | (1 << prev)
            open_frag[dev] = f
            last_on[dev] = f
            return f

        def add_deps(f: int, deps: set[int]) -> None:
            new = 0
            for g in deps:
                if g != f:
                    direct[f].add(g)
                    new |= anc[g] | (1 << g)
            added = new & ~anc[f]
            if added:
                anc[f] |= added
                bit = 1 << f
                for h in range(len(frags)):
                    if anc[h] & bit:
                        anc[h] |= added

        def source(w: int, dev: str) -> tuple[int, str]:
            if dev in rec_by_ci.get(w, ()):
                return (w, dev)
            return (w, place[w])

        for ci in range(len(A.cnodes)):
            for k, dev in enumerate([place[ci], *rec_by_ci.get(ci, ())]):
                deps: set[int] = set()
                for _s, w in A.reads[ci]:
                    if w >= 0:
                        deps.add(frag_of[source(w, dev)])
                if k == 0:
                    for p in A.preds[ci]:
                        deps.add(frag_of[(p, place[p])])
                f = open_frag.get(dev)
                # A new fragment when joining would close a cycle, or would make the open
                # fragment's earlier work wait for a fragment it did not wait for (Note:
                # [Fragments]).
                if (
                    f is None
                    or (f in leaving and f not in deps and A.reads[ci])
                    or any(
                        g != f and ((anc[g] >> f) & 1 or (f in working and not (anc[f] >> g) & 1))
                        for g in deps
                    )
                ):
                    f = new_fragment(dev)
                add_deps(f, deps)
                frag_of[(ci, dev)] = f
                fr = frags[f]
                fr.node_ids.append(cid[ci])
                if k:
                    fr.recomputed.append(cid[ci])
                fr.reads.append([(s, cid[w] if w >= 0 else -1) for s, w in A.reads[ci]])
                fr.writes.append(list(A.writes[ci]))
                fr.est_time += times[dev][ci]
                if k == 0 and any(
                    place[r] != dev and place[r] not in rec_by_ci.get(ci, ())
                    for _s, r in A.consumers_of(ci)
                ):
                    leaving.add(f)  # a value leaves this fragment (Note: [Fragments])
                if A.reads[ci]:
                    working.add(f)  # not only allocations
        for pos, anchor in A.view_anchor.items():
            if anchor >= 0:
                frags[frag_of[(anchor, place[anchor])]].view_ids.append(graph.nodes[pos].id)
            elif frags:
                frags[0].view_ids.append(graph.nodes[pos].id)
        # Transfers and uploads.
        transfers: list[Transfer] = []
        moved: dict[tuple[int, int, str], int] = {}
        uploads: dict[str, dict[int, None]] = {d: {} for d in devices}
        inputs: list[dict[int, None]] = [{} for _ in frags]
        outputs: list[dict[int, None]] = [{} for _ in frags]
        sbytes = A.storage_bytes
        for ci in range(len(A.cnodes)):
            for dev in [place[ci], *rec_by_ci.get(ci, ())]:
                f = frag_of[(ci, dev)]
                for s, w in A.reads[ci]:
                    if w >= 0:
                        src_task = source(w, dev)
                        g = frag_of[src_task]
                        if g != f:
                            inputs[f][s] = None
                        if src_task[1] == dev:
                            continue
                        key = (s, w, dev)
                        if key not in moved:
                            moved[key] = len(transfers)
                            nb = sbytes.get(s, 0)
                            transfers.append(
                                Transfer(
                                    len(transfers),
                                    s,
                                    nb,
                                    src_task[1],
                                    dev,
                                    g,
                                    f,
                                    cid[w],
                                    topo.transfer_time(nb, src_task[1], dev) if topo else 0.0,
                                )
                            )
                            outputs[g][s] = None
                        continue
                    inputs[f][s] = None
                    if s in A.constants:
                        uploads[dev][s] = None
                    elif s in resident and resident[s] != dev and dev not in copies.get(s, ()):
                        key = (s, -1, dev)
                        if key not in moved:
                            moved[key] = len(transfers)
                            nb = sbytes.get(s, 0)
                            transfers.append(
                                Transfer(
                                    len(transfers),
                                    s,
                                    nb,
                                    resident[s],
                                    dev,
                                    None,
                                    f,
                                    -1,
                                    topo.transfer_time(nb, resident[s], dev) if topo else 0.0,
                                )
                            )
        homes: dict[int, str] = {}
        for s, w in A.last_writer.items():
            homes[s] = place[w]
            outputs[frag_of[(w, place[w])]][s] = None
        for f, fr in enumerate(frags):
            fr.deps = sorted(direct[f])
            fr.inputs = list(inputs[f])
            fr.outputs = list(outputs[f])
        steps = self._steps(frags, transfers)
        est = self._estimate(frags, transfers, steps, flags, devices)
        srefs = self._storage_refs(graph, transfers, uploads, homes, frags, {**resident, **copies})
        return ExecutionPlan(
            graph_hash=schedule.graph_hash,
            devices=devices,
            fragments=frags,
            transfers=transfers,
            uploads={d: list(v) for d, v in uploads.items() if v},
            steps=steps,
            homes=homes,
            flags=flags,
            estimated_time=est,
            strategy=schedule.strategy,
            resident=dict(resident),
            copies=dict(copies),
            constants=frozenset(A.constants),
            upload_bytes={d: sum(sbytes.get(s, 0) for s in v) for d, v in uploads.items() if v},
            _srefs=srefs,
            _node_ids=tuple(n.id for n in graph.nodes),
        )

    def _times(
        self, A: GraphAnalysis, devices: list[str], topo, estimator
    ) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {}
        by_spec: dict[tuple, list[float]] = {}
        for d in devices:
            if topo is None or d not in topo.devices:
                out[d] = [0.0] * len(A.cnodes)
                continue
            spec = topo.spec(d)
            key = spec.signature()
            if key not in by_spec:
                by_spec[key] = [estimator.time(c, spec) for c in A.costs]
            out[d] = by_spec[key]
        return out

    @staticmethod
    def _steps(frags: list[Fragment], transfers: list[Transfer]) -> list[tuple[str, int]]:
        """Fragments in a topological order (earliest created first), each preceded by the
        transfers it is the first to need."""
        import heapq

        n = len(frags)
        indeg = [len(f.deps) for f in frags]
        succ: list[list[int]] = [[] for _ in range(n)]
        for f in frags:
            for d in f.deps:
                succ[d].append(f.id)
        into: dict[int, list[int]] = {}
        for t in transfers:
            into.setdefault(t.dst_fragment, []).append(t.id)
        heap = [i for i in range(n) if indeg[i] == 0]
        heapq.heapify(heap)
        steps: list[tuple[str, int]] = []
        while heap:
            i = heapq.heappop(heap)
            for t in into.get(i, ()):
                steps.append(("transfer", t))
            steps.append(("fragment", i))
            for j in succ[i]:
                indeg[j] -= 1
                if indeg[j] == 0:
                    heapq.heappush(heap, j)
        return steps

    @staticmethod
    def _estimate(frags, transfers, steps, flags, devices) -> float:
        finish: dict[int, float] = {}
        free = dict.fromkeys(devices, 0.0)
        arrive: dict[int, float] = {}
        into: dict[int, list[Transfer]] = {}
        for t in transfers:
            into.setdefault(t.dst_fragment, []).append(t)
        busy = dict.fromkeys(devices, 0.0)
        for kind, i in steps:
            if kind != "fragment":
                continue
            f = frags[i]
            ready = max((finish[d] for d in f.deps), default=0.0)
            st = max(ready, free.get(f.device, 0.0))
            for t in into.get(i, ()):
                src_done = finish.get(t.src_fragment, 0.0) if t.src_fragment is not None else 0.0
                arrive[t.id] = src_done + t.est_time
                if flags.get("overlap_io", True):
                    st = max(st, arrive[t.id])
                else:
                    st = max(st, src_done) + t.est_time
            finish[i] = st + f.est_time
            free[f.device] = finish[i]
            busy[f.device] = busy.get(f.device, 0.0) + f.est_time
        total = max(finish.values(), default=0.0)
        # Slices in the graph are simulated above; otherwise micro-batching is estimated.
        if (
            flags.get("micro_batching")
            and not flags.get("sliced")
            and len({f.device for f in frags}) > 1
        ):
            m = max(1, int(flags.get("num_micro_batches", 1)))
            total = total / m + (m - 1) / m * max(busy.values(), default=0.0)
        return total

    @staticmethod
    def _storage_refs(
        graph, transfers, uploads, homes, frags, resident
    ) -> dict[int, tuple[int, int, int]]:
        """A position-based reference for every storage the plan names (for bind())."""
        wanted: set[int] = {t.storage for t in transfers}
        for v in uploads.values():
            wanted.update(v)
        wanted.update(homes)
        wanted.update(resident)
        wanted.update(graph.constants)
        for f in frags:
            wanted.update(f.inputs)
            wanted.update(f.outputs)
            for r in f.reads:
                wanted.update(s for s, _ in r)
        refs: dict[int, tuple[int, int, int]] = {}
        for pos, n in enumerate(graph.nodes):
            for i, t in enumerate(n.inputs):
                if t.storage in wanted and t.storage not in refs:
                    refs[t.storage] = (pos, 0, i)
            for i, t in enumerate(n.outputs):
                if t.storage in wanted and t.storage not in refs:
                    refs[t.storage] = (pos, 1, i)
        return refs
