"""Tier 1: what the recorded op stream looks like, with no knowledge of the model.

Histogram, Shannon entropy and diversity of op names, node and edge counts, the DAG check
and topology (NetworkX on the compute graph: views dropped), estimated FLOPs and bytes,
the critical path and the widest level.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from genie.semantic.graph_utils import GraphView, node_cost

__all__ = ["OpStreamStats", "op_stream_stats"]

# A reference roofline for intensity and bandwidth share: an H100-class GPU, dense fp32 with
# tensor cores (TF32) and HBM3. Only ratios are reported, so the choice sets the ridge point.
PEAK_FLOPS = 400e12
PEAK_BYTES = 3.35e12


@dataclass
class OpStreamStats:
    nodes: int = 0
    edges: int = 0
    compute_nodes: int = 0  # not views
    compute_edges: int = 0
    histogram: Counter = field(default_factory=Counter)  # op name -> count
    class_histogram: Counter = field(default_factory=Counter)  # op class -> count
    entropy: float = 0.0  # bits, over op names
    normalized_entropy: float = 0.0  # entropy / log2(distinct ops)
    diversity: float = 0.0  # distinct ops / nodes
    distinct_ops: int = 0
    is_dag: bool = True
    components: int = 0  # weakly connected components of the compute graph
    sources: int = 0
    sinks: int = 0
    critical_path: int = 0  # nodes on the longest dependency chain (views excluded)
    max_width: int = 0  # most nodes on one level
    average_width: float = 0.0
    flops: float = 0.0
    bytes: float = 0.0
    compute_intensity: float = 0.0  # FLOPs per byte
    memory_bandwidth_share: float = 0.0  # share of roofline time spent bandwidth-bound
    inputs: int = 0
    constants: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "nodes": self.nodes,
            "edges": self.edges,
            "compute_nodes": self.compute_nodes,
            "compute_edges": self.compute_edges,
            "top_ops": self.histogram.most_common(12),
            "op_classes": dict(self.class_histogram),
            "entropy": round(self.entropy, 4),
            "normalized_entropy": round(self.normalized_entropy, 4),
            "diversity": round(self.diversity, 4),
            "distinct_ops": self.distinct_ops,
            "is_dag": self.is_dag,
            "components": self.components,
            "sources": self.sources,
            "sinks": self.sinks,
            "critical_path": self.critical_path,
            "max_width": self.max_width,
            "average_width": round(self.average_width, 3),
            "flops": self.flops,
            "bytes": self.bytes,
            "compute_intensity": round(self.compute_intensity, 3),
            "memory_bandwidth_share": round(self.memory_bandwidth_share, 4),
            "inputs": self.inputs,
            "constants": self.constants,
        }


def op_stream_stats(gv: GraphView, topology: bool = True) -> OpStreamStats:
    """Tier 1 over one graph. ``topology=False`` skips the NetworkX checks (DAG, components),
    which program order already guarantees for recorded graphs."""
    st = OpStreamStats()
    nodes = gv.nodes
    st.nodes = len(nodes)
    st.edges = len(gv.edges)
    hist = Counter(gv.names.values())
    st.histogram = hist
    st.class_histogram = Counter(gv.cls.values())
    st.distinct_ops = len(hist)
    total = st.nodes
    if total:
        h = 0.0
        for c in hist.values():
            p = c / total
            h -= p * math.log2(p)
        st.entropy = h
        st.normalized_entropy = h / math.log2(len(hist)) if len(hist) > 1 else 0.0
        st.diversity = len(hist) / total
    views = gv.views
    st.compute_nodes = total - len(views)
    st.inputs = len(gv.inputs)
    st.constants = len(gv.graph.constants)

    # costs against the reference roofline
    flops = nbytes = t_total = t_mem = 0.0
    cls = gv.cls
    names = gv.names
    views = gv.views
    for n in nodes:
        c = cls[n.id]
        if n.id in views:
            continue
        f, b = node_cost(n, c, names[n.id])
        flops += f
        nbytes += b
        tc, tm = f / PEAK_FLOPS, b / PEAK_BYTES
        t = tc if tc > tm else tm
        t_total += t
        if tm >= tc:
            t_mem += t
    st.flops, st.bytes = flops, nbytes
    st.compute_intensity = flops / nbytes if nbytes else 0.0
    st.memory_bandwidth_share = t_mem / t_total if t_total else 0.0

    # topology: levels in program order, the rest from NetworkX
    level = gv.levels()
    width: Counter = Counter(v for v in level.values() if v)
    st.critical_path = max(width) if width else 0
    st.max_width = max(width.values()) if width else 0
    st.average_width = st.compute_nodes / st.critical_path if st.critical_path else 0.0
    succs, preds = gv.succs, gv.preds
    st.sources = sum(1 for n in nodes if n.id not in views and not preds[n.id])
    st.sinks = sum(1 for n in nodes if n.id not in views and not succs[n.id])
    cg = gv.compute_graph()
    st.compute_edges = cg.number_of_edges()
    if topology:
        import networkx as nx

        st.is_dag = nx.is_directed_acyclic_graph(cg)
        st.components = nx.number_weakly_connected_components(cg)
    return st
