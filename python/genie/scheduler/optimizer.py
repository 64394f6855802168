"""Optimizer passes: hints written into ``node.meta`` that the Scheduler honours.

SemanticOptimizer runs small passes, each switchable:

=====================  =================================================================
decode_colocation      decode-phase nodes (or, unannotated, each KV cache's ops) share one
                       device: ``genie.colocate``
prefill_parallel       independent q/k/v projections of a prefill layer form parallel
                       branches of one stage: ``genie.parallel_branch``
fusion_groups          conv -> batch norm -> relu chains never split: ``genie.fusion_group``
modality_branches      modality branches and the fusion point: ``genie.branch``,
                       ``genie.fusion_point``
early_compute          cheap work that depends on no activation (position ids, masks):
                       ``genie.early`` (scheduled first, recomputed rather than moved)
=====================  =================================================================

AdaptiveOptimizer keeps what helped: per graph it measures the schedule with every pass on,
then with each pass off in turn, and keeps a pass only if turning it off made things slower.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from genie.graph.ir import Graph
from genie.graph.ops import CONV, NORMALIZATION
from genie.scheduler.analysis import META_BRANCH, META_FUSION_POINT, META_PHASE, GraphAnalysis
from genie.scheduler.placement import META_COLOCATE, META_EARLY, META_FUSION_GROUP, META_PARALLEL

logger = logging.getLogger(__name__)

__all__ = ["SemanticOptimizer", "AdaptiveOptimizer", "PASSES"]

PASSES = (
    "decode_colocation",
    "prefill_parallel",
    "fusion_groups",
    "modality_branches",
    "early_compute",
)
_OWNED = (
    META_COLOCATE,
    META_PARALLEL,
    META_FUSION_GROUP,
    META_BRANCH,
    META_FUSION_POINT,
    META_EARLY,
)
_QKV_ROLES = {"q_projection": 0, "k_projection": 1, "v_projection": 2}
_RELU = (
    "relu",
    "relu_",
    "hardtanh",
    "hardtanh_",
    "silu",
    "silu_",
    "gelu",
    "clamp_min",
    "clamp_min_",
)


class SemanticOptimizer:
    """Writes scheduling hints into node.meta; each pass can be switched off by name."""

    def __init__(self, enabled: set[str] | None = None, **switches: bool):
        on = set(PASSES) if enabled is None else set(enabled)
        for name, value in switches.items():
            if name not in PASSES:
                raise ValueError(f"genie: unknown optimization {name!r}; known: {PASSES}")
            (on.add if value else on.discard)(name)
        unknown = on - set(PASSES)
        if unknown:
            raise ValueError(f"genie: unknown optimization(s) {sorted(unknown)}; known: {PASSES}")
        self.enabled = frozenset(on)

    def config_key(self, graph: Graph | None = None) -> Any:
        return ("semantic", tuple(sorted(self.enabled)))

    def apply(self, graph: Graph, profile: Any = None) -> dict[str, int]:
        """Run the enabled passes; returns how many nodes each pass marked. Hints from
        earlier runs (of any configuration) are removed first."""
        for n in graph.nodes:
            if n.meta:
                for k in _OWNED:
                    n.meta.pop(k, None)
        A = GraphAnalysis(graph)
        report: dict[str, int] = {}
        for name in PASSES:
            if name in self.enabled:
                report[name] = getattr(self, "_" + name)(A, profile)
        logger.debug("genie: semantic optimizer marked %s", report)
        return report

    # -- passes ------------------------------------------------------------------------------
    @staticmethod
    def _decode_colocation(A: GraphAnalysis, profile) -> int:
        decode = [n for n in A.cnodes if n.meta.get(META_PHASE) == "decode"]
        if decode:
            for n in decode:
                n.meta[META_COLOCATE] = "decode"
            return len(decode)
        count = 0
        for k, unit in enumerate(A.kv_units()):
            for ci in unit.nodes:
                A.cnodes[ci].meta[META_COLOCATE] = f"kv{k}"
                count += 1
        return count

    @staticmethod
    def _prefill_parallel(A: GraphAnalysis, profile) -> int:
        count = 0
        for n in A.cnodes:
            role = n.meta.get("semantic_role")
            if role in _QKV_ROLES and n.meta.get(META_PHASE, "prefill") != "decode":
                n.meta[META_PARALLEL] = f"{n.meta.get('layer_index', 0)}:{role}"
                count += 1
        if count:
            return count
        # Unannotated: matmuls reading the same activation (and weights) are parallel branches.
        readers: dict[tuple[int, int], list[int]] = {}
        for ci, c in enumerate(A.costs):
            if c.family == "matmul":
                acts = [(s, w) for s, w in A.reads[ci] if w >= 0]
                if len(acts) == 1:
                    readers.setdefault(acts[0], []).append(ci)
        for key, group in readers.items():
            if len(group) >= 2:
                for k, ci in enumerate(group):
                    A.cnodes[ci].meta[META_PARALLEL] = f"{key[1]}:{k}"
                    count += 1
        return count

    @staticmethod
    def _fusion_groups(A: GraphAnalysis, profile) -> int:
        count = 0
        for ci, c in enumerate(A.costs):
            if c.family != CONV:
                continue
            chain = [ci]
            cur = ci
            for want in (NORMALIZATION, "relu"):
                nxt = _single_consumer(A, cur)
                if nxt is None:
                    break
                ok = (
                    (A.costs[nxt].family == NORMALIZATION)
                    if want == NORMALIZATION
                    else (A.cnodes[nxt].name in _RELU)
                )
                if not ok:
                    break
                chain.append(nxt)
                cur = nxt
            if len(chain) > 1:
                for m in chain:
                    A.cnodes[m].meta[META_FUSION_GROUP] = f"cbr{A.cnodes[ci].id}"
                count += len(chain)
        return count

    @staticmethod
    def _modality_branches(A: GraphAnalysis, profile) -> int:
        br = A.branches()
        if br is None:
            return 0
        count = 0
        for label, members in zip(br.labels, br.sets, strict=False):
            for ci in members:
                A.cnodes[ci].meta[META_BRANCH] = label
                count += 1
        A.cnodes[br.fusion].meta[META_FUSION_POINT] = True
        return count

    @staticmethod
    def _early_compute(A: GraphAnalysis, profile) -> int:
        """Nodes whose inputs are only graph inputs that are not weights, or other early
        nodes, and that are cheap (no matrix work): position ids, masks, index arithmetic."""
        early = [False] * len(A.cnodes)
        count = 0
        for ci, c in enumerate(A.costs):
            if c.family in ("matmul", "conv", "attention") or A.cnodes[ci].random:
                continue
            ok = True
            for s, w in A.reads[ci]:
                if w >= 0:
                    if not early[w]:
                        ok = False
                        break
                elif A.is_weight(s) or A.storage_bytes.get(s, 0) > (1 << 20):
                    ok = False
                    break
            if ok and not A.cnodes[ci].writes:
                early[ci] = True
                A.cnodes[ci].meta[META_EARLY] = True
                count += 1
        return count


def _single_consumer(A: GraphAnalysis, ci: int) -> int | None:
    cons = {r for _, r in A.consumers_of(ci)}
    succ = set(A.succs[ci])
    if len(cons) == 1 and succ == cons:
        return next(iter(cons))
    # An in-place relu writes its input: it is the sole reader and successor.
    return None


@dataclass
class _Trial:
    enabled: frozenset
    times: list[float] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return sum(self.times) / len(self.times) if self.times else float("inf")


@dataclass
class _State:
    current: frozenset  # the configuration kept so far
    queue: list[str]  # passes still to try switching off
    trials: dict[frozenset, _Trial] = field(default_factory=dict)
    done: bool = False


class AdaptiveOptimizer:
    """Chooses, per graph, which SemanticOptimizer passes to keep, from measured times
    (``Scheduler.record_execution``; MultiDeviceExecutor(measure=True) reports them).

    Backward elimination: measure all passes on (``trials`` runs), then for each pass the
    configuration without it; a pass is dropped when running without it was faster by more
    than ``threshold`` (relative). Once every pass was tried the configuration stays fixed.
    """

    def __init__(self, passes: tuple[str, ...] = PASSES, trials: int = 2, threshold: float = 0.02):
        self.passes = tuple(passes)
        self.trials = max(1, int(trials))
        self.threshold = threshold
        self._states: dict[str, _State] = {}
        self._lock = threading.Lock()

    def _state(self, graph_hash: str) -> _State:
        st = self._states.get(graph_hash)
        if st is None:
            st = _State(frozenset(self.passes), list(self.passes))
            self._states[graph_hash] = st
        return st

    def _candidate(self, st: _State) -> frozenset:
        if st.done:
            return st.current
        base = st.trials.get(st.current)
        if base is None or len(base.times) < self.trials:
            return st.current
        while st.queue:
            p = st.queue[0]
            trial = st.current - {p}
            t = st.trials.get(trial)
            if t is None or len(t.times) < self.trials:
                return trial
            # Decide about p.
            if t.mean < base.mean * (1.0 - self.threshold):
                logger.info(
                    "genie: adaptive: dropping %s (%.3g s -> %.3g s without it)",
                    p,
                    base.mean,
                    t.mean,
                )
                st.current = trial
                base = t
            st.queue.pop(0)
        st.done = True
        return st.current

    def config_key(self, graph: Graph) -> Any:
        with self._lock:
            st = self._state(graph.structural_hash())
            return ("adaptive", tuple(sorted(self._candidate(st))))

    def apply(self, graph: Graph, profile: Any = None) -> dict[str, int]:
        key = self.config_key(graph)
        return SemanticOptimizer(set(key[1])).apply(graph, profile)

    def record(self, schedule, seconds: float) -> None:
        """A measured execution time of a schedule made under one of our configurations."""
        key = getattr(schedule, "optimizer_key", None)
        if not (isinstance(key, tuple) and key and key[0] == "adaptive"):
            return
        with self._lock:
            st = self._state(schedule.graph_hash)
            enabled = frozenset(key[1])
            st.trials.setdefault(enabled, _Trial(enabled)).times.append(float(seconds))
            self._candidate(st)

    def chosen(self, graph_or_hash) -> frozenset | None:
        """The passes kept for a graph once the search is over, else None."""
        h = graph_or_hash if isinstance(graph_or_hash, str) else graph_or_hash.structural_hash()
        with self._lock:
            st = self._states.get(h)
            return st.current if st is not None and st.done else None

    def report(self) -> dict[str, Any]:
        with self._lock:
            return {
                h[:16]: {
                    "kept": sorted(st.current),
                    "done": st.done,
                    "trials": {
                        ",".join(sorted(k)) or "(none)": [round(x, 6) for x in t.times]
                        for k, t in st.trials.items()
                    },
                }
                for h, st in self._states.items()
            }
