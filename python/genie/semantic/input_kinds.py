"""What each data input of a graph is, and the modality bits that flow from it.

Note: [Modality by lineage]
Non-weight inputs are sources: token ids into an embedding are text, 4-D floats into a
convolution are vision, ids into an embedding bag are categorical, other floats into a
linear layer are tabular; module names break ties. A node's modality is the union of its
inputs' (a bit mask, so one integer OR per input). A node whose inputs carry two perceptual
modalities (text, vision, audio) while no single input does is a fusion point; everything
downstream of it is ``fusion``. Nodes no source reaches (weights, ``arange`` positions) take the
modality of the first node that consumes them.

A data input is read from its most telling consumer (an embedding lookup over an
elementwise mask, a convolution over a normalisation), following ids through copies and
edits. Ids are tokens only where something mixes the positions of a sequence (attention, a
convolution, a product of two activations, token plus position embeddings); otherwise, or
one id per example, they are categorical fields. A lookup added straight onto another
modality's stream is that stream's position embedding, not a second modality.
"""

from __future__ import annotations

import torch

from genie.semantic.graph_utils import GraphView, OpClass
from genie.semantic.roles import NO_CONTEXT, ContextInfo
from genie.semantic.vocab import Modality, Role

__all__ = [
    "MODALITY_BITS",
    "PERCEPTUAL",
    "input_kinds",
    "label",
    "mixes_positions",
    "positional",
    "two_lookups",
]

TEXT, VISION, AUDIO, TABULAR, CATEGORICAL = 1, 2, 4, 8, 16
PERCEPTUAL = TEXT | VISION | AUDIO
MODALITY_BITS = {
    Modality.TEXT: TEXT,
    Modality.VISION: VISION,
    Modality.AUDIO: AUDIO,
    Modality.TABULAR: TABULAR,
    Modality.CATEGORICAL: CATEGORICAL,
}
_SINGLE = {TEXT: Modality.TEXT, VISION: Modality.VISION, AUDIO: Modality.AUDIO}


def label(bits: int) -> str:
    p = bits & PERCEPTUAL
    if p:
        return _SINGLE.get(p, Modality.FUSION)
    if bits & TABULAR:
        return Modality.TABULAR
    if bits & CATEGORICAL:
        return Modality.CATEGORICAL
    return Modality.NONE


_SEQUENCE_MIXING = frozenset({OpClass.ATTENTION, OpClass.SOFTMAX, OpClass.CONV})
# how much a consumer of a data input tells about what the input is
_TELLING = {
    OpClass.EMBEDDING_BAG: 5,
    OpClass.EMBEDDING: 4,
    OpClass.CONV: 3,
    OpClass.MATMUL: 2,
    OpClass.NORM: 1,
}


def input_kinds(
    gv: GraphView, info_of, residency: dict[int, str], constants, mixing: bool
) -> dict[int, int]:
    """Modality bits of every data input (not a weight, not a cache), read from the consumer
    that tells most about it: token ids are what an embedding looks up even when a mask is
    computed from them first, or they are copied and edited before the lookup; pixels are
    what a convolution reads even after a normalisation. See Note: [Modality by lineage]."""
    best: dict[int, tuple[int, object, str, object]] = {}
    origin: dict[int, int] = {}  # integer storage derived from a data input -> that input
    views = gv.views
    cls_of = gv.cls
    inputs = gv.input_set
    for n in gv.nodes:
        c = cls_of[n.id]
        rank = 0 if n.id in views else _TELLING.get(c, 0)
        sources = set()
        for t in n.inputs:
            s = t.storage
            src = origin.get(s, s if s in inputs and s not in residency else None)
            if src is None:
                continue
            sources.add(src)
            have = best.get(src)
            if have is None or rank > have[0]:
                best[src] = (rank, n, c, t)
        if sources and n.id not in views:
            # ids copied, masked or edited keep being the same ids
            src = min(sources)
            for o in n.outputs:
                if not o.dtype.is_floating_point and o.dtype != torch.bool:
                    origin[o.storage] = src
            for s in n.writes:
                origin.setdefault(s, src)
    out = {}
    # nothing mixes the positions of a sequence (no attention, convolution): looked-up ids
    # are a set of categorical fields, not tokens (a factorisation machine's shared table)
    for s, (_, n, c, t) in best.items():
        info = info_of(n.context) if n.context else NO_CONTEXT
        out[s] = _source_bits(n, c, t, info, constants)
        if out[s] == TEXT and c == OpClass.EMBEDDING and not mixing:
            out[s] = CATEGORICAL
    # ids looked up in a table that categorical ids also index are categorical too (a
    # user's history of item ids next to the candidate item's id)
    by_table: dict[int, set[int]] = {}
    for n in gv.nodes:
        if cls_of[n.id] == OpClass.EMBEDDING and len(n.inputs) > 1:
            ids = n.inputs[1].storage
            src = origin.get(ids, ids)
            if src in out:
                by_table.setdefault(_table_key(n.inputs[0].storage, constants), set()).add(src)
    for srcs in by_table.values():
        if len(srcs) > 1 and any(out[x] == CATEGORICAL for x in srcs):
            for x in srcs:
                out[x] = CATEGORICAL
    return out


def mixes_positions(gv: GraphView, residency: dict[int, str]) -> bool:
    """Whether anything mixes the positions of a sequence: attention, a softmax, a
    convolution, a product of two activations (scores without a softmax), or lookups added
    together (token plus position embeddings)."""
    cls_of = gv.cls
    writer: dict[int, int] = {}
    for n in gv.nodes:
        c = cls_of[n.id]
        if c in _SEQUENCE_MIXING:
            return True
        if (
            c == OpClass.MATMUL
            and len(n.inputs) >= 2
            and n.id not in gv.views
            and not any(t.storage in residency for t in n.inputs)
        ):
            return True
        if (
            c == OpClass.ADD
            and len(n.inputs) >= 2
            and all(
                cls_of.get(writer.get(t.storage, -1)) == OpClass.EMBEDDING for t in n.inputs[:2]
            )
        ):
            return True
        for o in n.outputs:
            writer.setdefault(o.storage, n.id)
    return False


def two_lookups(ins, mask: dict[int, int], writer: dict[int, int]) -> bool:
    """Two inputs of categorical values from different producers (a product of two fields'
    embeddings, a factorisation machine's square of sums minus sum of squares)."""
    producers = {writer.get(t.storage) for t in ins if mask.get(t.storage, 0) & CATEGORICAL}
    producers.discard(None)
    return len(producers) >= 2


def _table_key(storage: int, constants) -> int:
    """One key per table: a CPU weight uploaded as a constant for each use is one table."""
    c = constants.get(storage)
    return c.untyped_storage().data_ptr() if c is not None else storage


def positional(
    gv: GraphView,
    n,
    m: int,
    mask: dict[int, int],
    writer: dict[int, int],
    node_mask: dict[int, int],
    input_modalities: dict[int, str],
) -> int:
    """An add of a lookup of ids straight onto another modality's stream is that stream's
    position (or type) embedding, not a second modality meeting it: the patch embeddings
    of an image plus ``position_embedding(position_ids)``. Fusion happens in attention,
    concatenation, products and scatters, not in such an add."""
    cls_of = gv.cls
    lookups = []
    others = 0
    for t in n.inputs:
        bits = mask.get(t.storage, 0) & PERCEPTUAL
        w = writer.get(t.storage)
        if bits == TEXT and w is not None and cls_of.get(w) == OpClass.EMBEDDING:
            lookups.append((t.storage, w))
        else:
            others |= bits
    if not lookups or not others or others & (others - 1):
        return m
    for s, w in lookups:  # the lookup belongs to the stream it is added to
        mask[s] = node_mask[w] = (node_mask.get(w, 0) & ~PERCEPTUAL) | others
        for t in gv.nodes[gv.pos[w]].inputs[1:]:
            if input_modalities.get(t.storage) == Modality.TEXT:
                input_modalities[t.storage] = label(others)
                mask[t.storage] = others
    return (m & ~PERCEPTUAL) | others


def _source_bits(n, c: str, t, info: ContextInfo, constants) -> int:
    """Modality of a non-weight graph input from the op that tells most about it."""
    hint = info.modality_hint
    if c == OpClass.EMBEDDING_BAG:
        return CATEGORICAL
    if c == OpClass.EMBEDDING:
        if hint == Modality.CATEGORICAL or info.recsys_part is not None:
            return CATEGORICAL
        if len(t.shape) <= 1 and hint != Modality.TEXT:
            return CATEGORICAL  # one id per example: a categorical feature, not a sequence
        if info.leaf_role == Role.EMBEDDING and hint not in (Modality.TEXT, None):
            return MODALITY_BITS.get(hint, CATEGORICAL)
        return TEXT
    floating = t.dtype.is_floating_point
    rank = len(t.shape)
    if c == OpClass.CONV and floating:
        if hint in (Modality.AUDIO, Modality.TEXT):
            return MODALITY_BITS[hint]
        return VISION if rank >= 4 else AUDIO
    if hint == Modality.CATEGORICAL or info.recsys_part is not None:
        return TABULAR if floating else CATEGORICAL
    if hint is not None and hint in MODALITY_BITS:
        if floating or hint == Modality.TEXT:
            return MODALITY_BITS[hint]
    if floating and (c == OpClass.MATMUL or (rank <= 2 and c in (OpClass.CAT, OpClass.NORM))):
        return TABULAR  # dense features: into a linear layer, or joined/normalised first
    if floating and rank == 4 and t.shape[1] in (3, 4) and min(t.shape[2:]) >= 8:
        # an RGB(A) NCHW image no convolution reads (patches cut by reshapes); a 1-channel
        # 4-d float is as often rotary cos/sin tables as a grey image: no evidence
        return VISION
    return 0
