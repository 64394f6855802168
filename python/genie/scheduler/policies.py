"""Scheduling strategies: small policy classes behind one interface.

A strategy turns a PlacementContext into a placement (compute index -> device index) and may
say how compute nodes form stages; everything else (constraints, memory, recomputation,
stages by level, groups, estimates) is the Scheduler's, the same for every strategy.

=============  ==========================================================================
sequential     everything on the one device that finishes first (pins still apply)
parallel       modality branches on separate devices, the fusion point where the least has
               to move; without branches, list scheduling level by level
pipeline       contiguous stages over N devices with the bottleneck stage minimised; a
               program run over slices of a batch (replicas) is cut at the same points in
               every slice, so the slices pass through the stages as micro-batches
data           data parallel: each replica (slice of the batch) on its own device, weights
               on each; a graph without replicas cannot be split (NotImplementedError)
priority       list scheduling by upward rank (HEFT): critical path first, earliest finish
dynamic        every applicable strategy, estimated, the fastest kept (measured feedback
               enters through the estimator's calibration)
auto           semantic rules: decode with a resident KV cache -> sequential; modality
               branches -> parallel; otherwise dynamic
=============  ==========================================================================
"""

from __future__ import annotations

import heapq
import logging
from typing import Protocol

from genie.scheduler.analysis import META_PHASE
from genie.scheduler.placement import META_EARLY, META_PRIORITY, PlacementContext
from genie.scheduler.replicas import find_replicas

logger = logging.getLogger(__name__)

__all__ = [
    "Strategy",
    "SequentialStrategy",
    "ParallelStrategy",
    "PipelineStrategy",
    "DataParallelStrategy",
    "PriorityStrategy",
    "DynamicStrategy",
    "AutoStrategy",
    "STRATEGIES",
    "make_strategy",
]


class Strategy(Protocol):
    """What the Scheduler asks of a policy."""

    name: str

    def place(self, ctx: PlacementContext, profile=None) -> list[int]:
        """A device index per compute node."""

    def stages(self, ctx: PlacementContext, placement: list[int]) -> list[int] | None:
        """A stage index per compute node, or None for stages by dependency level."""


class _Base:
    name = "base"

    def stages(self, ctx: PlacementContext, placement: list[int]) -> list[int] | None:
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class SequentialStrategy(_Base):
    """All work on one device: the one whose simulated finish is earliest."""

    name = "sequential"

    def place(self, ctx: PlacementContext, profile=None) -> list[int]:
        best, best_t = None, float("inf")
        for d in ctx.device_classes():
            p = ctx.single(d)
            t = ctx.simulate(p).makespan if ctx.D > 1 else 0.0
            if t < best_t:
                best, best_t = p, t
        return best if best is not None else ctx.single(0)


def list_schedule(ctx: PlacementContext, priority: list[float]) -> list[int]:
    """Greedy list scheduling: ready nodes in priority order, each on the device where it
    finishes earliest (counting transfers of its inputs); units and pins respected."""
    A = ctx.A
    C, D = ctx.C, ctx.D
    placement = [-1] * C
    finish = [0.0] * C
    free = list(ctx.queue)
    unit_dev: dict[int, int] = dict(ctx.pin)
    indeg = [len(p) for p in A.preds]
    heap = [(-priority[ci], ci) for ci in range(C) if indeg[ci] == 0]
    heapq.heapify(heap)
    sbytes = A.storage_bytes
    arrival_in: dict[tuple[int, int], float] = {}
    dtime = ctx.dtime
    constants = A.constants
    upclock = 0.0  # Note: [Uploads] in placement.py
    while heap:
        _, ci = heapq.heappop(heap)
        u = ctx.unit_of[ci]
        fixed = unit_dev.get(u)
        cands = (fixed,) if fixed is not None else range(D)
        best_d, best_f = 0, float("inf")
        for d in cands:
            ready = 0.0
            for s, w in A.reads[ci]:
                if w >= 0:
                    src = placement[w]
                    t = finish[w] if src == d else finish[w] + ctx.xfer(sbytes.get(s, 0), src, d)
                else:
                    t = arrival_in.get((s, d))
                    if t is None:
                        if s in constants and s not in ctx.resident and ctx.include_uploads:
                            t = (
                                upclock
                                + ctx._upload[d].latency
                                + sbytes.get(s, 0) * ctx._upload_spb[d]
                            )
                        else:
                            t = ctx.input_arrival(s, d)
                if t > ready:
                    ready = t
            st = ready if ready > free[d] else free[d]
            f = st + dtime[d][ci]
            if f < best_f:
                best_d, best_f = d, f
        for s, w in A.reads[ci]:
            if w < 0 and (s, best_d) not in arrival_in:
                if s in constants and s not in ctx.resident and ctx.include_uploads:
                    service = sbytes.get(s, 0) * ctx._upload_spb[best_d]
                    arrival_in[(s, best_d)] = upclock + ctx._upload[best_d].latency + service
                    upclock += service
                else:
                    arrival_in[(s, best_d)] = ctx.input_arrival(s, best_d)
        placement[ci] = best_d
        unit_dev.setdefault(u, best_d)
        finish[ci] = best_f
        free[best_d] = best_f
        for s in A.succs[ci]:
            indeg[s] -= 1
            if indeg[s] == 0:
                heapq.heappush(heap, (-priority[s], s))
    return ctx.apply_units(placement)


def upward_rank(ctx: PlacementContext) -> list[float]:
    """HEFT's rank: a node's time plus the longest path (times + average transfers) after it."""
    A = ctx.A
    rank = [0.0] * ctx.C
    sbytes = A.storage_bytes
    avg_xfer = _average_link(ctx)
    for ci in range(ctx.C - 1, -1, -1):
        best = 0.0
        for s, r in A.consumers_of(ci):
            v = rank[r] + (sbytes.get(s, 0) * avg_xfer if ctx.D > 1 else 0.0)
            if v > best:
                best = v
        for r in A.succs[ci]:
            if rank[r] > best:
                best = rank[r]
        boost = 0.0
        meta = A.cnodes[ci].meta
        if meta:
            boost = float(meta.get(META_PRIORITY, 0.0)) + (1.0 if meta.get(META_EARLY) else 0.0)
        rank[ci] = ctx.avg_time[ci] + best + boost
    return rank


def _average_link(ctx: PlacementContext) -> float:
    """Average seconds per byte between distinct devices."""
    if ctx.D < 2:
        return 0.0
    total, n = 0.0, 0
    for a in range(ctx.D):
        for b in range(ctx.D):
            if a != b:
                total += 1.0 / ctx._paths[a][b].bandwidth
                n += 1
    return total / n


class PriorityStrategy(_Base):
    """List scheduling by upward rank (HEFT); ``genie.priority`` / ``genie.early`` hints in
    node.meta raise a node's rank."""

    name = "priority"

    def place(self, ctx: PlacementContext, profile=None) -> list[int]:
        if ctx.D == 1:
            return ctx.single(0)
        return list_schedule(ctx, upward_rank(ctx))


class ParallelStrategy(_Base):
    """Parallel branches (modalities) on separate devices, joined where the least data has to
    move; without branches, list scheduling breadth first (one dependency level at a time)."""

    name = "parallel"

    def place(self, ctx: PlacementContext, profile=None) -> list[int]:
        if ctx.D == 1:
            return ctx.single(0)
        br = ctx.A.branches()
        if br is None:
            return list_schedule(ctx, [-float(lv) for lv in ctx.A.level])
        return self._branch_placement(ctx, br)

    @staticmethod
    def _branch_placement(ctx: PlacementContext, br) -> list[int]:
        A = ctx.A
        C, D = ctx.C, ctx.D
        speed = [sum(ctx.dtime[d]) for d in range(D)]  # lower is faster
        order = sorted(range(D), key=lambda d: speed[d])
        placement = [-1] * C
        # Longest processing time first: each branch to the device with the least work.
        load = [0.0] * D
        branch_dev: list[int] = [0] * len(br.sets)
        for k in sorted(
            range(len(br.sets)), key=lambda k: -sum(ctx.avg_time[i] for i in br.sets[k])
        ):
            pinned = {ctx.pinned(ci) for ci in br.sets[k]} - {-1}
            if pinned:
                d = min(pinned)
            else:
                d = min(order, key=lambda d: (load[d], order.index(d)))
            branch_dev[k] = d
            load[d] += sum(ctx.dtime[d][i] for i in br.sets[k])
            for ci in br.sets[k]:
                placement[ci] = d
        big = branch_dev[max(range(len(br.sets)), key=lambda k: len(br.sets[k]))]
        for ci in br.shared:
            placement[ci] = big
        # Fusion point and everything after it: the device that needs the fewest bytes moved.
        down = set(br.downstream)
        best_f, best_cost = order[0], float("inf")
        for f in range(D):
            cost = sum(ctx.dtime[f][ci] for ci in br.downstream)
            moved: set[tuple[int, int]] = set()
            for ci in br.downstream:
                for s, w in A.reads[ci]:
                    if w >= 0 and w not in down and placement[w] >= 0 and placement[w] != f:
                        if (s, w) not in moved:
                            moved.add((s, w))
                            cost += ctx.xfer(A.storage_bytes.get(s, 0), placement[w], f)
            if cost < best_cost:
                best_f, best_cost = f, cost
        for ci in range(C):
            if placement[ci] < 0:
                placement[ci] = best_f
        return ctx.apply_units(placement)


class PipelineStrategy(_Base):
    """Contiguous stages in program order over up to `num_stages` devices (default: all),
    cut so that the most expensive stage is as cheap as possible (binary search on the
    bottleneck with a greedy fill, which is optimal for contiguous partitions). Hence the
    bottleneck is at most total/N + the most expensive single node for identical devices."""

    name = "pipeline"

    def __init__(self, num_stages: int | None = None):
        self.num_stages = num_stages

    def place(self, ctx: PlacementContext, profile=None) -> list[int]:
        S = min(self.num_stages or ctx.D, ctx.D)
        self.micro_batches = 0
        if S <= 1 or ctx.C == 0:
            return ctx.single(0)
        reps = find_replicas(ctx.A)
        if reps is None:
            placement = ctx.apply_units(self._cut(ctx, list(range(ctx.C)), S))
            if ctx.memory(placement).over():  # memory first: stages as long as they fit
                placement = ctx.fill_by_memory(S) or placement
            return placement
        # Micro-batches (Note: [Replicas]): every slice cut where the first one is, so that
        # a stage takes slice i+1 while the next stage works on slice i; the join goes last.
        cut = self._cut(ctx, reps.sets[0], S)
        placement = [cut[-1]] * ctx.C
        for members in reps.sets:
            for j, ci in enumerate(members):
                placement[ci] = cut[j]
        self.micro_batches = reps.count
        return ctx.apply_units(placement)

    @staticmethod
    def _cut(ctx: PlacementContext, members: list[int], S: int) -> list[int]:
        """A stage (device index) per member, contiguous, the bottleneck minimised."""
        times = [[ctx.dtime[d][ci] for ci in members] for d in range(S)]
        n = len(members)
        lo = max(min(times[k][i] for k in range(S)) for i in range(n))
        hi = max(sum(t) for t in times)

        def fill(limit: float) -> list[int] | None:
            seg = [0] * n
            k, acc = 0, 0.0
            for i in range(n):
                t = times[k][i]
                if acc > 0 and acc + t > limit:
                    k += 1
                    if k >= S:
                        return None
                    acc = 0.0
                    t = times[k][i]
                acc += t
                seg[i] = k
            return seg

        best = fill(hi)
        for _ in range(60):
            if hi - lo <= 1e-4 * hi:
                break
            mid = (lo + hi) / 2
            seg = fill(mid)
            if seg is None:
                lo = mid
            else:
                hi, best = mid, seg
        assert best is not None
        return best

    def stages(self, ctx: PlacementContext, placement: list[int]) -> list[int] | None:
        # A stage per contiguous run of one device (units or pins may interleave a little).
        out = [0] * ctx.C
        k = 0
        for ci in range(ctx.C):
            if ci and placement[ci] != placement[ci - 1]:
                k += 1
            out[ci] = k
        return out


class DataParallelStrategy(_Base):
    """Data parallel: the replicas of a program run over slices of a batch (Note: [Replicas])
    spread over the devices, each device a contiguous share of them, the join with the first
    share. Each device then holds the weights its replicas read."""

    name = "data"

    def place(self, ctx: PlacementContext, profile=None) -> list[int]:
        if ctx.D == 1:
            return ctx.single(0)
        reps = find_replicas(ctx.A)
        if reps is None:
            raise NotImplementedError(
                "genie: data parallel needs the batch split in the program: the recorded "
                "graph fixes the batch size in every shape, so genie cannot slice one forward; "
                "run the model once per slice (torch.chunk) and join the results (torch.cat) "
                "in one flush"
            )
        k = reps.count
        placement = [0] * ctx.C
        for i, members in enumerate(reps.sets):
            for ci in members:
                placement[ci] = i * ctx.D // k
        return ctx.apply_units(placement)


class DynamicStrategy(_Base):
    """Try every applicable strategy and keep the one with the earliest estimated finish
    among those whose memory fits (estimates use the estimator's calibrated times); a
    candidate within `tolerance` of the fastest that moves fewer bytes (then uses fewer
    devices) wins, so work is split only where splitting clearly pays."""

    name = "dynamic"

    def __init__(self, candidates: list | None = None, tolerance: float = 0.05):
        self.candidates = candidates
        self.tolerance = tolerance
        self.chosen: str | None = None

    def place(self, ctx: PlacementContext, profile=None) -> list[int]:
        if ctx.D == 1:
            self.chosen = "sequential"
            return ctx.single(0)
        cands = self.candidates or [SequentialStrategy(), PriorityStrategy()]
        if self.candidates is None:
            if ctx.A.branches() is not None:
                cands.append(ParallelStrategy())
            # A CNN, or a graph one device cannot hold: layers split in program order move
            # one activation per cut, where list scheduling may bounce between devices.
            if ctx.A.conv_share() > 0.5 or _overflows_one_device(ctx):
                cands.append(PipelineStrategy())
        results = []
        for strat in cands:
            p = strat.place(ctx, profile)
            mem = ctx.memory(p)
            over = sum(max(0, a - b) for a, b in zip(mem.peak, mem.capacity, strict=False))
            sim = ctx.simulate(p)
            results.append((over, sim.makespan, sim.moved_bytes, len(set(p)), strat.name, p))
            logger.debug(
                "genie: dynamic: %s -> makespan %.3g s, memory over by %d B",
                strat.name,
                sim.makespan,
                over,
            )
        least_over = min(r[0] for r in results)
        fits = [r for r in results if r[0] == least_over]
        fastest = min(r[1] for r in fits)
        # Within `tolerance` of the fastest, move less and use fewer devices.
        close = [r for r in fits if r[1] <= fastest * (1.0 + self.tolerance)]
        best = min(close, key=lambda r: (r[2], r[3], r[1]))
        self.chosen = best[4]
        return best[5]


def _overflows_one_device(ctx: PlacementContext) -> bool:
    """The whole graph on the first device would not fit its memory (a sweep only when every
    storage of the graph together would not fit)."""
    if sum(ctx.A.storage_bytes.values()) <= ctx.capacity[0]:
        return False
    return bool(ctx.memory(ctx.single(0)).over())


class AutoStrategy(_Base):
    """Semantic rules first (the workload profile, node annotations, the graph's shape),
    then cost: see the module docstring."""

    name = "auto"

    def __init__(self):
        self.chosen: str | None = None

    def select(self, ctx: PlacementContext, profile=None) -> _Base:
        kind = _workload(profile)
        decode = (
            "decode" in kind
            or bool(ctx.kv_pins)
            or ctx.A.has_resident_kv()
            or any(n.meta.get(META_PHASE) == "decode" for n in ctx.A.cnodes[:64])
        )
        if decode:
            return SequentialStrategy()
        if ctx.D > 1 and (
            any(k in kind for k in ("multimodal", "vqa", "fusion")) or ctx.A.branches() is not None
        ):
            return ParallelStrategy()
        return DynamicStrategy()

    def place(self, ctx: PlacementContext, profile=None) -> list[int]:
        strat = self.select(ctx, profile)
        p = strat.place(ctx, profile)
        self.chosen = getattr(strat, "chosen", None) or strat.name
        self._inner = strat
        return p

    def stages(self, ctx, placement):
        inner = getattr(self, "_inner", None)
        return inner.stages(ctx, placement) if inner is not None else None


def _workload(profile) -> str:
    if profile is None:
        return ""
    wt = getattr(profile, "workload_type", profile if isinstance(profile, str) else "")
    wt = getattr(wt, "value", wt)
    text = str(wt).lower() + " " + str(getattr(profile, "call_phase", "") or "").lower()
    phases = getattr(profile, "phases", None)
    if phases:
        names = phases if isinstance(phases, (list, tuple, set)) else list(phases)
        text += " " + " ".join(str(getattr(p, "value", p)).lower() for p in names)
    return text


STRATEGIES = {
    "sequential": SequentialStrategy,
    "parallel": ParallelStrategy,
    "pipeline": PipelineStrategy,
    "data": DataParallelStrategy,
    "priority": PriorityStrategy,
    "dynamic": DynamicStrategy,
    "auto": AutoStrategy,
}


def make_strategy(strategy) -> _Base:
    """A strategy instance from a name or an instance."""
    if isinstance(strategy, str):
        try:
            return STRATEGIES[strategy]()
        except KeyError:
            raise ValueError(
                f"genie: unknown strategy {strategy!r}; known: {sorted(STRATEGIES)}"
            ) from None
    if not hasattr(strategy, "place"):
        raise TypeError(f"genie: {strategy!r} is not a strategy (it has no place())")
    return strategy
