"""The Graph IR: the one data structure every layer shares.

A Graph is the recorded program of one flush (or the pending program), in program order.
Each Node names an aten overload, its arguments and the tensors it reads and writes. Tensors
are views of storages (see Note: [Storage identity] in csrc/capture/storage.h), so dataflow
edges follow storages: a node depends on the last earlier node that wrote each storage it
reads. Analyses annotate ``node.meta``; they never build parallel graphs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["TensorMeta", "Node", "Graph"]


@dataclass(frozen=True)
class TensorMeta:
    """A tensor as one op saw it: a view of a storage."""

    storage: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int = 0
    storage_nbytes: int = 0
    device: int = 0
    requires_grad: bool = False

    @classmethod
    def from_core(cls, d: dict) -> TensorMeta:
        return cls(
            storage=int(d["storage"]),
            dtype=d["dtype"],
            shape=tuple(d["shape"]),
            stride=tuple(d["stride"]),
            offset=int(d["offset"]),
            storage_nbytes=int(d["storage_nbytes"]),
            device=int(d["device"]),
            requires_grad=bool(d["requires_grad"]),
        )

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * _itemsize(self.dtype)

    def signature(self) -> tuple:
        """Everything but identity: what the structural hash sees."""
        return (str(self.dtype), self.shape, self.stride, self.offset)

    def to_json(self) -> dict:
        return {
            "storage": self.storage,
            "dtype": str(self.dtype).removeprefix("torch."),
            "shape": list(self.shape),
            "stride": list(self.stride),
            "offset": self.offset,
            "storage_nbytes": self.storage_nbytes,
            "device": self.device,
        }


def _itemsize(dtype: torch.dtype) -> int:
    return (
        torch.empty((), dtype=dtype).element_size() if dtype not in _ITEMSIZE else _ITEMSIZE[dtype]
    )


_ITEMSIZE = {
    torch.float32: 4,
    torch.float64: 8,
    torch.float16: 2,
    torch.bfloat16: 2,
    torch.int64: 8,
    torch.int32: 4,
    torch.int16: 2,
    torch.int8: 1,
    torch.uint8: 1,
    torch.bool: 1,
}


@dataclass
class Node:
    """One recorded aten op.

    ``args`` mirrors the op's schema: each entry is ``("value", python_value)``,
    ``("tensor", i)``, ``("tensor_list", [i, ...])`` or ``("optional_tensor_list", [i|-1, ...])``
    where ``i`` indexes ``inputs``.
    """

    id: int
    op: str
    args: list[tuple[str, Any]]
    inputs: list[TensorMeta]
    outputs: list[TensorMeta]
    output_alias: list[int] = field(default_factory=list)
    writes: list[int] = field(default_factory=list)
    fresh: list[int] = field(default_factory=list)
    context: int = 0
    random: bool = False
    eager: bool = False
    rng_state: torch.Tensor | None = None  # CPU generator state a random op starts from
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_core(cls, d: dict) -> Node:
        return cls(
            id=int(d["id"]),
            op=d["op"],
            args=[tuple(a) for a in d["args"]],
            inputs=[TensorMeta.from_core(x) for x in d["inputs"]],
            outputs=[TensorMeta.from_core(x) for x in d["outputs"]],
            output_alias=list(d["output_alias"]),
            writes=list(d["writes"]),
            fresh=list(d["fresh"]),
            context=int(d["context"]),
            random=bool(d["random"]),
            eager=bool(d["eager"]),
            rng_state=d.get("rng_state"),
        )

    @property
    def name(self) -> str:
        """The op without namespace and overload: ``addmm`` for ``aten::addmm.default``."""
        return self.op.split("::", 1)[-1].split(".", 1)[0]

    @property
    def target(self):
        """The ``torch.ops`` overload this node calls."""
        ns, rest = self.op.split("::", 1)
        name, overload = rest.split(".", 1) if "." in rest else (rest, "default")
        return getattr(getattr(getattr(torch.ops, ns), name), overload)

    @property
    def is_inplace(self) -> bool:
        return bool(self.writes)

    def scalar_args(self) -> list[Any]:
        return [v for kind, v in self.args if kind == "value"]

    def __repr__(self) -> str:
        outs = ", ".join(f"{o.dtype}{list(o.shape)}".replace("torch.", "") for o in self.outputs)
        return f"Node({self.id}, {self.op} -> {outs})"


def _json_value(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (list, tuple, set, frozenset)):
        return [_json_value(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _json_value(x) for k, x in v.items()}
    if isinstance(v, torch.dtype):
        return {"dtype": str(v).removeprefix("torch.")}
    if isinstance(v, torch.device):
        return {"device": str(v)}
    if isinstance(v, torch.memory_format):
        return {"memory_format": str(v).removeprefix("torch.")}
    if isinstance(v, torch.layout):
        return {"layout": str(v).removeprefix("torch.")}
    if isinstance(v, torch.Tensor):
        return {"scalar": v.item(), "dtype": str(v.dtype).removeprefix("torch.")}
    if isinstance(v, complex):
        return {"complex": [v.real, v.imag]}
    if isinstance(v, torch.Generator):
        return {"generator": str(v.device)}
    return {"repr": repr(v)}


class Graph:
    """Nodes in program order, with producers and consumers derived from storages."""

    def __init__(self, nodes: Iterable[Node], constants: dict[int, torch.Tensor] | None = None):
        self.nodes: list[Node] = list(nodes)
        self.constants: dict[int, torch.Tensor] = dict(constants or {})
        self._index = {n.id: n for n in self.nodes}
        self._producers: dict[int, list[int]] = {}
        self._consumers: dict[int, list[int]] = {n.id: [] for n in self.nodes}
        self._inputs: list[int] = []
        self._hash: str | None = None
        self._build()

    # -- structure ------------------------------------------------------------------------
    def _build(self) -> None:
        last_writer: dict[int, int] = {}
        seen_inputs: dict[int, None] = {}
        for n in self.nodes:
            preds: list[int] = []
            for t in n.inputs:
                w = last_writer.get(t.storage)
                if w is None:
                    seen_inputs.setdefault(t.storage, None)
                elif w not in preds:
                    preds.append(w)
            self._producers[n.id] = preds
            for p in preds:
                self._consumers[p].append(n.id)
            for s in n.fresh:
                last_writer[s] = n.id
            for s in n.writes:
                last_writer[s] = n.id
        self._inputs = list(seen_inputs)
        self._last_writer = last_writer

    def __len__(self) -> int:
        return len(self.nodes)

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    def node(self, node_id: int) -> Node:
        return self._index[node_id]

    def producers(self, node: Node | int) -> list[Node]:
        nid = node.id if isinstance(node, Node) else node
        return [self._index[p] for p in self._producers[nid]]

    def consumers(self, node: Node | int) -> list[Node]:
        nid = node.id if isinstance(node, Node) else node
        return [self._index[c] for c in self._consumers[nid]]

    @property
    def input_storages(self) -> list[int]:
        """Storages read before anything in this graph writes them: uploads (constants) and
        values already resident on the executor."""
        return list(self._inputs)

    @property
    def output_storages(self) -> list[int]:
        """Storages this graph writes or creates."""
        return list(self._last_writer)

    def writer_of(self, storage: int) -> Node | None:
        nid = self._last_writer.get(storage)
        return None if nid is None else self._index[nid]

    def edges(self) -> list[tuple[int, int]]:
        return [(p, n) for n, ps in self._producers.items() for p in ps]

    # -- identity -------------------------------------------------------------------------
    def structural_hash(self) -> str:
        """Ops, shapes, dtypes, strides, scalar arguments and wiring; never tensor values or
        storage ids, so the same program recorded twice hashes the same."""
        if self._hash is not None:
            return self._hash
        h = hashlib.sha256()
        local: dict[int, int] = {}

        def sid(s: int) -> int:
            return local.setdefault(s, len(local))

        for n in self.nodes:
            parts = [n.op, n.random]
            for kind, v in n.args:
                parts.append(_hash_value(v) if kind == "value" else (kind, v))
            for t in n.inputs:
                parts.append((sid(t.storage), t.dtype, t.shape, t.stride, t.offset))
            for t in n.outputs:
                parts.append((sid(t.storage), t.dtype, t.shape, t.stride, t.offset))
            parts.append(tuple(n.output_alias))
            h.update(repr(parts).encode())
        self._hash = h.hexdigest()
        return self._hash

    # -- conversions ----------------------------------------------------------------------
    def to_networkx(self):
        """A ``networkx.DiGraph`` with one vertex per node id; vertex attributes hold the Node
        (``node``), its op and its ``meta``; edges carry the storages they pass."""
        import networkx as nx

        g = nx.DiGraph()
        for n in self.nodes:
            g.add_node(n.id, node=n, op=n.op, meta=n.meta)
        last_writer: dict[int, int] = {}
        for n in self.nodes:
            for t in n.inputs:
                w = last_writer.get(t.storage)
                if w is not None:
                    if g.has_edge(w, n.id):
                        g.edges[w, n.id]["storages"].add(t.storage)
                        g.edges[w, n.id]["bytes"] += t.nbytes
                    else:
                        g.add_edge(w, n.id, storages={t.storage}, bytes=t.nbytes)
            for s in n.fresh + n.writes:
                last_writer[s] = n.id
        return g

    def to_fx(self) -> torch.fx.GraphModule:
        """A ``torch.fx.GraphModule`` calling the same aten overloads. Graph inputs become
        placeholders named ``s<storage>``; a tensor argument is the latest value written to
        its storage, re-viewed with ``aten.as_strided`` where the op saw another view of it."""
        import torch.fx as fx

        g = fx.Graph()
        value: dict[int, tuple[fx.Node, TensorMeta]] = {}
        for s in self._inputs:
            value[s] = (g.placeholder(f"s{s}"), None)

        def tensor(meta: TensorMeta):
            node, seen = value[meta.storage]
            if seen is not None and seen.signature() == meta.signature():
                return node
            return g.call_function(
                torch.ops.aten.as_strided.default,
                (node, list(meta.shape), list(meta.stride), meta.offset),
            )

        for n in self.nodes:
            target = n.target
            args, kwargs = [], {}
            for schema_arg, (kind, v) in zip(target._schema.arguments, n.args, strict=False):
                if kind == "value":
                    val = v
                elif kind == "tensor":
                    val = None if v < 0 else tensor(n.inputs[v])
                else:
                    val = [None if i < 0 else tensor(n.inputs[i]) for i in v]
                if schema_arg.kwarg_only:
                    kwargs[schema_arg.name] = val
                else:
                    args.append(val)
            call = g.call_function(target, tuple(args), kwargs)
            call.meta["genie_node"] = n.id
            for i, out in enumerate(n.outputs):
                if i < len(n.output_alias) and n.output_alias[i] == -2:
                    continue  # an undefined tensor
                src = call if len(n.outputs) == 1 else g.call_function(_getitem, (call, i))
                value[out.storage] = (src, out)
        outs = [value[s][0] for s in self.output_storages if s in value]
        g.output(tuple(outs))
        return fx.GraphModule(torch.nn.Module(), g)

    def to_json(self) -> dict:
        return {
            "version": 1,
            "hash": self.structural_hash(),
            "inputs": self.input_storages,
            "nodes": [
                {
                    "id": n.id,
                    "op": n.op,
                    "args": [[k, _json_value(v)] for k, v in n.args],
                    "inputs": [t.to_json() for t in n.inputs],
                    "outputs": [t.to_json() for t in n.outputs],
                    "output_alias": n.output_alias,
                    "writes": n.writes,
                    "fresh": n.fresh,
                    "producers": self._producers[n.id],
                    "meta": {k: _json_value(v) for k, v in n.meta.items()},
                }
                for n in self.nodes
            ],
        }

    def to_dot(self, label: str = "genie") -> str:
        lines = [f'digraph "{label}" {{', "  rankdir=TB;", "  node [shape=box, fontsize=10];"]
        for s in self._inputs:
            kind = "constant" if s in self.constants else "resident"
            lines.append(f'  s{s} [label="{kind} s{s}", shape=ellipse];')
        for n in self.nodes:
            shape = ",".join(str(list(o.shape)) for o in n.outputs)
            extra = "".join(
                f"\\n{k}={n.meta[k]}" for k in ("semantic_role", "execution_phase") if k in n.meta
            )
            lines.append(f'  n{n.id} [label="{n.name}\\n{shape}{extra}"];')
        last_writer: dict[int, int] = {}
        seen: set[tuple[str, int]] = set()
        for n in self.nodes:
            for t in n.inputs:
                w = last_writer.get(t.storage)
                src = f"n{w}" if w is not None else f"s{t.storage}"
                if (src, n.id) not in seen:
                    seen.add((src, n.id))
                    lines.append(f"  {src} -> n{n.id};")
            for s in n.fresh + n.writes:
                last_writer[s] = n.id
        lines.append("}")
        return "\n".join(lines)

    def summary(self) -> dict[str, Any]:
        from collections import Counter

        hist = Counter(n.name for n in self.nodes)
        return {
            "nodes": len(self.nodes),
            "edges": sum(len(p) for p in self._producers.values()),
            "inputs": len(self._inputs),
            "constants": len(self.constants),
            "hash": self.structural_hash()[:16],
            "top_ops": hist.most_common(8),
        }

    def __repr__(self) -> str:
        return f"Graph(nodes={len(self.nodes)}, hash={self.structural_hash()[:12]})"


def _hash_value(v: Any) -> Any:
    """A scalar argument as the structural hash sees it: tensors by dtype and shape only."""
    if isinstance(v, torch.Tensor):
        return ("tensor", v.dtype, tuple(v.shape))
    if isinstance(v, (list, tuple)):
        return tuple(_hash_value(x) for x in v)
    if isinstance(v, torch.Generator):
        return "generator"
    return v


def _getitem(x, i):
    return x[i]
