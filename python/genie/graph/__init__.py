"""The Graph IR shared by every layer (see DESIGN.md)."""

from genie.graph.handoff import GraphHandoff
from genie.graph.ir import Graph, Node, TensorMeta

__all__ = ["Graph", "GraphHandoff", "Node", "TensorMeta"]
