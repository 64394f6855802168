"""WorkloadProfile: what the semantic layer tells the scheduler about one graph."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from genie.semantic.op_stats import OpStreamStats
from genie.semantic.patterns.base import MatchedPattern
from genie.semantic.structure import ModelStructure
from genie.semantic.vocab import WorkloadType

__all__ = ["WorkloadProfile"]


@dataclass
class WorkloadProfile:
    workload_type: WorkloadType = WorkloadType.UNKNOWN
    confidence: float = 0.0
    patterns: list[MatchedPattern] = field(default_factory=list)
    phases: dict[str, list[int]] = field(default_factory=dict)  # phase -> node ids
    call_phase: str | None = None  # what the call as a whole was (prefill, decode...)
    metadata: dict[str, Any] = field(default_factory=dict)
    structure: ModelStructure = field(default_factory=ModelStructure)
    context: dict[str, Any] = field(default_factory=dict)  # module-context coverage
    op_stats: OpStreamStats = field(default_factory=OpStreamStats)
    compute_intensity: float = 0.0  # FLOPs per byte moved
    memory_bandwidth_share: float = 0.0  # share of roofline time that is bandwidth-bound
    parallelism: dict[str, Any] = field(default_factory=dict)
    latency_sensitivity: str = "medium"  # "high" | "medium" | "low"
    residency: dict[int, str] = field(default_factory=dict)  # graph-input storage -> residency
    kv_cache: dict[str, Any] = field(default_factory=dict)
    graph_hash: str = ""
    graph: Any = field(default=None, repr=False, compare=False)  # the Graph annotated

    def pattern(self, name: str) -> MatchedPattern | None:
        return next((p for p in self.patterns if p.name == name), None)

    @property
    def pattern_names(self) -> list[str]:
        return [p.name for p in self.patterns]

    def to_dict(self) -> dict[str, Any]:
        return {
            "workload_type": str(self.workload_type),
            "confidence": round(float(self.confidence), 4),
            "call_phase": self.call_phase,
            "patterns": [p.to_dict() for p in self.patterns],
            "phases": {k: list(v) for k, v in self.phases.items()},
            "metadata": self.metadata,
            "structure": self.structure.to_dict(),
            "context": self.context,
            "op_stats": self.op_stats.to_dict(),
            "compute_intensity": round(self.compute_intensity, 4),
            "memory_bandwidth_share": round(self.memory_bandwidth_share, 4),
            "parallelism": self.parallelism,
            "latency_sensitivity": self.latency_sensitivity,
            "residency": {str(k): v for k, v in self.residency.items()},
            "kv_cache": self.kv_cache,
            "graph_hash": self.graph_hash,
        }

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.to_dict(), default=_json_default, **kw)

    def format(self) -> str:
        """A human-readable summary (what ``genie analyze`` prints)."""
        st, s = self.structure, self.op_stats
        lines = [
            f"workload      {self.workload_type} (confidence {self.confidence:.2f})",
            f"call phase    {self.call_phase}",
            f"architecture  {st.architecture} [{st.source}] depth={st.depth} width={st.width} "
            f"params={st.parameter_count:,}",
            f"graph         {s.nodes} nodes ({s.compute_nodes} computing), {s.edges} edges, "
            f"{s.distinct_ops} distinct ops, entropy {s.entropy:.2f} bits, "
            f"hash {self.graph_hash[:12]}",
            f"compute       {s.flops / 1e9:.3f} GFLOP, {s.bytes / 1e6:.2f} MB moved, intensity "
            f"{self.compute_intensity:.1f} FLOP/B, bandwidth-bound share "
            f"{self.memory_bandwidth_share:.0%}",
            f"parallelism   critical path {self.parallelism.get('critical_path')}, max width "
            f"{self.parallelism.get('max_width')}, branches {self.parallelism.get('branches')}",
            f"latency       {self.latency_sensitivity}",
            f"context       {self.context.get('coverage', 0.0):.0%} of computing nodes inside a "
            f"module ({self.context.get('modules', 0)} modules)",
        ]
        if self.kv_cache.get("nodes"):
            lines.append(
                f"kv cache      {len(self.kv_cache['nodes'])} updates, "
                f"{len(self.kv_cache.get('storages', []))} resident storages, "
                f"{self.kv_cache.get('bytes', 0):,} bytes"
            )
        lines.append("patterns")
        for p in self.patterns:
            wl = f" -> {p.workload}" if p.workload is not None else ""
            lines.append(f"  {p.name:<18} {p.confidence:.2f}{wl}  matches={p.matches}")
        lines.append("phases")
        for ph, ids in self.phases.items():
            lines.append(f"  {ph:<18} {len(ids)} nodes")
        skipped = self.metadata.get("skipped") or ()
        if skipped:
            lines.append(f"not read      {len(skipped)} (skipped, see metadata['skipped'])")
            lines.extend(f"  {x}" for x in skipped[:8])
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def _json_default(o: Any) -> Any:
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    return str(o)
