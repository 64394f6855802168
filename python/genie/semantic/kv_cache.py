"""Which values a graph keeps across calls: KV caches and other state.

Note: [State across calls]
Keys and values an attention reads are a cache when they were extended along the sequence
dimension (a cat of past and new: DynamicCache), or written in place before the attention
reads them (an index or copy write: StaticCache, allocated in prefill or resident from an
earlier call). A graph input a call updates in place through such a write (a state-space
model's conv and SSM states) is state too. The storages read from an earlier call are
resident (``kv_cache_storages``); the writers are the ``kv_cache_update`` nodes; all of them
are ``stateful_kv_cache``.
"""

from __future__ import annotations

from genie.semantic.graph_utils import GraphView, OpClass, cat_dim

__all__ = ["SCORE_OPS", "feeds_softmax", "find_state"]


def find_state(
    gv: GraphView, info_of, residency: dict[int, str], first_meta: dict
) -> tuple[dict[int, None], dict[int, None], set[int]]:
    """(writer nodes, resident storages read, storages written) of the graph's state; see
    Note: [State across calls]."""
    last_writer: dict[int, int] = {}
    kv_nodes: dict[int, None] = {}
    kv_storages: dict[int, None] = {}
    pos_of = gv.pos
    nodes, cls_of, names, input_set = gv.nodes, gv.cls, gv.names, gv.input_set
    for n in nodes:
        c = cls_of[n.id]
        if c == OpClass.ATTENTION or (
            c == OpClass.MATMUL
            and names[n.id] in SCORE_OPS
            and len(n.inputs) >= 2
            and _scores(gv, n, info_of)
        ):
            if c == OpClass.ATTENTION:
                kv_inputs = n.inputs[1:3]
            else:  # baddbmm(bias, query, key): the key is the third
                kv_inputs = n.inputs[2:3] if names[n.id] == "baddbmm" else n.inputs[1:2]
            for t in kv_inputs:
                w = last_writer.get(t.storage)
                if w is None:
                    continue
                wn = nodes[pos_of[w]]
                if _extends_sequence(wn, cls_of[w]):
                    kv_nodes[w] = None
                    for ti in wn.inputs:
                        if ti.storage in input_set and ti.storage not in last_writer and ti.numel:
                            kv_storages[ti.storage] = None
                elif wn.writes and (t.storage in input_set or names[w] in _CACHE_WRITES):
                    # a static cache updated in place: resident from an earlier call, or
                    # allocated in this one (prefill) and written by index/copy
                    kv_nodes[w] = None
                    if t.storage in input_set:
                        kv_storages[t.storage] = None
        for s in n.fresh:
            last_writer[s] = n.id
        for s in n.writes:
            last_writer[s] = n.id
    kv_out: set[int] = set()
    for w in kv_nodes:
        wn = nodes[pos_of[w]]
        kv_out.update(o.storage for o in wn.outputs)
        kv_out.update(wn.writes)
    # state a call updates in place and the next call reads (a state-space model's conv and
    # SSM states, a recurrent state): stateful like a KV cache
    for n in nodes:
        for s in n.writes:
            if (
                s in input_set
                and s not in residency
                and s in first_meta
                and names[n.id] in _CACHE_WRITES
            ):
                kv_storages[s] = None
                kv_nodes[n.id] = None
                kv_out.add(s)
    return kv_nodes, kv_storages, kv_out


def _extends_sequence(wn, cls: str) -> bool:
    """A cat of past and new keys/values: two inputs of the output's rank (>= 3), joined
    along the sequence dimension (second to last)."""
    if cls != OpClass.CAT or wn.name not in ("cat", "concat", "concatenate") or not wn.outputs:
        return False
    rank = len(wn.outputs[0].shape)
    return (
        rank >= 3
        and cat_dim(wn) == rank - 2
        and len(wn.inputs) >= 2
        and all(len(t.shape) == rank or t.numel == 0 for t in wn.inputs)
    )


_CACHE_WRITES = frozenset(
    {
        "index_copy_",
        "index_copy",
        "index_put_",
        "_index_put_impl_",
        "copy_",
        "scatter_",
        "slice_scatter",
    }
)
SCORE_OPS = frozenset({"bmm", "matmul", "baddbmm", "einsum"})


def feeds_softmax(gv: GraphView, nid: int) -> bool:
    """Whether a softmax follows within two steps (scale, mask add)."""
    cls = gv.cls
    for s in gv.succs[nid]:
        if cls[s] == OpClass.SOFTMAX:
            return True
        for s2 in gv.succs[s]:
            if cls[s2] == OpClass.SOFTMAX:
                return True
    return False


def _scores(gv: GraphView, n, info_of) -> bool:
    """A batched matmul computing attention scores: recorded inside an attention module, or
    followed by a softmax within two steps."""
    if n.context and info_of(n.context).in_attention:
        return True
    return feeds_softmax(gv, n.id)
