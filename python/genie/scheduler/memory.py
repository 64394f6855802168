"""The memory side of placement: how long a device keeps a value (Note: [What a device
holds], Releases), the liveness sweep that gives each device's peak, moving work off devices
that overflow, and the error that names what does not fit.

PlacementContext (placement.py) takes these methods from MemoryMixin; they read its
analysis, devices, capacities, co-location units and pins.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from genie.scheduler.errors import MemoryPlacementError

logger = logging.getLogger(__name__)

__all__ = ["HOLDS", "MemoryMixin", "MemoryReport", "Releases", "format_bytes"]


# Note: [What a device holds]
# The memory sweep must count what the executor really keeps, or a plan that "fits" fails on
# a server started with --memory-limit. Who knows what:
# - The recorder (C++) alone knows which storages a live tensor still holds. It releases the
#   others after a flush, and names them to the executor before it (`dead`, Note: [Dead after
#   the flush] in csrc/capture/recorder.cpp).
# - A server session, like the in-process Environment, keeps every storage a request creates
#   until the client releases it, and checks its memory limit against all that a request
#   creates before running it: a value can be freed between two requests, never inside one.
# - The MultiDeviceExecutor knows the plan: which fragment, run or transfer reads a storage
#   last on each device. It releases a dead storage there right after that (before the next
#   request to that device); it cuts a fragment into several runs (requests) only when the
#   graph does not fit otherwise (Note: [Runs] in runtime/releases.py).
# So the sweep has two models:
# - "last_use": a value lives from its first write (or arrival) on a device to its last use
#   there. Right for an executor that frees each intermediate after its last reader.
# - "flush": a value lives from its first write (or arrival) on a device to the end of the
#   graph; with `Releases`, a dead one only to the end of the run of its last use there.
#   The MultiDeviceExecutor schedules with "flush" and its Releases.
HOLDS = ("last_use", "flush")


@dataclass(frozen=True)
class Releases:
    """What an executor frees before the graph ends (Note: [What a device holds]): each
    storage of `dead` once the run that uses it last on a device ended. A run is a stretch
    of the graph in program order that a device executes as one request; `cuts` are the
    positions (in ``graph.nodes``, never a view) where a new run begins. No cuts: one run."""

    dead: frozenset[int]
    cuts: tuple[int, ...] = ()

    @classmethod
    def cut(cls, graph, dead, budget: int) -> Releases:
        """Runs that each create at most `budget` bytes (one node when it alone creates more)."""
        from genie.scheduler.cost_model import is_view

        cuts: list[int] = []
        acc = 0
        for pos, n in enumerate(graph.nodes):
            if is_view(n):
                continue
            fresh = set(n.fresh)
            nb = sum(t.storage_nbytes for t in n.outputs if t.storage in fresh)
            if acc and acc + nb > budget:
                cuts.append(pos)
                acc = 0
            acc += nb
        return cls(frozenset(dead), tuple(cuts))

    def key(self, graph) -> tuple:
        """The same for the same program recorded again (storages by first appearance)."""
        order: dict[int, int] = {}
        for n in graph.nodes:
            for t in (*n.inputs, *n.outputs):
                order.setdefault(t.storage, len(order))
        return tuple(sorted(order[s] for s in self.dead if s in order)), self.cuts

    def run_ends(self, positions: list[int]) -> list[int]:
        """For each compute node (its position in graph.nodes), the last compute index of
        its run."""
        ends = [0] * len(positions)
        cuts = set(self.cuts)
        start = 0
        for ci in range(1, len(positions) + 1):
            if ci == len(positions) or positions[ci] in cuts:
                for k in range(start, ci):
                    ends[k] = ci - 1
                start = ci
        return ends


@dataclass
class MemoryReport:
    peak: list[int]  # per device
    peak_at: list[int]  # compute index where each device peaks (-1: nothing there)
    capacity: list[int]

    def over(self) -> list[int]:
        return [d for d, (p, c) in enumerate(zip(self.peak, self.capacity, strict=False)) if p > c]


class MemoryMixin:
    """Memory queries and rebalancing of a PlacementContext."""

    def memory(
        self, placement: list[int], recompute: dict[int, set[int]] | None = None
    ) -> MemoryReport:
        """Peak bytes per device by a liveness sweep in program order: a storage lives on a
        device from its first write or arrival there to its last use there (on the device
        that produced it: to its last use anywhere, since transfers read it), or to the end
        when the context's ``holds`` is "flush" (a dead value of its ``releases``: to the end
        of the run of its last use; Note: [What a device holds]); graph inputs
        live through the whole graph on every device that reads them; values nobody reads
        afterwards (results) live to the end."""
        intervals = self._intervals(placement, recompute)
        C = self.C
        delta = [[0] * (C + 1) for _ in range(self.D)]
        sbytes = self.A.storage_bytes
        for (s, d), (a, b) in intervals.items():
            nb = sbytes.get(s, 0)
            if nb:
                row = delta[d]
                row[a] += nb
                row[b + 1] -= nb
        peak = [0] * self.D
        peak_at = [-1] * self.D
        for d in range(self.D):
            cur = 0
            best = 0
            at = -1
            for i, x in enumerate(delta[d]):
                cur += x
                if cur > best:
                    best, at = cur, i
            peak[d], peak_at[d] = best, at
        return MemoryReport(peak, peak_at, list(self.capacity))

    def _intervals(self, placement, recompute) -> dict[tuple[int, int], list[int]]:
        A = self.A
        last = self.C - 1
        iv: dict[tuple[int, int], list[int]] = {}

        def touch(s: int, d: int, i: int) -> None:
            cur = iv.get((s, d))
            if cur is None:
                iv[(s, d)] = [i, i]
            elif i > cur[1]:
                cur[1] = i
            elif i < cur[0]:
                cur[0] = i

        # Note: [What a device holds]: under "flush" every value stays to the graph's end, a
        # dead one (with Releases) to the end of the run of its last use on that device.
        end = last if self.holds == "flush" else None
        rel = self.releases if end is not None else None
        dead = rel.dead if rel is not None else frozenset()
        run_end = self._run_ends() if dead else None
        for ci in range(self.C):
            d = placement[ci]
            devs = (d,) if not recompute or ci not in recompute else (d, *recompute[ci])
            for dev in devs:
                for s, w in A.reads[ci]:
                    if w < 0:
                        iv[(s, dev)] = [0, last]
                        r = self.resident.get(s)
                        if r is not None:
                            iv[(s, r)] = [0, last]
                    else:
                        touch(s, dev, ci)
                        touch(s, placement[w], ci)
                        if end is not None:
                            touch(s, dev, run_end[ci] if s in dead else end)
                for s in A.writes[ci]:
                    touch(s, dev, ci)
                    if end is not None:
                        touch(s, dev, run_end[ci] if s in dead else end)
        for s, w in A.last_writer.items():
            if not A.readers.get((s, w)):
                touch(s, placement[w], last)
        for s, ds in self.copies.items():  # kept where they are, read or not
            for d in ds:
                iv[(s, d)] = [0, last]
        return iv

    def _run_ends(self) -> list[int]:
        ends = getattr(self, "_run_end_cache", None)
        if ends is None:
            ends = self._run_end_cache = self.releases.run_ends(self.A.positions)
        return ends

    def live_at(
        self, placement, d: int, at: int, recompute=None, top: int = 5
    ) -> list[tuple[int, int, str]]:
        """The largest storages live on device d at compute index `at`: (storage, bytes, what)."""
        A = self.A
        out = []
        for (s, dev), (a, b) in self._intervals(placement, recompute).items():
            if dev == d and a <= at <= b:
                w = A.last_writer.get(s)
                if s in A.constants or w is None:
                    what = (
                        "weight/input" if s in A.constants or A.is_weight(s) else "resident input"
                    )
                else:
                    n = A.cnodes[A.versions[s][0]]
                    what = f"output of node {n.id} ({n.op})"
                out.append((s, A.storage_bytes.get(s, 0), what))
        out.sort(key=lambda x: -x[1])
        return out[:top]

    def rebalance(
        self, placement: list[int], max_rounds: int | None = None
    ) -> tuple[list[int], list[str]]:
        """Move units off devices whose peak exceeds capacity: the smallest suffix (in program
        order) of an overloaded device's movable units goes to the device with the most room.
        Raises MemoryPlacementError naming what does not fit when no move helps."""
        notes: list[str] = []
        rounds = max_rounds or 4 * self.D + 4
        rep = self.memory(placement)
        tried: set[tuple[int, int, int]] = set()
        for _ in range(rounds):
            over = rep.over()
            if not over:
                return placement, notes
            d = max(over, key=lambda x: rep.peak[x] - rep.capacity[x])
            movable = [
                r for r, mem in self.units.items() if placement[mem[0]] == d and r not in self.pin
            ]
            movable.sort(key=lambda r: self.units[r][0])
            targets = sorted(
                (e for e in range(self.D) if e != d), key=lambda e: rep.peak[e] - rep.capacity[e]
            )
            moved = False
            for e in targets:
                if (d, e, len(movable)) in tried or not movable:
                    continue
                tried.add((d, e, len(movable)))
                k = self._smallest_suffix(placement, movable, d, e)
                if k is None:
                    continue
                trial = list(placement)
                for r in movable[len(movable) - k :]:
                    for ci in self.units[r]:
                        trial[ci] = e
                new = self.memory(trial)
                if new.peak[d] <= new.capacity[d]:
                    notes.append(
                        f"memory: moved {k} unit(s) from {self.devices[d]} to {self.devices[e]} "
                        f"(peak {rep.peak[d]} > capacity {rep.capacity[d]} bytes)"
                    )
                    placement, rep, moved = trial, new, True
                    break
            if not moved:
                break
        if rep.over():
            raise self._memory_error(placement, rep)
        return placement, notes

    def fill_by_memory(self, stages: int) -> list[int] | None:
        """Contiguous stages in program order on devices 0..stages-1, each stage as long as
        its device can hold (a binary search per stage), the last one taking the rest; None
        when even that overflows. For a graph whose time-balanced cut does not fit: one
        activation crosses each cut, where rebalancing by suffixes may bounce between
        devices."""
        C = self.C
        placement = [stages - 1] * C
        start = 0
        for k in range(stages - 1):
            if start >= C:
                break

            def fits(end: int, k: int = k, start: int = start) -> bool:
                trial = placement[:start] + [k] * (end - start) + [k + 1] * (C - end)
                rep = self.memory(self.apply_units(trial))
                return rep.peak[k] <= rep.capacity[k]

            if not fits(start + 1):
                return None
            lo, hi = start + 1, C
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if fits(mid):
                    lo = mid
                else:
                    hi = mid - 1
            placement[start:lo] = [k] * (lo - start)
            start = lo
        placement = self.apply_units(placement)
        return None if self.memory(placement).over() else placement

    def _smallest_suffix(self, placement, movable, d, e) -> int | None:
        """Smallest k such that moving the last k movable units of d to e makes d fit."""

        def fits(k: int) -> bool:
            trial = list(placement)
            for r in movable[len(movable) - k :]:
                for ci in self.units[r]:
                    trial[ci] = e
            rep = self.memory(trial)
            return rep.peak[d] <= rep.capacity[d]

        lo, hi = 1, len(movable)
        if not fits(hi):
            return None
        while lo < hi:
            mid = (lo + hi) // 2
            if fits(mid):
                hi = mid
            else:
                lo = mid + 1
        return lo

    def _memory_error(self, placement, rep: MemoryReport) -> MemoryPlacementError:
        details = []
        lines = []
        for d in rep.over():
            at = rep.peak_at[d]
            live = self.live_at(placement, d, at)
            node = self.A.cnodes[min(at, self.C - 1)] if self.C else None
            details.append(
                {
                    "device": self.devices[d],
                    "peak_bytes": rep.peak[d],
                    "capacity_bytes": rep.capacity[d],
                    "at_node": node.id if node else None,
                    "live": [{"storage": s, "bytes": b, "what": w} for s, b, w in live],
                }
            )
            tops = "; ".join(f"s{s} {format_bytes(b)} ({w})" for s, b, w in live)
            lines.append(
                f"{self.devices[d]} needs {format_bytes(rep.peak[d])} at node "
                f"{node.id if node else '?'} ({node.op if node else '?'}) but has "
                f"{format_bytes(rep.capacity[d])}; largest live: {tops}"
            )
        total = sum(self.A.storage_bytes.get(s, 0) for s in self.A.inputs)
        return MemoryPlacementError(
            "genie: the graph does not fit device memory after rebalancing across "
            f"{self.devices} (graph inputs alone: {format_bytes(total)}):\n  " + "\n  ".join(lines),
            details,
        )


def format_bytes(n: int, digits: int = 2) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.{digits}f} {unit}"
    return f"{n} B"
