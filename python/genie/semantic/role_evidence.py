"""Roles from what ops compute, where module names said nothing.

Module names give most roles (genie.semantic.roles), but names vary: OPT's feed-forward
layers sit directly in the decoder layer as ``fc1``/``fc2``, GPT-NeoX calls its token table
``embed_in``, and a graph recorded without module hooks has no names at all. This pass runs
after the module rules and only upgrades generic roles (``linear``, ``mlp``, ``embedding``,
``activation``), from dataflow evidence:

- FFN: a linear layer widening its input, an activation (or a gate product) within two
  steps, and a linear layer back to the input width: ``ffn_up``, ``ffn_activation``,
  ``ffn_down``.
- token embedding: a lookup whose ids are a token sequence (a text data input).
- LM head: a linear layer whose output width is the row count of a token table -- logits
  over the vocabulary.
"""

from __future__ import annotations

from genie.semantic.graph_utils import GraphView, OpClass
from genie.semantic.vocab import Role

__all__ = ["refine_roles"]

_GENERIC_LINEAR = frozenset({Role.LINEAR, Role.MLP})
_GATES = frozenset({OpClass.ACT, OpClass.ELEMENTWISE})


def _width_in(n, weights: set[int]) -> int | None:
    """Input feature width of a linear-like node (its activation's last dimension)."""
    for t in n.inputs:
        if len(t.shape) >= 2 and t.storage not in weights:
            return t.shape[-1]
    return None


def _out_width(n) -> int | None:
    return n.outputs[0].shape[-1] if n.outputs and len(n.outputs[0].shape) else None


def refine_roles(
    gv: GraphView, role_of: dict[int, str], text_nodes: set[int], weight_storages: set[int]
) -> int:
    """Upgrade generic roles in ``role_of`` (node id -> role) and the nodes' meta; returns how
    many nodes changed. ``text_nodes``: nodes carrying the text modality; ``weight_storages``:
    graph inputs that are weights."""
    nodes = gv.nodes
    pos = gv.pos
    cls = gv.cls
    succs = gv.succs
    changed = 0

    def set_role(nid: int, role: str) -> None:
        nonlocal changed
        role_of[nid] = role
        nodes[pos[nid]].meta["semantic_role"] = role
        changed += 1

    # token tables: lookups of a text sequence
    vocab: set[int] = set()
    for n in nodes:
        if cls[n.id] != OpClass.EMBEDDING or not n.inputs:
            continue
        table = n.inputs[0]
        if n.id in text_nodes and len(n.inputs) > 1 and len(n.inputs[1].shape) >= 2:
            if role_of.get(n.id) == Role.EMBEDDING:
                set_role(n.id, Role.TOKEN_EMBEDDING)
            if role_of.get(n.id) == Role.TOKEN_EMBEDDING and len(table.shape) == 2:
                vocab.add(table.shape[0])

    for n in nodes:
        nid = n.id
        if cls[nid] != OpClass.MATMUL or role_of.get(nid) not in _GENERIC_LINEAR or not n.outputs:
            continue
        out_w = _out_width(n)
        reads_weight = any(t.storage in weight_storages for t in n.inputs)
        if not reads_weight or out_w is None:
            continue
        if out_w in vocab and nid in text_nodes:
            set_role(nid, Role.LM_HEAD)
            continue
        in_w = _width_in(n, weight_storages)
        if in_w is None or out_w <= in_w:
            continue
        # widening: look for activation then a linear layer back to in_w within two steps
        for a in succs[nid]:
            if cls[a] not in _GATES:
                continue
            for d in [*succs[a], *(x for s in succs[a] if cls[s] in _GATES for x in succs[s])]:
                dn = nodes[pos[d]]
                if (
                    cls[d] == OpClass.MATMUL
                    and role_of.get(d) in _GENERIC_LINEAR
                    and _out_width(dn) == in_w
                    and any(t.storage in weight_storages for t in dn.inputs)
                ):
                    set_role(nid, Role.FFN_UP)
                    if role_of.get(a) in (Role.ACTIVATION, Role.ELEMENTWISE, None):
                        set_role(a, Role.FFN_ACTIVATION)
                    set_role(d, Role.FFN_DOWN)
                    break
            if role_of.get(nid) == Role.FFN_UP:
                break
    return changed
