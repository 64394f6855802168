"""GraphHandoff: a graph plus what its caller promises to supply and expects back."""

from __future__ import annotations

from dataclasses import dataclass, field

from genie.errors import GraphValidationError
from genie.graph.ir import Graph

__all__ = ["GraphHandoff"]


@dataclass
class GraphHandoff:
    """What one layer hands the next: the graph, the storages supplied from outside it
    (resident values and uploads), and the storages the receiver must produce."""

    graph: Graph
    supplied: set[int] = field(default_factory=set)
    wanted: set[int] = field(default_factory=set)

    @classmethod
    def for_graph(cls, graph: Graph, wanted: set[int] | None = None) -> GraphHandoff:
        """Everything the graph reads before writing counts as supplied."""
        return cls(graph, set(graph.input_storages), set(wanted or ()))

    def validate(self) -> None:
        """Raise GraphValidationError unless every node input is produced earlier in the graph
        or supplied, every reference is in range, and every wanted storage is produced or
        supplied."""
        available = set(self.supplied)
        problems: list[str] = []
        for n in self.graph.nodes:
            for kind, v in n.args:
                refs = [v] if kind == "tensor" else v if kind != "value" else []
                for r in refs:
                    if r >= len(n.inputs):
                        problems.append(
                            f"node {n.id} ({n.op}) refers to input {r} of {len(n.inputs)}"
                        )
            for t in n.inputs:
                if t.storage not in available:
                    problems.append(
                        f"node {n.id} ({n.op}) reads storage {t.storage}, which nothing before it "
                        "produces and the handoff does not supply"
                    )
            if len(n.output_alias) != len(n.outputs):
                problems.append(
                    f"node {n.id} ({n.op}) has {len(n.outputs)} outputs but "
                    f"{len(n.output_alias)} alias entries"
                )
            for a in n.output_alias:
                if a >= len(n.inputs):
                    problems.append(f"node {n.id} ({n.op}) output aliases missing input {a}")
            available.update(n.fresh)
            available.update(n.writes)
            available.update(o.storage for o in n.outputs)
        for s in sorted(self.wanted - available):
            problems.append(f"wanted storage {s} is neither produced nor supplied")
        if problems:
            raise GraphValidationError("genie: invalid graph handoff:\n  " + "\n  ".join(problems))
