"""Small, fast helpers over the Graph IR shared by the analysis tiers.

Everything here is per-op table lookups or one pass in program order: program order is a
topological order (a node only depends on earlier nodes), which lets most graph questions be
answered without a general graph algorithm.
"""

from __future__ import annotations

from math import prod
from typing import TYPE_CHECKING

import torch

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


class OpClass:
    MATMUL = "matmul"
    CONV = "conv"
    ATTENTION = "attention"  # a fused attention kernel
    SOFTMAX = "softmax"
    NORM = "norm"
    ACT = "act"
    EMBEDDING = "embedding"
    EMBEDDING_BAG = "embedding_bag"
    POOL = "pool"
    REDUCE = "reduce"
    CAT = "cat"
    ADD = "add"
    ELEMENTWISE = "elementwise"
    COPY = "copy"
    INDEX = "index"
    FACTORY = "factory"
    VIEW = "view"
    OTHER = "other"


_CLASSES: dict[str, tuple[str, ...]] = {
    OpClass.MATMUL: ("addmm", "mm", "bmm", "matmul", "linear", "baddbmm", "addbmm", "einsum",
                     "_scaled_mm", "addmv", "mv", "dot"),
    OpClass.CONV: ("convolution", "_convolution", "conv1d", "conv2d", "conv3d", "conv_transpose1d",
                   "conv_transpose2d", "conv_transpose3d", "cudnn_convolution", "mkldnn_convolution",
                   "_slow_conv2d_forward", "slow_conv3d_forward", "thnn_conv2d"),
    OpClass.ATTENTION: ("scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
                        "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                        "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_attention_math",
                        "_efficient_attention_forward", "_flash_attention_forward",
                        "_scaled_dot_product_fused_attention_overrideable"),
    OpClass.SOFTMAX: ("softmax", "_softmax", "log_softmax", "_log_softmax", "_safe_softmax"),
    OpClass.NORM: ("native_layer_norm", "layer_norm", "native_batch_norm", "batch_norm",
                   "_native_batch_norm_legit", "_native_batch_norm_legit_no_training",
                   "_batch_norm_impl_index", "native_group_norm", "group_norm", "rms_norm",
                   "_fused_rms_norm", "instance_norm", "cudnn_batch_norm"),
    OpClass.ACT: ("relu", "relu_", "gelu", "gelu_", "silu", "silu_", "tanh", "tanh_", "sigmoid",
                  "sigmoid_", "hardtanh", "hardtanh_", "leaky_relu", "leaky_relu_", "elu", "elu_",
                  "mish", "hardswish", "hardswish_", "hardsigmoid", "softplus", "relu6", "prelu",
                  "_prelu_kernel", "glu", "celu", "selu"),
    OpClass.EMBEDDING: ("embedding", "embedding_dense_backward"),
    OpClass.EMBEDDING_BAG: ("_embedding_bag", "embedding_bag", "_embedding_bag_forward_only"),
    OpClass.POOL: ("max_pool2d", "max_pool2d_with_indices", "max_pool1d", "max_pool3d",
                   "max_pool3d_with_indices", "avg_pool1d", "avg_pool2d", "avg_pool3d",
                   "adaptive_avg_pool1d", "adaptive_avg_pool2d", "_adaptive_avg_pool2d",
                   "adaptive_avg_pool3d", "_adaptive_avg_pool3d", "adaptive_max_pool2d"),
    OpClass.REDUCE: ("mean", "sum", "amax", "amin", "max", "min", "var", "std", "var_mean",
                     "prod", "norm", "linalg_vector_norm", "logsumexp", "argmax", "argmin", "all",
                     "any", "cumsum"),
    OpClass.CAT: ("cat", "stack", "concat", "concatenate", "hstack", "vstack"),
    OpClass.ADD: ("add", "add_"),
    OpClass.ELEMENTWISE: ("sub", "sub_", "mul", "mul_", "div", "div_", "pow", "pow_", "neg", "exp",
                          "log", "sqrt", "rsqrt", "abs", "where", "masked_fill", "masked_fill_",
                          "clamp", "clamp_", "clamp_min", "clamp_max", "minimum", "maximum", "eq",
                          "ne", "lt", "le", "gt", "ge", "logical_not", "logical_and", "bitwise_not",
                          "bitwise_and", "bitwise_or", "fill_", "zero_", "erf", "sin", "cos",
                          "reciprocal", "floor", "ceil", "round", "sign", "addcmul", "addcdiv",
                          "lerp", "rsub", "tril", "triu", "dropout", "native_dropout", "bernoulli_",
                          "square", "exp_", "log1p", "expm1", "remainder", "fmod", "floor_divide",
                          "mul_scalar"),
    OpClass.COPY: ("copy_", "_to_copy", "clone", "contiguous", "to", "_copy_from", "copy"),
    OpClass.INDEX: ("index", "index_select", "gather", "scatter", "scatter_", "scatter_add",
                    "scatter_add_", "index_put", "index_put_", "index_copy", "index_copy_",
                    "index_add", "index_add_", "masked_select", "take", "slice_scatter",
                    "select_scatter", "nonzero", "topk", "sort", "argsort", "searchsorted"),
    OpClass.FACTORY: ("arange", "zeros", "ones", "full", "empty", "empty_strided", "randn", "rand",
                      "randint", "zeros_like", "ones_like", "full_like", "empty_like", "rand_like",
                      "randn_like", "scalar_tensor", "linspace", "eye", "lift_fresh", "normal_",
                      "uniform_", "new_zeros", "new_ones", "new_empty", "new_full"),
}

_BY_NAME: dict[str, str] = {name: cls for cls, names in _CLASSES.items() for name in names}


def op_class(node: Node, name: str | None = None) -> str:
    """The coarse class of a node's op: what patterns and roles reason about."""
    name = node.name if name is None else name
    cls = _BY_NAME.get(name)
    if cls is not None:
        return cls
    if is_view(node):
        return OpClass.VIEW
    if "scaled_dot_product" in name or "flash_attention" in name:
        return OpClass.ATTENTION
    if "conv" in name:
        return OpClass.CONV
    if "norm" in name:
        return OpClass.NORM
    return OpClass.OTHER


def is_view(node: Node) -> bool:
    """True when every output aliases an input and nothing is written (view, detach, t...)."""
    alias = node.output_alias
    return bool(alias) and not node.writes and all(a >= 0 for a in alias)


#: Estimated FLOPs per output element of the light op classes.
_ELEMENT_FLOPS = {
    OpClass.SOFTMAX: 5,
    OpClass.NORM: 8,
    OpClass.ACT: 4,
    OpClass.ADD: 1,
    OpClass.ELEMENTWISE: 1,
    OpClass.POOL: 4,
    OpClass.REDUCE: 1,
}


def _nbytes(t) -> int:
    return prod(t.shape) * _ITEMSIZE.get(t.dtype, 4)


def node_cost(node: Node, cls: str, name: str | None = None) -> tuple[float, float]:
    """Estimated (FLOPs, bytes moved) of one node; views cost nothing.

    Bytes count every input view once and every output once, except embedding lookups, which
    read only the rows they gather rather than the whole table.
    """
    if cls in (OpClass.VIEW, OpClass.FACTORY) and not node.writes:
        out = sum(_nbytes(o) for o in node.outputs) if cls == OpClass.FACTORY else 0
        return 0.0, float(out)
    outs = node.outputs
    ins = node.inputs
    out_bytes = sum(_nbytes(o) for o in outs)
    if cls in (OpClass.EMBEDDING, OpClass.EMBEDDING_BAG):
        idx = sum(_nbytes(t) for t in ins[1:])
        return float(prod(outs[0].shape) if outs else 0), float(2 * out_bytes + idx)
    in_bytes = sum(_nbytes(t) for t in ins)
    nbytes = float(in_bytes + out_bytes)
    flops = 0.0
    if cls == OpClass.MATMUL and outs and ins:
        name = node.name if name is None else name
        if name in ("addmm", "baddbmm", "addbmm"):
            k = ins[1].shape[-1] if len(ins) > 1 and ins[1].shape else 1
        elif name == "linear":
            k = ins[0].shape[-1] if ins[0].shape else 1
        else:
            k = ins[0].shape[-1] if ins[0].shape else 1
        flops = 2.0 * prod(outs[0].shape) * k
    elif cls == OpClass.CONV and outs and len(ins) > 1:
        flops = 2.0 * prod(outs[0].shape) * prod(ins[1].shape[1:])
    elif cls == OpClass.ATTENTION and len(ins) >= 3:
        q, key = ins[0].shape, ins[1].shape
        if len(q) >= 2 and len(key) >= 2:
            lead = 1
            for s in q[:-2]:
                lead *= s
            flops = 4.0 * lead * q[-2] * key[-2] * q[-1] + 5.0 * lead * q[-2] * key[-2]
    else:
        per = _ELEMENT_FLOPS.get(cls, 0)
        if per and outs:
            flops = float(per * prod(outs[0].shape))
    return flops, nbytes


_ITEMSIZE = {
    torch.float32: 4, torch.float64: 8, torch.float16: 2, torch.bfloat16: 2, torch.int64: 8,
    torch.int32: 4, torch.int16: 2, torch.int8: 1, torch.uint8: 1, torch.bool: 1,
    torch.complex64: 8, torch.complex128: 16,
}


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
