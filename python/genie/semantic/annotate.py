"""Tier 3: stamp every node with what it means.

One pass in program order writes ``module_path``, ``module_type``, ``layer_depth``
(``layer_index``), ``semantic_role``, ``modality`` and ``data_residency`` into ``node.meta``;
``lineage`` is written at fusion points. ``execution_phase`` is the phase detector's
(genie.semantic.phases), which runs on top of this pass.

Note: [Residency of graph inputs]
A storage the graph reads before writing is either a weight (a parameter or buffer of the
model, recognised through the model when the analyzer has it, otherwise by being read where
an op takes its weight -- addmm's bias and matrix, convolution's filter, an embedding table, a
norm's affine -- or by requiring grad), a stateful KV cache (concatenated along the sequence
dimension into the keys/values of an attention, or written in place before attention reads
it), or an ephemeral input (token ids, pixels). Views inherit the residency of what they view.

Modalities of data inputs and their lineage bits: genie.semantic.input_kinds (Note:
[Modality by lineage]).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from genie.semantic.graph_utils import GraphView, OpClass
from genie.semantic.input_kinds import (
    CATEGORICAL,
    MODALITY_BITS,
    PERCEPTUAL,
    TABULAR,
    TEXT,
    input_kinds,
    mixes_positions,
    positional,
    two_lookups,
)
from genie.semantic.input_kinds import (
    label as modality_label,
)
from genie.semantic.kv_cache import SCORE_OPS, feeds_softmax, find_state
from genie.semantic.role_evidence import refine_roles
from genie.semantic.roles import NO_CONTEXT, ContextInfo, op_role, role_in_context
from genie.semantic.vocab import Modality, Residency, Role

logger = logging.getLogger(__name__)

__all__ = ["Annotations", "annotate", "MODALITY_BITS"]


# which positions of node.inputs are weights for ops that take weights
_WEIGHT_POS = {
    "addmm": (0, 2),
    "linear": (1, 2),
    "mm": (1,),
    "convolution": (1, 2),
    "_convolution": (1, 2),
    "conv2d": (1, 2),
    "conv1d": (1, 2),
    "conv3d": (1, 2),
    "embedding": (0,),
    "_embedding_bag": (0,),
    "embedding_bag": (0,),
    "_embedding_bag_forward_only": (0,),
    "native_layer_norm": (1, 2),
    "layer_norm": (1, 2),
    "native_batch_norm": (1, 2, 3, 4),
    "_native_batch_norm_legit_no_training": (1, 2, 3, 4),
    "_native_batch_norm_legit": (1, 2, 3, 4),
    "batch_norm": (1, 2, 3, 4),
    "native_group_norm": (1, 2),
    "group_norm": (1, 2),
    "rms_norm": (1,),
    "_fused_rms_norm": (1,),
}
_GENERIC_ROLES = {Role.LINEAR, Role.ELEMENTWISE, Role.OTHER, Role.REDUCTION, Role.VIEW, Role.MLP}
_WEIGHT_ROLES = {
    Role.TOKEN_EMBEDDING,
    Role.POSITION_EMBEDDING,
    Role.SEGMENT_EMBEDDING,
    Role.EMBEDDING,
    Role.EMBEDDING_BAG,
}


@dataclass
class Annotations:
    """What tier 3 found, besides what it wrote into node.meta."""

    residency: dict[int, str] = field(default_factory=dict)  # graph-input storage -> residency
    kv_cache_nodes: list[int] = field(default_factory=list)  # cat / in-place cache writers
    kv_cache_storages: list[int] = field(default_factory=list)  # resident caches read
    kv_cache_bytes: int = 0
    attention: list[tuple[int, int, int]] = field(default_factory=list)  # (node, q len, kv len)
    causal: bool = False
    fusion_points: list[int] = field(default_factory=list)
    fusion_modules: list[str] = field(default_factory=list)
    roles: Counter = field(default_factory=Counter)
    modalities: Counter = field(default_factory=Counter)
    context_coverage: float = 0.0  # fraction of non-view nodes recorded inside a module
    modules: Counter = field(default_factory=Counter)  # module path -> nodes
    batch_size: int | None = None
    weight_bytes: int = 0
    weight_count: int = 0
    input_modalities: dict[int, str] = field(default_factory=dict)
    new_tokens: int | None = None  # length of the token-id inputs: the tokens this call adds
    sequence_mixing: bool = False  # something mixes positions (attention, token+position)


def annotate(
    gv: GraphView,
    info_of: Callable[[int], ContextInfo],
    param_storages: set[int] | frozenset = frozenset(),
) -> Annotations:
    """Write module context, role, modality and residency into every node of ``gv.graph``."""
    ann = Annotations()
    graph = gv.graph
    nodes = gv.nodes
    cls_of = gv.cls
    views = gv.views
    input_set = gv.input_set
    constants = graph.constants

    # -- graph inputs: weights first (see Note: [Residency of graph inputs]) ----------------
    residency: dict[int, str] = {}
    first_meta = {}
    written: set[int] = set()
    names = gv.names
    for n in nodes:
        pos = _WEIGHT_POS.get(names[n.id])
        for i, t in enumerate(n.inputs):
            s = t.storage
            if s in written or s not in input_set:
                continue
            if s not in first_meta:
                first_meta[s] = t
            if s in residency:
                continue
            if (
                s in param_storages
                or (t.requires_grad and t.dtype.is_floating_point)
                or (pos is not None and i in pos and t.dtype.is_floating_point)
            ):
                residency[s] = Residency.PERSISTENT_WEIGHT
        written.update(n.fresh)
        written.update(n.writes)
    for s, t in first_meta.items():
        if residency.get(s) == Residency.PERSISTENT_WEIGHT:
            ann.weight_count += 1
            ann.weight_bytes += t.storage_nbytes or t.nbytes

    # -- KV caches and other state kept across calls (genie.semantic.kv_cache) -------------
    kv_nodes, kv_storages, kv_out = find_state(gv, info_of, residency, first_meta)
    pos_of = gv.pos
    for s in kv_storages:
        residency[s] = Residency.STATEFUL_KV_CACHE
        t = first_meta.get(s)
        if t is not None:
            ann.kv_cache_bytes += t.storage_nbytes or t.nbytes
    ann.kv_cache_nodes = list(kv_nodes)
    ann.kv_cache_storages = list(kv_storages)

    # -- what each data input is, from its most telling consumer -----------------------------
    ann.sequence_mixing = mixes_positions(gv, residency)
    source = input_kinds(gv, info_of, residency, constants, ann.sequence_mixing)

    # -- the main pass -----------------------------------------------------------------------
    levels = gv.levels()
    storage_res = dict(residency)
    for s in kv_out:
        storage_res[s] = Residency.STATEFUL_KV_CACHE
    mask: dict[int, int] = {}  # storage -> modality bits
    node_mask: dict[int, int] = {}
    writer: dict[int, int] = {}
    first_reader: dict[int, int] = {}  # storage with no modality -> first non-view reader
    role_of: dict[int, str] = {}
    mha_state: dict[int, bool] = {}
    infos: dict[int, ContextInfo] = {}
    in_module = 0
    computing = 0
    fusion_points: list[int] = []
    causal = False
    EPH = Residency.EPHEMERAL_ACTIVATION
    WEIGHT = Residency.PERSISTENT_WEIGHT

    for n in nodes:
        nid = n.id
        cid = n.context
        info = infos.get(cid)
        if info is None:
            info = info_of(cid) if cid else NO_CONTEXT
            infos[cid] = info
        c = cls_of[nid]
        meta = n.meta
        is_view = nid in views
        if info is not NO_CONTEXT:
            meta["module_path"] = info.path
            meta["module_type"] = info.type
            meta["layer_depth"] = info.depth
            if info.layer_index is not None:
                meta["layer_index"] = info.layer_index
            if not is_view:
                in_module += 1
                ann.modules[info.path] += 1
        if not is_view:
            computing += 1

        # residency of the output
        ins = n.inputs
        if n.outputs:
            a = n.output_alias[0] if n.output_alias else -1
            if a >= 0 and a < len(ins):
                res = storage_res.get(ins[a].storage, EPH)
            elif nid in kv_nodes:
                res = Residency.STATEFUL_KV_CACHE
            else:
                res = EPH
        else:
            res = storage_res.get(n.writes[0], EPH) if n.writes else EPH
        meta["data_residency"] = res

        # role
        if info is NO_CONTEXT:
            if is_view and res == WEIGHT:
                role = Role.WEIGHT
            else:
                role = op_role(c)
        else:
            after = False
            if info.kind == "mha":
                if c in (OpClass.ATTENTION, OpClass.SOFTMAX):
                    mha_state[cid] = True
                elif c == OpClass.MATMUL and mha_state.get(cid):
                    after = True
                    mha_state[cid] = False
            role = role_in_context(info, c, after)
        if nid in kv_nodes:
            role = Role.KV_CACHE_UPDATE
        elif c == OpClass.ATTENTION:
            if role not in (Role.ATTENTION, Role.CROSS_ATTENTION):
                role = Role.CROSS_ATTENTION if info.in_cross_attention else Role.ATTENTION
            q, k = ins[0].shape, ins[1].shape if len(ins) > 1 else ins[0].shape
            if len(q) >= 2 and len(k) >= 2:
                ann.attention.append((nid, q[-2], k[-2]))
            for kind, v in n.args:
                if kind == "value" and isinstance(v, bool):
                    causal = causal or v
                    break
        elif names[nid] in ("tril", "triu") and n.outputs and _square(n.outputs[0].shape):
            causal = True  # a triangular mask over query x key positions (decomposed SDPA)
        elif (
            c == OpClass.MATMUL and names[nid] in SCORE_OPS and n.outputs and feeds_softmax(gv, nid)
        ):
            # eager attention: the scores matmul's output is [..., query, key]
            out = n.outputs[0].shape
            if len(out) >= 2:
                ann.attention.append((nid, out[-2], out[-1]))
        elif c == OpClass.ADD and not is_view and info.leaf_role is None and len(ins) >= 2:
            role = _residual(n, ins, writer, levels, storage_res, role_of, role)
        role_of[nid] = role
        meta["semantic_role"] = role

        # modality by lineage (see Note: [Modality by lineage])
        m = 0
        single = False
        for t in ins:
            s = t.storage
            bits = mask.get(s)
            if bits is None:
                if (
                    not is_view
                    and s in input_set
                    and s not in writer
                    and storage_res.get(s) is None
                ):
                    bits = source.get(s, 0)
                    mask[s] = bits
                    if bits:
                        ann.input_modalities[s] = modality_label(bits)
                else:
                    bits = 0
                    if not is_view and s not in first_reader:
                        first_reader[s] = nid
            if bits & PERCEPTUAL and (bits & PERCEPTUAL) & ((bits & PERCEPTUAL) - 1):
                single = True  # one input already carries a fusion
            m |= bits
        p = m & PERCEPTUAL
        if p & (p - 1) and c == OpClass.ADD and not single:
            m = positional(gv, n, m, mask, writer, node_mask, ann.input_modalities)
        node_mask[nid] = m
        if not is_view:
            p = m & PERCEPTUAL
            if p & (p - 1) and not single:
                fusion_points.append(nid)
            reads_weight = any(storage_res.get(t.storage) == WEIGHT for t in ins)
            if (
                role in _GENERIC_ROLES
                and not reads_weight
                and m & CATEGORICAL
                and not p
                and (m & TABULAR or two_lookups(ins, mask, writer))
            ):
                # dense and sparse features, or two lookups' values, meeting outside an MLP
                # layer (a concatenation, a product): the feature interaction
                role = Role.FEATURE_INTERACTION
                role_of[nid] = role
                meta["semantic_role"] = role
            for s in n.fresh:
                mask[s] = m
                writer[s] = nid
            for s in n.writes:
                mask[s] = mask.get(s, 0) | m
                writer[s] = nid

    # -- roles the dataflow shows where names said nothing (genie.semantic.role_evidence) ----
    refine_roles(
        gv,
        role_of,
        {nid for nid, m in node_mask.items() if m & TEXT},
        {s for s, r in residency.items() if r == WEIGHT},
    )

    # -- modality labels, back-filled along consumers -----------------------------------------
    succs = gv.succs
    label: dict[int, str | None] = {}
    for n in reversed(nodes):
        nid = n.id
        m = node_mask[nid]
        if m:
            label[nid] = modality_label(m)
            continue
        got = None
        for sc in succs[nid]:
            got = label.get(sc)
            if got is not None:
                break
        if got is None and n.inputs:
            r = first_reader.get(n.inputs[0].storage)
            if r is not None and r != nid:
                got = label.get(r)
        label[nid] = got
    prev = None
    for n in nodes:
        lab = label[n.id]
        if lab is None:
            # nothing consumes it (an empty reserve buffer): its module's hint, else its
            # neighbour in program order
            lab = infos[n.context].modality_hint or prev or Modality.NONE
        elif lab != Modality.NONE:
            prev = lab
        n.meta["modality"] = lab
        ann.modalities[lab] += 1
        ann.roles[n.meta["semantic_role"]] += 1

    # -- lineage at fusion points --------------------------------------------------------------
    for fid in fusion_points:
        fn = nodes[pos_of[fid]]
        info = infos[fn.context]
        fn.meta["lineage"] = _lineage(gv, fn, node_mask, infos, info.branch)
        mod = info.attention_path or info.fusion_path or info.path
        if mod and mod not in ann.fusion_modules:
            ann.fusion_modules.append(mod)
    ann.fusion_points = fusion_points
    ann.residency = residency
    ann.causal = causal
    ann.context_coverage = in_module / computing if computing else 0.0
    ann.batch_size = _batch_size(first_meta, residency)
    ann.new_tokens = max(
        (
            first_meta[s].shape[-1]
            for s, lab in ann.input_modalities.items()
            if lab == Modality.TEXT and s in first_meta and len(first_meta[s].shape) >= 2
        ),
        default=None,
    )
    return ann


def _square(shape) -> bool:
    return len(shape) >= 2 and shape[-1] == shape[-2] > 1


def _residual(n, ins, writer, levels, storage_res, role_of, role: str) -> str:
    """An add of two activations of one shape whose producers sit at least three levels apart
    is a skip connection; embedding sums (token + position) are not."""
    a, b = ins[0], ins[1]
    if a.shape != b.shape:
        return role
    if storage_res.get(a.storage) or storage_res.get(b.storage):
        return role  # a weight or cache operand: a bias add, not a skip
    pa, pb = writer.get(a.storage), writer.get(b.storage)
    if pa is None or pb is None:
        return role
    if role_of.get(pa) in _WEIGHT_ROLES or role_of.get(pb) in _WEIGHT_ROLES:
        return role
    if abs(levels[pa] - levels[pb]) >= 3:
        return Role.RESIDUAL_ADD
    return role


def _lineage(gv: GraphView, fn, node_mask: dict[int, int], infos, own_branch: str) -> dict:
    """Which branches meet at a fusion point: per modality, the nodes feeding it directly,
    the top-level modules its ancestors ran in and how many ancestor nodes it has."""
    sources: dict[str, list[int]] = {}
    for p in gv.preds[fn.id]:
        lab = modality_label(node_mask[p])
        sources.setdefault(lab, []).append(p)
    nodes = gv.nodes
    pos = gv.pos
    branches: dict[str, set[str]] = {}
    sizes: dict[str, int] = {}
    for lab, ids in sources.items():
        seen: set[int] = set()
        stack = list(ids)
        mods: set[str] = set()
        while stack:
            x = stack.pop()
            if x in seen:
                continue
            seen.add(x)
            info = infos.get(nodes[pos[x]].context)
            if info is not None and info.branch and info.branch != own_branch:
                mods.add(info.branch)
            stack.extend(gv.preds[x])
        branches[lab] = mods
        sizes[lab] = len(seen)
    return {
        "fusion_of": sorted(lab for lab in sources if lab in Modality.PERCEPTUAL),
        "sources": {k: sorted(v) for k, v in sources.items()},
        "branches": {k: sorted(v) for k, v in branches.items()},
        "ancestors": sizes,
    }


def _batch_size(first_meta, residency) -> int | None:
    for s, t in first_meta.items():
        if s not in residency and t.shape and t.numel > 1:
            return int(t.shape[0])
    return None
