"""What the scheduler needs to know about a graph, computed once per graph in linear passes.

The scheduler works on *compute nodes* (nodes that run a kernel), indexed 0..C-1 in program
order. Views run no kernel: each is anchored to the compute node that last wrote the storage
it views (or, for views of graph inputs such as weights, to the first compute node reading
that storage) and goes wherever its anchor goes.

Note: [Versions]
A storage can be written more than once (in-place ops), so a value is a (storage, version)
pair where the version is the compute index of the writer, or -1 for the value the graph
received (a constant being uploaded, or a value already resident on a device). Dependencies
are read-after-write on versions plus write-after-read (an in-place writer runs after every
reader of the version it overwrites), which is what lets plans move and copy storages between
devices without changing what any node reads.
"""

from __future__ import annotations

import logging
import threading
import weakref
from dataclasses import dataclass

from genie.graph.ir import Graph, Node
from genie.graph.ops import (
    ATTENTION,
    CONV,
    MATRIX_FAMILIES,
    NodeCost,
    is_view,
    node_cost,
)

logger = logging.getLogger(__name__)

__all__ = ["GraphAnalysis", "KVUnit", "Branches"]

# node.meta keys read here (written by genie.semantic and by SemanticOptimizer)
META_PHASE = "execution_phase"
META_RESIDENCY = "data_residency"
META_MODALITY = "modality"
KV_RESIDENCY = "stateful_kv_cache"
WEIGHT_RESIDENCY = "persistent_weight"
BRANCH_MODALITIES = ("text", "vision", "audio", "tabular", "categorical")
META_BRANCH = "genie.branch"  # SemanticOptimizer's modality_branches pass
META_FUSION_POINT = "genie.fusion_point"


@dataclass
class KVUnit:
    """A KV cache and the ops that read or extend it; they must share one device."""

    nodes: list[int]  # compute indices
    cache_storages: list[int]  # graph-input storages holding the cache


@dataclass
class Branches:
    """Independent heavy branches that meet at a fusion point."""

    sets: list[list[int]]  # compute indices per branch, program order
    labels: list[str]
    fusion: int  # compute index of the first node that reads two branches
    downstream: list[int]  # fusion point and everything after it that is in no branch
    shared: list[int]  # nodes upstream of several branches


class GraphAnalysis:
    """Compute nodes, versions, dependencies, levels, storages and costs of one graph."""

    _cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
    _cache_lock = threading.Lock()

    @classmethod
    def of(cls, graph: Graph, refresh: bool = False) -> GraphAnalysis:
        """The analysis of `graph`, computed once per graph object (kept while it lives);
        `refresh` recomputes it (after node.meta changed)."""
        with cls._cache_lock:
            a = None if refresh else cls._cache.get(graph)
        if a is None or a.num_nodes != len(graph.nodes):
            a = cls(graph)
            with cls._cache_lock:
                cls._cache[graph] = a
        return a

    def __init__(self, graph: Graph):
        # Note: no reference to `graph` itself, so caching by graph never keeps it alive.
        nodes = graph.nodes
        self.num_nodes = len(nodes)
        self.positions: list[int] = []  # compute index -> position in graph.nodes
        self.cnodes: list[Node] = []
        self.costs: list[NodeCost] = []
        self.reads: list[list[tuple[int, int]]] = []  # per compute node: (storage, version)
        self.preds: list[list[int]] = []
        self.level: list[int] = []
        self.view_anchor: dict[int, int] = {}  # position of a view -> compute index (or -1)
        self.storage_bytes: dict[int, int] = {}
        self.writes: list[list[int]] = []  # storages each compute node creates or writes
        self.versions: dict[int, list[int]] = {}  # storage -> compute indices writing it
        self.readers: dict[tuple[int, int], list[int]] = {}  # (storage, version) -> readers
        self.grad_inputs: set[int] = set()  # input storages read with requires_grad (parameters)
        input_views: dict[int, list[int]] = {}

        last_writer: dict[int, int] = {}
        readers_since: dict[int, list[int]] = {}
        sbytes = self.storage_bytes
        for pos, n in enumerate(nodes):
            # Every storage gets an entry, empty ones too (eval-mode batch norm's statistics).
            for t in n.inputs:
                nb = t.storage_nbytes or t.numel * t.dtype.itemsize
                if nb > sbytes.get(t.storage, -1):
                    sbytes[t.storage] = nb
            for t in n.outputs:
                nb = t.storage_nbytes or t.numel * t.dtype.itemsize
                if nb > sbytes.get(t.storage, -1):
                    sbytes[t.storage] = nb
            if is_view(n):
                s = n.inputs[0].storage if n.inputs else n.outputs[0].storage
                w = last_writer.get(s, -1)
                self.view_anchor[pos] = w
                if w < 0:
                    input_views.setdefault(s, []).append(pos)
                continue
            ci = len(self.cnodes)
            self.positions.append(pos)
            self.cnodes.append(n)
            self.costs.append(node_cost(n))
            reads: list[tuple[int, int]] = []
            preds: list[int] = []
            seen: set[int] = set()
            for t in n.inputs:
                s = t.storage
                if s in seen:
                    continue
                seen.add(s)
                w = last_writer.get(s, -1)
                reads.append((s, w))
                if w >= 0:
                    if w not in preds:
                        preds.append(w)
                elif t.requires_grad:
                    self.grad_inputs.add(s)
                self.readers.setdefault((s, w), []).append(ci)
                readers_since.setdefault(s, []).append(ci)
            written = list(n.fresh)
            for s in n.writes:
                if s not in written:
                    written.append(s)
                for r in readers_since.get(s, ()):  # write-after-read, Note: [Versions]
                    if r != ci and r not in preds:
                        preds.append(r)
                w = last_writer.get(s, -1)
                if w >= 0 and w not in preds:
                    preds.append(w)
            for s in written:
                last_writer[s] = ci
                readers_since[s] = []
                self.versions.setdefault(s, []).append(ci)
            self.reads.append(reads)
            self.preds.append(preds)
            self.writes.append(written)
            lvl = 0
            for p in preds:
                if self.level[p] >= lvl:
                    lvl = self.level[p] + 1
            self.level.append(lvl)
        self.last_writer = last_writer
        # Views of graph inputs (weights, mostly) travel with the first node that reads them.
        for s, views in input_views.items():
            first = self.readers.get((s, -1))
            for pos in views:
                self.view_anchor[pos] = first[0] if first else -1
        for s, t in graph.constants.items():
            try:
                sbytes[s] = max(sbytes.get(s, 0), t.untyped_storage().nbytes())
            except (RuntimeError, AttributeError):
                pass
        self.inputs: list[int] = graph.input_storages
        self.constants: set[int] = set(graph.constants)
        self.succs: list[list[int]] = [[] for _ in self.cnodes]
        for ci, ps in enumerate(self.preds):
            for p in ps:
                self.succs[p].append(ci)
        self._kv: list[KVUnit] | None = None
        self._branches: Branches | None | bool = False

    # -- basic queries ---------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.cnodes)

    @property
    def num_levels(self) -> int:
        return (max(self.level) + 1) if self.level else 0

    def node_id(self, ci: int) -> int:
        return self.cnodes[ci].id

    def is_weight(self, storage: int) -> bool:
        """A graph input that is a parameter or buffer rather than data."""
        return storage in self.grad_inputs

    def consumers_of(self, ci: int) -> list[tuple[int, int]]:
        """(storage, reader) pairs for every value node `ci` writes."""
        out = []
        for s in self.writes[ci]:
            for r in self.readers.get((s, ci), ()):
                out.append((s, r))
        return out

    # -- KV caches -------------------------------------------------------------------------
    def kv_units(self) -> list[KVUnit]:
        """KV caches and the ops that use them, from ``data_residency`` annotations when
        present, else structurally: graph inputs that flow into ``aten::cat`` (or an in-place
        write) feeding attention as keys or values."""
        if self._kv is not None:
            return self._kv
        units: list[KVUnit] = []
        annotated = [
            ci for ci, n in enumerate(self.cnodes) if n.meta.get(META_RESIDENCY) == KV_RESIDENCY
        ]
        attention = [ci for ci, c in enumerate(self.costs) if c.family == ATTENTION]
        claimed: set[int] = set()
        for a in attention:
            members = [a]
            caches: list[int] = []
            for s, w in self.reads[a][1:3]:
                if w < 0:
                    if s not in self.constants or self.storage_bytes.get(s, 0) > 0:
                        caches.append(s)
                    continue
                producer = self.cnodes[w]
                if producer.name == "cat" or producer.writes:
                    for s2, w2 in self.reads[w]:
                        if w2 < 0 and not self.is_weight(s2):
                            caches.append(s2)
                            if w not in members:
                                members.append(w)
                elif w in annotated and w not in members:
                    members.append(w)
            if caches or any(m in annotated for m in members):
                claimed.update(members)
                units.append(KVUnit(sorted(members), sorted(set(caches))))
        for ci in annotated:  # annotated cache ops no attention claimed: keep them together
            if ci not in claimed:
                caches = [s for s, w in self.reads[ci] if w < 0 and not self.is_weight(s)]
                units.append(KVUnit([ci], caches))
        self._kv = units
        return units

    def has_resident_kv(self, resident: dict[int, str] | None = None) -> bool:
        """Whether a KV cache from an earlier flush feeds this graph (a decode step): a cache
        storage that is not being uploaded (or is known to be resident) and holds bytes."""
        for u in self.kv_units():
            for s in u.cache_storages:
                if (resident and s in resident) or (
                    s not in self.constants and self.storage_bytes.get(s, 0) > 0
                ):
                    return True
        return False

    # -- modality branches -----------------------------------------------------------------
    def branches(self, min_share: float = 0.001, min_nodes: int = 3) -> Branches | None:
        """Parallel branches joined at a fusion point: from ``modality`` annotations when
        present, else structurally: the first node whose inputs come from two disjoint sets of
        ancestors, each with at least `min_nodes` nodes, a matrix op, and `min_share` of the
        graph's work."""
        if self._branches is not False:
            return self._branches  # type: ignore[return-value]
        result = self._annotated_branches() or self._structural_branches(min_share, min_nodes)
        self._branches = result
        return result

    def _annotated_branches(self) -> Branches | None:
        labels: dict[str, list[int]] = {}
        fusion = -1
        for ci, n in enumerate(self.cnodes):
            meta = n.meta
            if not meta:
                continue
            b = meta.get(META_BRANCH)
            if b is not None:
                labels.setdefault(str(b), []).append(ci)
                continue
            if meta.get(META_FUSION_POINT) and fusion < 0:
                fusion = ci
                continue
            m = meta.get(META_MODALITY)
            if m in BRANCH_MODALITIES:
                labels.setdefault(m, []).append(ci)
            elif m == "fusion" and fusion < 0:
                fusion = ci
        if len(labels) < 2 or fusion < 0:
            return None
        in_branch = {ci for v in labels.values() for ci in v}
        downstream = [ci for ci in range(fusion, len(self.cnodes)) if ci not in in_branch]
        return Branches(list(labels.values()), list(labels), fusion, downstream, [])

    def _structural_branches(self, min_share: float, min_nodes: int) -> Branches | None:
        n = len(self.cnodes)
        if n < 4:
            return None
        weight = [c.flops + c.bytes / 8 for c in self.costs]  # bytes break ties for cheap graphs
        total = sum(weight) or 1.0
        threshold = max(min_nodes, int(n * min_share / 2))
        anc: list[int] = [0] * n
        for ci in range(n):
            a = 1 << ci
            for p in self.preds[ci]:
                a |= anc[p]
            anc[ci] = a
        for ci in range(n):
            preds = self.preds[ci]
            if len(preds) < 2:
                continue
            exclusive = []
            for p in preds:
                others = 0
                for q in preds:
                    if q != p:
                        others |= anc[q]
                ex = anc[p] & ~others
                if ex.bit_count() >= threshold:
                    exclusive.append(ex)
            if len(exclusive) < 2:
                continue
            sets = [_bits(ex) for ex in exclusive]
            shares = [sum(weight[i] for i in s) / total for s in sets]
            # A branch does real work: a matrix op (conv, matmul, attention) and a share.
            heavy = [
                (s, sh)
                for s, sh in zip(sets, shares, strict=False)
                if sh >= min_share and any(self.costs[i].family in MATRIX_FAMILIES for i in s)
            ]
            if len(heavy) < 2:
                continue
            sets = [s for s, _ in heavy]
            union = 0
            for ex in exclusive:
                union |= ex
            shared = [i for i in _bits(anc[ci] & ~union) if i != ci]
            in_branch = set().union(*map(set, sets))
            downstream = [i for i in range(ci, n) if i not in in_branch]
            labels = [self._label(s, k) for k, s in enumerate(sets)]
            logger.debug(
                "genie: %d branches meet at compute node %d (%s)", len(sets), ci, self.cnodes[ci].op
            )
            return Branches(sets, labels, ci, downstream, shared)
        return None

    def _label(self, members: list[int], k: int) -> str:
        fams = {self.costs[i].family for i in members}
        if CONV in fams:
            return "vision"
        if any(self.cnodes[i].name in ("embedding", "embedding_bag") for i in members):
            return "text"
        return f"branch{k}"

    # -- summaries -------------------------------------------------------------------------
    def total_flops(self) -> float:
        return sum(c.flops for c in self.costs)

    def conv_share(self) -> float:
        total = self.total_flops() or 1.0
        return sum(c.flops for c in self.costs if c.family == CONV) / total

    def matrix_share(self) -> float:
        total = self.total_flops() or 1.0
        return sum(c.flops for c in self.costs if c.family in MATRIX_FAMILIES) / total


def _bits(x: int) -> list[int]:
    out = []
    i = 0
    while x:
        low = x & -x
        i = low.bit_length() - 1
        out.append(i)
        x ^= low
    return out
