"""The built-in patterns: LLM, attention, vision, residual block, recommender, multimodal
fusion. Each is predicates plus NetworkX templates; hints are what the scheduler can act on.
"""

from __future__ import annotations

from typing import Any

from genie.semantic.graph_utils import OpClass as C
from genie.semantic.patterns.base import (
    PatternContext,
    PredicatePattern,
    Template,
    any_chain,
    architecture_in,
    chain,
    has_modality,
    has_op_class,
    has_role,
    has_subgraph,
    negate,
)
from genie.semantic.patterns.structure_prior import StructurePrior
from genie.semantic.vocab import Modality, Role, WorkloadType

__all__ = ["builtin_patterns", "TEMPLATES"]

_ANY_ACT = frozenset({C.ACT, C.ADD, C.POOL, C.NORM, C.CONV, C.ELEMENTWISE, C.COPY, C.OTHER})
_SRC = frozenset({C.ADD, C.NORM, C.EMBEDDING, C.ELEMENTWISE, C.ACT, C.MATMUL, C.OTHER, C.COPY})

ATTENTION_FUSED = Template(
    "attention_fused",
    {"proj": C.MATMUL, "core": C.ATTENTION, "out": C.MATMUL},
    (("proj", "core"), ("core", "out")),
    anchor="core",
)
ATTENTION_EAGER = Template(
    "attention_eager",
    {"scores": C.MATMUL, "softmax": C.SOFTMAX, "mix": C.MATMUL},
    (("scores", "softmax"), ("softmax", "mix")),
    anchor="softmax",
)
ATTENTION_EAGER_MASKED = Template(
    "attention_eager_masked",
    {
        "scores": C.MATMUL,
        "scale": frozenset({C.ELEMENTWISE, C.ADD}),
        "softmax": C.SOFTMAX,
        "mix": C.MATMUL,
    },
    (("scores", "scale"), ("scale", "softmax"), ("softmax", "mix")),
    anchor="softmax",
)
FFN = Template(
    "ffn",
    {"up": C.MATMUL, "act": C.ACT, "down": C.MATMUL},
    (("up", "act"), ("act", "down")),
    anchor="up",
)
# A residual block's main path: conv, norm, act, conv, norm, into the add; the shortcut is
# either the block's input itself (basic) or a projection of it (conv + norm: projection).
_RESIDUAL_MAIN = {
    "src": _ANY_ACT,
    "c1": C.CONV,
    "n1": C.NORM,
    "a1": C.ACT,
    "c2": C.CONV,
    "n2": C.NORM,
    "add": C.ADD,
}
_RESIDUAL_MAIN_EDGES = (
    ("src", "c1"),
    ("c1", "n1"),
    ("n1", "a1"),
    ("a1", "c2"),
    ("c2", "n2"),
    ("n2", "add"),
)
RESIDUAL_BASIC = Template(
    "residual_basic",
    _RESIDUAL_MAIN,
    (*_RESIDUAL_MAIN_EDGES, ("src", "add")),
    anchor="add",
)
RESIDUAL_PROJECTION = Template(
    "residual_projection",
    {**_RESIDUAL_MAIN, "cd": C.CONV, "nd": C.NORM},
    (*_RESIDUAL_MAIN_EDGES, ("src", "cd"), ("cd", "nd"), ("nd", "add")),
    anchor="add",
)
RESIDUAL_ATTENTION_PRENORM = Template(
    "residual_attention_prenorm",
    {
        "src": _SRC,
        "norm": C.NORM,
        "proj": C.MATMUL,
        "core": C.ATTENTION,
        "out": C.MATMUL,
        "add": C.ADD,
    },
    (
        ("src", "norm"),
        ("norm", "proj"),
        ("proj", "core"),
        ("core", "out"),
        ("out", "add"),
        ("src", "add"),
    ),
    anchor="add",
)
RESIDUAL_ATTENTION_POSTNORM = Template(
    "residual_attention_postnorm",
    {"src": _SRC, "proj": C.MATMUL, "core": C.ATTENTION, "out": C.MATMUL, "add": C.ADD},
    (("src", "proj"), ("proj", "core"), ("core", "out"), ("out", "add"), ("src", "add")),
    anchor="add",
)
RECSYS_INTERACTION = Template(
    "recsys_interaction",
    {
        "emb": frozenset({C.EMBEDDING_BAG, C.EMBEDDING}),
        "dense": frozenset({C.MATMUL, C.ACT}),
        "join": C.CAT,
    },
    (("emb", "join"), ("dense", "join")),
    anchor="join",
)
CROSS_MODAL_ATTENTION = Template(
    "cross_modal_attention",
    {"q": C.MATMUL, "kv": C.MATMUL, "core": frozenset({C.ATTENTION, C.MATMUL})},
    (("q", "core"), ("kv", "core")),
    anchor="core",
    modality={"q": Modality.TEXT, "kv": Modality.VISION},
)

TEMPLATES = (
    ATTENTION_FUSED,
    ATTENTION_EAGER,
    ATTENTION_EAGER_MASKED,
    FFN,
    RESIDUAL_BASIC,
    RESIDUAL_PROJECTION,
    RESIDUAL_ATTENTION_PRENORM,
    RESIDUAL_ATTENTION_POSTNORM,
    RECSYS_INTERACTION,
    CROSS_MODAL_ATTENTION,
)

_attention_ops = has_op_class(C.ATTENTION, C.SOFTMAX)
_attention_shape = has_subgraph(
    ATTENTION_FUSED, ATTENTION_EAGER, ATTENTION_EAGER_MASKED, fallback=_attention_ops
)
_ffn = any_chain(has_role(Role.FFN_UP), has_subgraph(FFN))
_text_tokens = any_chain(
    has_role(Role.TOKEN_EMBEDDING), chain(has_op_class(C.EMBEDDING), has_modality(Modality.TEXT))
)
_residual_transformer = has_subgraph(
    RESIDUAL_ATTENTION_PRENORM, RESIDUAL_ATTENTION_POSTNORM, fallback=has_role(Role.RESIDUAL_ADD)
)
_residual_conv = has_subgraph(
    RESIDUAL_BASIC,
    RESIDUAL_PROJECTION,
    fallback=chain(has_op_class(C.CONV, at_least=2), has_role(Role.RESIDUAL_ADD)),
)


def _kv(ctx: PatternContext) -> bool:
    return bool(ctx.annotations.kv_cache_nodes)


def _mostly(modality: str, share: float):
    def p(ctx: PatternContext) -> bool:
        computing = ctx.stats.compute_nodes or 1
        return (
            ctx.count_modality(modality) / max(len(ctx.graph.nodes), 1) >= share and computing > 0
        )

    p.__name__ = f"modality[{modality}]>={share:.0%}"
    return p


def _llm_hints(ctx: PatternContext) -> dict[str, Any]:
    ann = ctx.annotations
    layers = len(ann.attention) or ctx.count_class(C.SOFTMAX)
    decoder = (
        bool(ann.kv_cache_nodes)
        or ann.causal
        or ctx.architecture in ("transformer_decoder", "transformer_seq2seq")
    )
    q = max((q for _, q, _ in ann.attention), default=None)
    k = max((k for _, _, k in ann.attention), default=None)
    rec = ["keep_weights_resident"]
    if decoder:
        rec += ["colocate_kv_cache_with_decode", "batch_decode_steps"]
    if q is not None and q > 1:
        rec.append("prefill_compute_bound")
    return {
        "decoder": decoder,
        "attention_layers": layers,
        "kv_cache": bool(ann.kv_cache_nodes),
        "kv_cache_resident_bytes": ann.kv_cache_bytes,
        "query_len": q,
        "kv_len": k,
        "weight_bytes": ann.weight_bytes,
        "recommendations": rec,
    }


def _attention_hints(ctx: PatternContext) -> dict[str, Any]:
    ann = ctx.annotations
    return {
        "fused_kernel": ctx.count_class(C.ATTENTION) > 0,
        "attention_ops": len(ann.attention) or ctx.count_class(C.SOFTMAX),
        "max_query_len": max((q for _, q, _ in ann.attention), default=None),
        "max_kv_len": max((k for _, _, k in ann.attention), default=None),
    }


def _vision_hints(ctx: PatternContext) -> dict[str, Any]:
    return {
        "conv_ops": ctx.count_class(C.CONV),
        "vision_nodes": ctx.count_modality(Modality.VISION),
        "patch_embedding": ctx.count_role(Role.PATCH_EMBEDDING) > 0,
        "batch_size": ctx.annotations.batch_size,
        "recommendations": ["batch_images", "fuse_conv_bn", "channels_last"]
        if ctx.count_class(C.CONV) > 1
        else ["batch_images"],
    }


def _audio_hints(ctx: PatternContext) -> dict[str, Any]:
    return {
        "conv_ops": ctx.count_class(C.CONV),
        "audio_nodes": ctx.count_modality(Modality.AUDIO),
        "attention_ops": ctx.count_class(C.ATTENTION, C.SOFTMAX),
        "recommendations": ["batch_utterances"],
    }


def _residual_hints(ctx: PatternContext) -> dict[str, Any]:
    kinds = {}
    if not ctx.fast:
        for t in (
            RESIDUAL_BASIC,
            RESIDUAL_PROJECTION,
            RESIDUAL_ATTENTION_PRENORM,
            RESIDUAL_ATTENTION_POSTNORM,
        ):
            c, _ = ctx.find(t)
            if c:
                kinds[t.name] = c
    return {
        "blocks": sum(kinds.values()) or ctx.count_role(Role.RESIDUAL_ADD),
        "kinds": kinds,
        "skip_adds": ctx.count_role(Role.RESIDUAL_ADD),
        "recommendations": ["keep_skip_tensor_on_block_device"],
    }


def _recsys_hints(ctx: PatternContext) -> dict[str, Any]:
    tables = ctx.count_class(C.EMBEDDING_BAG, C.EMBEDDING)
    return {
        "embedding_tables": tables,
        "table_bytes": sum(
            n.inputs[0].storage_nbytes
            for n in ctx.graph.nodes
            if ctx.view.cls[n.id] in (C.EMBEDDING_BAG, C.EMBEDDING) and n.inputs
        ),
        "mlp_layers": ctx.count_class(C.MATMUL),
        "recommendations": ["shard_embedding_tables", "keep_tables_resident", "cache_hot_rows"],
    }


def _fusion_hints(ctx: PatternContext) -> dict[str, Any]:
    ann = ctx.annotations
    branches: dict[str, list[str]] = {}
    for fid in ann.fusion_points[:8]:
        lin = ctx.graph.node(fid).meta.get("lineage", {})
        for mod, mods in lin.get("branches", {}).items():
            for m in mods:
                if m not in branches.setdefault(mod, []):
                    branches[mod].append(m)
    return {
        "fusion_points": ann.fusion_points[:16],
        "fusion_modules": ann.fusion_modules,
        "branches": branches,
        "branch_nodes": {
            m: ctx.count_modality(m) for m in Modality.PERCEPTUAL if ctx.count_modality(m)
        },
        "recommendations": ["run_modality_branches_in_parallel", "place_fusion_with_larger_branch"],
    }


def _fusion_points(ctx: PatternContext) -> bool:
    """Two computed streams meet: some fusion point's inputs come from nodes of two
    perceptual modalities (not a graph input of one meeting the other's stream)."""
    nodes = ctx.graph
    for fid in ctx.annotations.fusion_points:
        lin = nodes.node(fid).meta.get("lineage", {})
        if len(lin.get("fusion_of", ())) >= 2:
            return True
    return False


_fusion_points.__name__ = "two_streams_meet"
_kv.__name__ = "kv_cache"


def _lookups_into_mlp(ctx: PatternContext) -> bool:
    """Id lookups and linear layers, with nothing that mixes the positions of a sequence
    (see annotate's ``sequence_mixing``) and no weight applied step after step (recurrence):
    the ids are a set of categorical fields (one shared table with per-field offsets, as
    factorisation machines use), not a token sequence."""
    if not ctx.count_class(C.EMBEDDING) or not ctx.count_class(C.MATMUL):
        return False
    if ctx.annotations.sequence_mixing:
        return False
    uses: dict[int, int] = {}
    residency = ctx.annotations.residency
    for n in ctx.graph.nodes:
        if ctx.view.cls[n.id] == C.MATMUL:
            for t in n.inputs:
                if t.storage in residency:
                    uses[t.storage] = uses.get(t.storage, 0) + 1
    return max(uses.values(), default=0) < 3


_lookups_into_mlp.__name__ = "lookups_into_mlp_without_sequence_mixing"


def _two_branches(ctx: PatternContext) -> bool:
    return sum(1 for m in Modality.PERCEPTUAL if ctx.count_modality(m) >= 3) >= 2


_two_branches.__name__ = "two_modality_branches"


def builtin_patterns() -> list:
    return [
        PredicatePattern(
            "llm",
            # attention over tokens, or tokens in and logits over their vocabulary out (a
            # state-space or recurrent language model has no attention)
            requires=any_chain(
                chain(_attention_ops, _text_tokens), chain(_text_tokens, has_role(Role.LM_HEAD))
            ),
            evidence=[
                (has_role(Role.TOKEN_EMBEDDING), 0.1),
                (has_op_class(C.NORM, at_least=2), 0.05),
                (_ffn, 0.08),
                (_residual_transformer, 0.08),
                (_attention_shape, 0.05),
                (
                    architecture_in(
                        "transformer_decoder", "transformer_encoder", "transformer_seq2seq"
                    ),
                    0.1,
                ),
                (_kv, 0.04),
                (negate(has_op_class(C.CONV)), 0.04),
            ],
            base=0.45,
            workload=WorkloadType.LLM,
            templates=[ATTENTION_FUSED, ATTENTION_EAGER, ATTENTION_EAGER_MASKED],
            hints=_llm_hints,
            description="token embeddings feeding stacked attention + FFN blocks",
        ),
        PredicatePattern(
            "attention",
            requires=_attention_ops,
            evidence=[
                (_attention_shape, 0.25),
                (has_role(Role.Q_PROJECTION, Role.QKV_PROJECTION), 0.1),
            ],
            base=0.6,
            templates=[ATTENTION_FUSED, ATTENTION_EAGER, ATTENTION_EAGER_MASKED],
            hints=_attention_hints,
            description="scaled dot-product attention (fused or as matmul-softmax-matmul)",
        ),
        PredicatePattern(
            "vision",
            requires=chain(
                any_chain(has_op_class(C.CONV), has_role(Role.PATCH_EMBEDDING)),
                has_modality(Modality.VISION),
            ),
            evidence=[
                (has_op_class(C.CONV, at_least=3), 0.1),
                (_mostly(Modality.VISION, 0.5), 0.15),
                (has_op_class(C.NORM, C.POOL), 0.05),
                (architecture_in("vit", "cnn", "resnet"), 0.15),
                (negate(_text_tokens), 0.05),
            ],
            base=0.45,
            workload=WorkloadType.VISION,
            anchor_roles=(Role.CONV_BACKBONE, Role.PATCH_EMBEDDING),
            hints=_vision_hints,
            description="convolutions or patch embeddings over pixels",
        ),
        PredicatePattern(
            "audio",
            requires=chain(
                has_modality(Modality.AUDIO, at_least=3),
                any_chain(has_op_class(C.CONV), _attention_ops),
            ),
            evidence=[
                (has_op_class(C.CONV, at_least=2), 0.1),
                (_attention_ops, 0.1),
                (_mostly(Modality.AUDIO, 0.5), 0.15),
                (negate(_text_tokens), 0.05),
            ],
            base=0.5,
            workload=WorkloadType.AUDIO,
            hints=_audio_hints,
            description="a waveform or spectrogram through convolutions and attention",
        ),
        PredicatePattern(
            "residual_block",
            requires=any_chain(_residual_conv, _residual_transformer),
            evidence=[(has_role(Role.RESIDUAL_ADD, at_least=2), 0.2), (_residual_conv, 0.1)],
            base=0.6,
            templates=[
                RESIDUAL_BASIC,
                RESIDUAL_PROJECTION,
                RESIDUAL_ATTENTION_PRENORM,
                RESIDUAL_ATTENTION_POSTNORM,
            ],
            anchor_roles=(Role.RESIDUAL_ADD,),
            hints=_residual_hints,
            description="a skip connection around a conv or attention block",
        ),
        PredicatePattern(
            "recsys",
            requires=any_chain(
                has_op_class(C.EMBEDDING_BAG),
                chain(has_modality(Modality.CATEGORICAL), has_op_class(C.EMBEDDING, at_least=2)),
                _lookups_into_mlp,
            ),
            evidence=[
                (has_op_class(C.MATMUL, at_least=2), 0.1),
                (
                    has_subgraph(RECSYS_INTERACTION, fallback=has_role(Role.FEATURE_INTERACTION)),
                    0.15,
                ),
                (has_op_class(C.EMBEDDING_BAG, C.EMBEDDING, at_least=2), 0.1),
                (architecture_in("recsys"), 0.1),
                (negate(_attention_ops), 0.05),
            ],
            base=0.5,
            workload=WorkloadType.RECSYS,
            templates=[RECSYS_INTERACTION],
            anchor_roles=(Role.EMBEDDING_BAG,),
            hints=_recsys_hints,
            description="sparse embedding tables joined with dense MLP features",
        ),
        PredicatePattern(
            "multimodal_fusion",
            requires=_fusion_points,
            evidence=[
                (has_role(Role.CROSS_ATTENTION), 0.1),
                (has_subgraph(CROSS_MODAL_ATTENTION), 0.05),
                (_two_branches, 0.15),
                (architecture_in("multimodal"), 0.1),
            ],
            base=0.55,
            workload=WorkloadType.MULTIMODAL,
            anchors=lambda ctx: ctx.annotations.fusion_points,
            hints=_fusion_hints,
            description="two modality branches meeting (cross-attention, concatenation)",
        ),
        StructurePrior(),
    ]
