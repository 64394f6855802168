"""Freeing a flush's dead values while a multi-device plan runs (Note: [Runs]): which storages
the executor may free, the runs a fragment is cut into, and where in the plan each storage is
released on each device.

The recorder names what is dead after a flush (Note: [Dead after the flush] in
csrc/capture/recorder.cpp); the scheduler counts it by liveness (Note: [What a device holds]
in scheduler/memory.py); the MultiDeviceExecutor follows a ReleasePlan.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from genie.graph.ir import Graph, Node
from genie.scheduler.cost_model import is_view
from genie.scheduler.errors import MemoryPlacementError
from genie.scheduler.memory import Releases
from genie.scheduler.plan import ExecutionPlan

__all__ = ["ReleasePlan", "freeable", "schedule_releasing", "split_runs"]

# Note: [Runs]
# A server frees nothing inside a request (Note: [What a device holds]), so a fragment that
# runs as one request holds every value it creates until it ends. That is fine until a graph
# does not fit: then the fragment is cut into runs, several requests, and between two runs
# the executor releases the dead values whose last reader ran. Runs cost a request each, so
# the executor first schedules with no cut (one run per fragment) and cuts finer only while
# the scheduler finds no placement that fits: runs creating at most a half, a quarter...
# of what the graph creates, then one node each; between the first budget that fits and the
# last that did not, a few halvings find a coarser one. The budget that fitted is remembered
# per program, so the next forward schedules once.
_LEVELS = (None, 2, 4, 8, 16, 32, 64, 128, 0)  # k: runs of total/k bytes; 0: a node each
_REFINE = 3  # halvings between the budget that fits and the one that does not


def freeable(graph: Graph, dead: Iterable[int]) -> frozenset[int]:
    """The storages of `dead` this graph creates (its inputs stay where they are)."""
    dead = set(dead)
    if not dead:
        return frozenset()
    inputs = set(graph.input_storages)
    made: set[int] = set()
    for n in graph.nodes:
        made.update(n.fresh)
        made.update(n.writes)
    return frozenset((made & dead) - inputs)


def schedule_releasing(
    scheduler, graph: Graph, profile: Any, free: frozenset[int], hint: int | None, **kwargs
) -> tuple[Any, Releases | None, int | None]:
    """Schedule `graph` with the coarsest runs that fit (Note: [Runs]), trying the budget
    `hint` first: (schedule, releases, budget; None: one run a fragment). Raises the finest
    budget's MemoryPlacementError."""
    if not free:
        return scheduler.create_schedule(graph, profile, **kwargs), None, None

    def attempt(budget: int | None):
        rel = Releases(free) if budget is None else Releases.cut(graph, free, budget)
        try:
            return scheduler.create_schedule(graph, profile, releases=rel, **kwargs), rel
        except MemoryPlacementError as e:
            return e, rel

    if hint is not None:
        got, rel = attempt(hint)
        if not isinstance(got, MemoryPlacementError):
            return got, rel, hint
    total = sum(
        t.storage_nbytes
        for n in graph.nodes
        if not is_view(n)
        for t in n.outputs
        if t.storage in set(n.fresh)
    )
    failed = total  # a budget known not to fit (a single run holds the whole graph)
    for k in _LEVELS:
        budget = None if k is None else total // k if k else 0
        got, rel = attempt(budget)
        if isinstance(got, MemoryPlacementError):
            if budget == 0:
                raise got
            failed = total if budget is None else budget
            continue
        if budget is None:
            return got, rel, None
        lo, hi = budget, failed
        for _ in range(_REFINE):
            mid = (lo + hi) // 2
            if mid <= lo:
                break
            g2, r2 = attempt(mid)
            if isinstance(g2, MemoryPlacementError):
                hi = mid
            else:
                lo, got, rel = mid, g2, r2
        return got, rel, lo
    raise AssertionError("unreachable: the last budget raises or fits")


def split_runs(graph: Graph, nodes: list[Node], releases: Releases | None) -> list[list[Node]]:
    """A fragment's nodes (views left out: they run where they are read) as its runs."""
    nodes = [n for n in nodes if not is_view(n)]
    if releases is None or not releases.cuts or not nodes:
        return [nodes]
    pos = {n.id: i for i, n in enumerate(graph.nodes)}
    runs: list[list[Node]] = []
    current = None
    for n in nodes:
        r = bisect.bisect_right(releases.cuts, pos[n.id])
        if r != current:
            runs.append([])
            current = r
        runs[-1].append(n)
    return runs


@dataclass
class ReleasePlan:
    """Where each freeable storage is released on each device: after the run or the transfer
    that uses it last there (reads it, writes it, or moves it away). When devices run
    concurrently, a release waits for every other user of the storage on that device."""

    after_run: dict[tuple[int, int], list[int]] = field(default_factory=dict)
    after_transfer: dict[int, list[int]] = field(default_factory=dict)
    # Transfers away from a fragment's device that must end before the fragment releases.
    waits: dict[int, list[int]] = field(default_factory=dict)
    # For a transfer that releases: the fragments and other transfers to wait for first.
    transfer_waits: dict[int, tuple[set[int], set[int]]] = field(default_factory=dict)

    @classmethod
    def of(
        cls, plan: ExecutionPlan, runs: dict[int, list[list[Node]]], free: frozenset[int]
    ) -> ReleasePlan:
        out = cls()
        if not free:
            return out
        last: dict[tuple[int, str], tuple] = {}
        moved_from: dict[tuple[int, str], list[tuple[int, int]]] = {}  # -> (step, transfer)
        used_by: dict[tuple[int, str], set[int]] = {}  # -> fragments
        for k, (kind, i) in enumerate(plan.steps):
            if kind == "transfer":
                t = plan.transfers[i]
                if t.storage in free:
                    last[(t.storage, t.src_device)] = ("transfer", i)
                    moved_from.setdefault((t.storage, t.src_device), []).append((k, i))
                continue
            dev = plan.fragments[i].device
            for r, nodes in enumerate(runs[i]):
                for n in nodes:
                    for s in _touched(n):
                        if s in free:
                            last[(s, dev)] = ("run", i, r, k)
                            used_by.setdefault((s, dev), set()).add(i)
        for (s, dev), where in last.items():
            if where[0] == "transfer":
                tid = where[1]
                out.after_transfer.setdefault(tid, []).append(s)
                frags, moves = out.transfer_waits.setdefault(tid, (set(), set()))
                frags.update(used_by.get((s, dev), ()))
                moves.update(t for _, t in moved_from[(s, dev)] if t != tid)
                continue
            _, fid, r, step = where
            out.after_run.setdefault((fid, r), []).append(s)
            for k, tid in moved_from.get((s, dev), ()):
                if k < step:
                    out.waits.setdefault(fid, []).append(tid)
        return out


def _touched(n: Node):
    for t in n.inputs:
        yield t.storage
    for t in n.outputs:
        yield t.storage
    yield from n.writes
    yield from n.fresh
