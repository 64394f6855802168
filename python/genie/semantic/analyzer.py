"""SemanticAnalyzer: runs the three tiers, the phase detector, the patterns and the
classifier over a Graph, writes ``node.meta`` and returns a WorkloadProfile.

Note: [Never raise]
The analyzer meets model code it was not written for. A tier that fails on it (a module
class whose attributes are not what its name suggests, a context it cannot read) is skipped
for that graph and named in ``profile.metadata["skipped"]``; the other tiers still answer,
down to an honest UNKNOWN.

The result cache: genie.semantic.analysis_cache (Note: [Analysis cache]).
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import Counter, OrderedDict
from typing import Any

import torch

from genie.graph import Graph
from genie.semantic.analysis_cache import CacheEntry, cache_key, replay
from genie.semantic.annotate import Annotations, annotate
from genie.semantic.classifier import classify
from genie.semantic.config import AnalyzerConfig
from genie.semantic.context import ModuleContextTracker, context_table
from genie.semantic.graph_utils import GraphView
from genie.semantic.model_io import param_storages, remote_device, to_device
from genie.semantic.observe import CallObserver
from genie.semantic.op_stats import OpStreamStats, op_stream_stats
from genie.semantic.patterns.base import MatchedPattern, PatternContext
from genie.semantic.patterns.registry import PatternRegistry, default_registry
from genie.semantic.phases import PhaseDetector
from genie.semantic.profile import WorkloadProfile
from genie.semantic.roles import NO_CONTEXT, ContextInfo, context_info
from genie.semantic.stats import AnalysisStats
from genie.semantic.structure import (
    ModelStructure,
    structure_from_contexts,
    structure_from_model,
    structure_from_ops,
)
from genie.semantic.vocab import META_KEYS, Modality, Phase, Residency, WorkloadType

logger = logging.getLogger(__name__)

__all__ = ["SemanticAnalyzer"]


class SemanticAnalyzer:
    """Understands what a recorded graph is.

    ::

        analyzer = SemanticAnalyzer()
        profile = analyzer.analyze_graph(genie.get_graph())        # or:
        profile = analyzer.analyze(model, input_ids)                # records with hooks

    ``config`` defaults to ``AnalyzerConfig.from_env()``; ``registry`` to the process-wide
    pattern registry; each analyzer owns its phase detector and caches.
    """

    def __init__(
        self,
        config: AnalyzerConfig | None = None,
        registry: PatternRegistry | None = None,
        phase_detector: PhaseDetector | None = None,
    ):
        self.config = config or AnalyzerConfig.from_env()
        self.registry = registry or default_registry()
        self.phase_detector = phase_detector or PhaseDetector()
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple, CacheEntry] = OrderedDict()
        self._structures: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._infos: dict[int, ContextInfo] = {}
        self._stats = AnalysisStats()
        self._table = context_table()
        # Import what analyses use now, so the first analysis is not billed for imports
        # (and not reported as slow for them); loads the registry's plugins too.
        import networkx.algorithms.isomorphism  # noqa: F401

        self.registry.names()

    # -- public API -----------------------------------------------------------------------------
    def analyze_graph(self, graph: Graph, model: torch.nn.Module | None = None) -> WorkloadProfile:
        """Annotate every node of ``graph`` and profile it. ``model``, when given, lets tier 2
        read its module tree and tier 3 recognise its parameters among the graph inputs."""
        t0 = time.perf_counter()
        key = None
        if self.config.cache:
            key = self._key(graph, model is not None)
            with self._lock:
                entry = self._cache.get(key)
                if entry is not None:
                    self._cache.move_to_end(key)
            if entry is not None:
                profile = self._replay(entry, graph)
                ms = (time.perf_counter() - t0) * 1e3
                profile.metadata["analysis_ms"] = round(ms, 4)
                self._stats.account(ms, True, profile, None, self.config.slow_ms)
                return profile
        params = param_storages(graph, model) if model is not None else frozenset()
        profile, entry, tiers = self._analyze(graph, model, params)
        ms = (time.perf_counter() - t0) * 1e3
        profile.metadata["analysis_ms"] = round(ms, 4)
        if key is not None:
            with self._lock:
                self._cache[key] = entry
                while len(self._cache) > self.config.cache_size:
                    self._cache.popitem(last=False)
        self._stats.account(ms, False, profile, tiers, self.config.slow_ms)
        return profile

    def analyze(
        self,
        model: torch.nn.Module,
        *inputs: Any,
        return_outputs: bool = False,
        grad: bool = False,
        **kwargs: Any,
    ) -> WorkloadProfile | tuple[WorkloadProfile, Any]:
        """Record ``model(*inputs, **kwargs)`` with module hooks and analyze what is pending.

        CPU tensors among the inputs are moved to the model's ``remote_accelerator`` device
        (``remote_accelerator:0`` for a CPU model, whose weights then become graph uploads);
        the model itself is not moved. The pending graph -- what the next flush would run,
        including anything recorded before this call -- is analyzed. Runs under
        ``torch.no_grad()`` unless ``grad``. Returns the profile, or ``(profile, outputs)``.
        """
        import genie

        device = remote_device(model)
        args = to_device(inputs, device)
        kw = to_device(kwargs, device)
        with torch.set_grad_enabled(grad), ModuleContextTracker(model):
            out = model(*args, **kw)
        profile = self.analyze_graph(genie.get_graph(), model)
        return (profile, out) if return_outputs else profile

    def observe(self, model: torch.nn.Module) -> CallObserver:
        """A context manager that analyses every top-level forward of ``model`` while it runs
        (``.profiles``, one per call): prefill then decode steps under ``generate()``. See
        Note: [Observing calls]."""
        return CallObserver(self, model)

    def track(self, model: torch.nn.Module, name: str | None = None) -> ModuleContextTracker:
        """A ModuleContextTracker for ``model`` (use it as a context manager)."""
        return ModuleContextTracker(model, name=name)

    def clear_cache(self, structures: bool = True) -> None:
        """Forget cached results (and, unless ``structures=False``, per-model structures and
        module-context rules)."""
        with self._lock:
            self._cache.clear()
            if structures:
                self._structures = weakref.WeakKeyDictionary()
                self._infos = {}

    def get_performance_report(self) -> dict[str, Any]:
        """Counts, hit rate and timings of the analyses this analyzer ran."""
        with self._lock:
            entries = len(self._cache)
        return {
            **self._stats.report(),
            "cache_entries": entries,
            "cache_enabled": self.config.cache,
            "slow_threshold_ms": self.config.slow_ms,
            "plugin_errors": [str(e) for e in self.registry.plugin_errors],
            "phases": self.phase_detector.statistics(),
        }

    # -- the analysis ---------------------------------------------------------------------------
    def _analyze(
        self, graph, model, params
    ) -> tuple[WorkloadProfile, CacheEntry, dict[str, float]]:
        cfg = self.config
        tiers: dict[str, float] = {}
        if any("semantic_role" in n.meta for n in graph.nodes[:1]):
            for n in graph.nodes:  # analysed before (maybe with other switches): start clean
                for k in META_KEYS:
                    n.meta.pop(k, None)
        clock = time.perf_counter
        t = clock()
        gv = GraphView(graph)
        stats = op_stream_stats(gv, topology=cfg.topology)
        t, tiers["tier1_ops"] = _lap(t)

        skipped: list[str] = []  # what the analysis could not read (see Note: [Never raise])
        try:
            structure = self._structure(graph, model)
        except Exception as exc:  # noqa: BLE001
            skipped.append(f"structure: {type(exc).__name__}: {exc}")
            structure = None
        t, tiers["tier2_structure"] = _lap(t)

        ann = annotate(gv, self._safe_info(skipped), params)
        if structure is None:
            structure = structure_from_ops(stats.class_histogram, ann, *self._weights(gv, ann))
        elif structure.source == "contexts":
            count, shapes = self._weights(gv, ann)  # what the graph's weights tell
            structure.parameter_count = count
            structure.width = max((max(s) for s in shapes if s), default=0)
        t, tiers["tier3_semantics"] = _lap(t)

        graph_hash = graph.structural_hash()
        phase_result = None
        if cfg.phase_detection:
            try:
                phase_result = self.phase_detector.detect(
                    gv, ann, structure.architecture, graph_hash
                )
            except Exception as exc:  # noqa: BLE001
                skipped.append(f"phases: {type(exc).__name__}: {exc}")
        t, tiers["phases"] = _lap(t)

        ctx = PatternContext(graph, gv, stats, structure, ann, fast=cfg.fast_patterns)
        timings: dict[str, float] | None = {} if cfg.debug else None
        patterns = self.registry.match_all(ctx, timings=timings)
        t, tiers["patterns"] = _lap(t)

        wt, conf, decided_by = classify(patterns)
        profile = self._profile(
            graph,
            gv,
            stats,
            structure,
            ann,
            patterns,
            wt,
            conf,
            decided_by,
            phase_result,
            graph_hash,
        )
        t, tiers["classify"] = _lap(t)
        profile.metadata["tier_ms"] = {k: round(v, 4) for k, v in tiers.items()}
        skipped.extend(structure.features.get("unread_modules", ()))
        profile.metadata["skipped"] = skipped
        if cfg.debug:
            profile.metadata["debug"] = {
                "pattern_ms": {k: round(v, 4) for k, v in (timings or {}).items()},
                "matched": [p.name for p in patterns],
                "not_matched": [
                    n for n in self.registry.names() if n not in {p.name for p in patterns}
                ],
                "plugin_errors": [str(e) for e in self.registry.plugin_errors],
            }
            logger.info(
                "genie: analyzed %s: %s (%.2f) tiers %s patterns %s",
                graph_hash[:12],
                wt,
                conf,
                profile.metadata["tier_ms"],
                profile.metadata["debug"]["pattern_ms"],
            )
        if phase_result is not None:
            self.phase_detector.observe(phase_result.call)
        entry = CacheEntry(
            profile=profile,
            metas=[{k: n.meta[k] for k in META_KEYS if k in n.meta} for n in graph.nodes]
            if cfg.cache
            else [],
            node_ids=[n.id for n in graph.nodes],
            inputs=list(gv.inputs),
            call=phase_result.call if phase_result is not None else None,
        )
        return profile, entry, tiers

    def _profile(
        self,
        graph,
        gv: GraphView,
        stats: OpStreamStats,
        structure: ModelStructure,
        ann: Annotations,
        patterns: list[MatchedPattern],
        wt: WorkloadType,
        conf: float,
        decided_by: str,
        phase_result,
        graph_hash: str,
    ) -> WorkloadProfile:
        call_phase = phase_result.call.phase if phase_result is not None else None
        branches = sum(1 for m in Modality.PERCEPTUAL if ann.modalities.get(m, 0) >= 3)
        parallelism = {
            "critical_path": stats.critical_path,
            "max_width": stats.max_width,
            "average_width": round(stats.average_width, 3),
            "branches": max(branches, 1),
            "components": stats.components,
            "batch_size": ann.batch_size,
        }
        return WorkloadProfile(
            workload_type=wt,
            confidence=conf,
            patterns=patterns,
            phases=phase_result.node_ids(graph.nodes) if phase_result is not None else {},
            call_phase=call_phase,
            metadata={
                "graph_hash": graph_hash,
                "nodes": len(graph.nodes),
                "architecture": structure.architecture,
                "model_type": structure.model_type,
                "decided_by": decided_by,
                "cache_hit": False,
                "batch_size": ann.batch_size,
                "weights": ann.weight_count,
                "weight_bytes": ann.weight_bytes,
                "fusion_points": list(ann.fusion_points),
                "fusion_modules": list(ann.fusion_modules),
                "roles": dict(ann.roles),
                "modalities": dict(ann.modalities),
                "input_modalities": dict(Counter(ann.input_modalities.values())),
                "causal": ann.causal,
                "call": phase_result.call.to_dict() if phase_result is not None else None,
            },
            structure=structure,
            context={
                "coverage": round(ann.context_coverage, 4),
                "modules": len(ann.modules),
                "top_modules": ann.modules.most_common(10),
                "contexts": len({n.context for n in graph.nodes if n.context}),
            },
            op_stats=stats,
            compute_intensity=stats.compute_intensity,
            memory_bandwidth_share=stats.memory_bandwidth_share,
            parallelism=parallelism,
            latency_sensitivity=_latency(call_phase, wt, ann.batch_size),
            residency=dict(ann.residency),
            kv_cache={
                "nodes": list(ann.kv_cache_nodes),
                "storages": list(ann.kv_cache_storages),
                "bytes": ann.kv_cache_bytes,
                "present": bool(ann.kv_cache_storages),
            },
            graph_hash=graph_hash,
            graph=graph,
        )

    # -- tiers' inputs ----------------------------------------------------------------------------
    def _safe_info(self, skipped: list[str]):
        """``_info`` that answers NO_CONTEXT for a context it cannot read, and says so."""

        def info(cid: int) -> ContextInfo:
            try:
                return self._info(cid)
            except Exception as exc:  # noqa: BLE001
                skipped.append(f"module context {cid}: {type(exc).__name__}: {exc}")
                return NO_CONTEXT

        return info

    def _info(self, cid: int) -> ContextInfo:
        info = self._infos.get(cid)
        if info is None:
            info = context_info(self._table, cid, self._infos)
        return info

    def _structure(self, graph, model) -> ModelStructure | None:
        if model is not None:
            st = self._structures.get(model)
            if st is None:
                st = structure_from_model(model, try_fx=self.config.try_fx)
                self._structures[model] = st
            return st
        table = self._table
        counts = Counter(n.context for n in graph.nodes if n.context)
        if not counts:
            return None
        # a pending graph may hold calls of several models: describe the one most ops ran in
        roots: Counter = Counter()
        for cid, k in counts.items():
            ctx = table.get(cid)
            if ctx is not None:
                roots[ctx.root] += k
        if not roots:
            return None
        root = roots.most_common(1)[0][0]
        ctxs = {}
        for cid in counts:
            for c in table.chain(cid):
                if c.root == root:
                    ctxs.setdefault(c.id, c)
        return structure_from_contexts(ctxs.values())

    @staticmethod
    def _weights(gv: GraphView, ann: Annotations) -> tuple[int, list[tuple[int, ...]]]:
        shapes = []
        count = 0
        seen = set()
        for n in gv.nodes:
            for t in n.inputs:
                if (
                    t.storage in ann.residency
                    and t.storage not in seen
                    and ann.residency[t.storage] == Residency.PERSISTENT_WEIGHT
                ):
                    seen.add(t.storage)
                    shapes.append(t.shape)
                    count += t.numel
        return count, shapes

    # -- the cache ----------------------------------------------------------------------------------
    def _key(self, graph, with_model: bool) -> tuple:
        cfg = self.config
        return cache_key(graph, with_model, cfg.fast_patterns, cfg.phase_detection)

    def _replay(self, entry: CacheEntry, graph) -> WorkloadProfile:
        if entry.call is not None:
            self.phase_detector.observe(entry.call)
        return replay(entry, graph)

    def __repr__(self) -> str:
        return (
            f"SemanticAnalyzer(cache={'on' if self.config.cache else 'off'}, "
            f"entries={len(self._cache)}, patterns={self.registry!r})"
        )


# -- helpers ---------------------------------------------------------------------------------------


def _lap(t: float) -> tuple[float, float]:
    now = time.perf_counter()
    return now, (now - t) * 1e3


def _latency(call_phase: str | None, wt: WorkloadType, batch: int | None) -> str:
    """Decode steps and online recommenders wait on every step: high. Otherwise small
    batches are interactive (medium) and large ones are throughput work (low)."""
    if call_phase == Phase.DECODE or wt == WorkloadType.RECSYS:
        return "high"
    if batch is None or batch <= 1:
        return "high"
    return "medium" if batch <= 8 else "low"
