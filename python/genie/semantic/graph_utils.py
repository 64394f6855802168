"""Small, fast helpers over the Graph IR shared by the analysis tiers.

Everything here is per-op table lookups or one pass in program order: program order is a
topological order (a node only depends on earlier nodes), which lets most graph questions be
answered without a general graph algorithm.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from genie.graph.ops import OpClass, is_view, op_class
from genie.graph.ops import node_cost as _node_cost

if TYPE_CHECKING:
    import networkx as nx

    from genie.graph import Graph, Node

__all__ = [
    "OpClass",
    "op_class",
    "is_view",
    "node_cost",
    "GraphView",
    "cat_dim",
]


# The taxonomy is genie.graph.ops's, shared with the scheduler; node_cost here is its
# (FLOPs, bytes) in the shape the analysis tiers use.
def node_cost(node: Node, cls: str | None = None, name: str | None = None) -> tuple[float, float]:
    """Estimated (FLOPs, bytes moved) of one node (genie.graph.ops.node_cost); views cost
    nothing. `cls` and `name` are accepted for callers that have them; the cost does not
    depend on them."""
    cost = _node_cost(node)
    return cost.flops, cost.bytes


def cat_dim(node: Node) -> int | None:
    """The ``dim`` argument of a cat/stack node, normalised to be non-negative."""
    for kind, v in node.args:
        if kind == "value" and isinstance(v, int) and not isinstance(v, bool):
            rank = len(node.outputs[0].shape) if node.outputs else 0
            return v + rank if v < 0 else v
    return 0


class GraphView:
    """Per-analysis facts about a Graph computed once: op classes, view nodes, producer and
    consumer id lists (from the public ``Graph.edges()``), graph inputs. Passes share one."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.nodes = graph.nodes
        self.pos = {n.id: i for i, n in enumerate(graph.nodes)}
        self.cls: dict[int, str] = {}
        self.names: dict[int, str] = {}
        self.views: set[int] = set()
        for n in graph.nodes:
            # Node.name splits the op string on every access; do it once
            name = n.op.split("::", 1)[-1].split(".", 1)[0]
            self.names[n.id] = name
            c = op_class(n, name)
            self.cls[n.id] = c
            if c == OpClass.VIEW or (c != OpClass.COPY and is_view(n)):
                self.views.add(n.id)
        self.preds: dict[int, list[int]] = {n.id: [] for n in graph.nodes}
        self.succs: dict[int, list[int]] = {n.id: [] for n in graph.nodes}
        self.edges = graph.edges()
        for p, c in self.edges:
            self.preds[c].append(p)
            self.succs[p].append(c)
        self.inputs = graph.input_storages
        self.input_set = set(self.inputs)
        self._nx = None

    def levels(self) -> dict[int, int]:
        """Longest-path level of every node (sources are level 1), in one pass in program
        order. Views get level 0 and do not lengthen paths."""
        level: dict[int, int] = {}
        preds = self.preds
        views = self.views
        for n in self.nodes:
            nid = n.id
            if nid in views:
                level[nid] = 0
                continue
            best = 0
            for p in preds[nid]:
                lp = level[p]
                if lp > best:
                    best = lp
            level[nid] = best + 1
        return level

    def compute_graph(self) -> nx.DiGraph:
        """A ``networkx.DiGraph`` of the nodes that compute (views dropped) with vertex
        attribute ``cls`` (the op class), built once per analysis. View nodes never produce a
        storage another node depends on, so dropping them loses no edge."""
        if self._nx is None:
            import networkx as nx

            g = nx.DiGraph()
            views = self.views
            g.add_nodes_from(nid for nid in self.cls if nid not in views)
            g.add_edges_from((p, c) for p, c in self.edges if c not in views)
            self._nx = g
        return self._nx
