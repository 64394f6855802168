"""What a module is for, from its path and class name: the rules behind ``semantic_role``.

Rules read module attribute names the way model code commonly spells them (``c_attn``/``c_fc``,
``query``/``intermediate``, ``q_proj``/``up_proj``, ``layer1.0.conv1``, ``bot_l``); they name
roles inside a model, never which model it is -- the workload comes from evidence (see
genie.semantic.evidence). They are computed once per context id (contexts are interned, see
Note: [Module context ids]) and cached, so their cost does not grow with the number of ops.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from genie.semantic.context import ContextTable, ModuleContext
from genie.semantic.graph_utils import OpClass
from genie.semantic.vocab import Modality, Role

__all__ = ["ContextInfo", "context_info", "module_kind", "NO_CONTEXT"]


def _rx(pattern: str) -> re.Pattern:
    return re.compile(pattern, re.IGNORECASE)


_ATTENTION = _rx(r"attn|attention|self_attn|multihead")
_CROSS = _rx(r"cross|encoder_attn|co_attn|coattn|img_attn|image_attn")
_FFN = _rx(r"mlp|ffn|feed_?forward|intermediate|fc_block|dense_block")
_BLOCK = _rx(r"(block|layer|bottleneck|residual)$|^(basicblock|bottleneck)")
_EMBEDDINGS = _rx(r"embed")
_FUSION = _rx(r"fusion|fuse|cross|merge|bridge|co_attn|coattn")
_HEAD = _rx(
    r"^(head|heads|classifier|cls|fc|score|logits|out|output_layer|predictions|answer\w*|"
    r"qa_outputs|decoder_head|linear_head)$"
)
_POOLER = _rx(r"pool")
_BOTTOM = _rx(r"^(bot|bottom|bot_l|bot_mlp|bottom_mlp|dense_arch|dense_mlp)$")
_TOP = _rx(r"^(top|top_l|top_mlp|over|over_arch)$")
_INTERACT = _rx(r"interact")
_VISION = _rx(r"vision|visual|image|img|pixel|patch|backbone|stem")
_TEXT = _rx(r"text|language|lang|question|token|word|wte|lm_head|caption")
_AUDIO = _rx(r"audio|speech|wav|mel")
_RECSYS = _rx(r"sparse|categorical|embedding_bag|tables")

# leaf names -> roles (matched against the module's own name)
_Q = _rx(r"^(q|query|q_proj|wq|to_q|q_lin|query_proj)$")
_K = _rx(r"^(k|key|k_proj|wk|to_k|k_lin|key_proj)$")
_V = _rx(r"^(v|value|v_proj|wv|to_v|v_lin|value_proj)$")
_QKV = _rx(r"^(c_attn|qkv|qkv_proj|in_proj|wqkv|query_key_value|to_qkv|attn_qkv)$")
_OUT = _rx(r"^(o_proj|out_proj|c_proj|dense|proj|wo|to_out|out_lin|o)$")
_UP = _rx(
    r"^(c_fc|fc1|up_proj|gate_proj|w1|w3|wi|wi_0|wi_1|fc_in|lin1|dense_h_to_4h|gate_up_proj)$"
)
_DOWN = _rx(r"^(c_proj|fc2|down_proj|w2|wo|fc_out|lin2|dense_4h_to_h)$")
_TOKEN = _rx(
    r"^(wte|word_embeddings|embed_tokens|tok_embeddings|token_embedding|tok_emb|"
    r"shared|embeddings|word_emb|token_emb|embed)$"
)
_POSITION = _rx(r"wpe|pos")
_SEGMENT = _rx(r"token_type|segment|tte")
_PATCH = _rx(r"patch|projection|to_patch")


@lru_cache(maxsize=4096)
def module_kind(type_name: str) -> str:
    """Coarse kind of a module class from its name (works without the module object)."""
    t = type_name
    if t in (
        "Conv1d",
        "Conv2d",
        "Conv3d",
        "ConvTranspose1d",
        "ConvTranspose2d",
        "ConvTranspose3d",
        "LazyConv1d",
        "LazyConv2d",
        "LazyConv3d",
    ):
        return "conv"
    if t == "EmbeddingBag":
        return "embedding_bag"
    if "Embedding" in t and not t.endswith("s"):
        return "embedding"
    if "Linear" in t or t == "Conv1D" or t == "Bilinear":
        return "linear"
    if "BatchNorm" in t:
        return "batch_norm"
    if "LayerNorm" in t or "RMSNorm" in t:
        return "layer_norm"
    if "Norm" in t:
        return "norm"
    if t == "MultiheadAttention":
        return "mha"
    if "Attention" in t:
        return "attention"
    if "Pool" in t:
        return "pool"
    if t in (
        "ReLU",
        "ReLU6",
        "GELU",
        "SiLU",
        "Tanh",
        "Sigmoid",
        "LeakyReLU",
        "ELU",
        "Mish",
        "Hardswish",
        "Hardsigmoid",
        "Softplus",
        "PReLU",
        "SELU",
        "CELU",
        "GLU",
    ) or ("Activation" in t or t.endswith("GELU") or t.endswith("Act")):
        return "act"
    if t in ("Dropout", "Dropout1d", "Dropout2d", "Identity", "Flatten", "Unflatten"):
        return "passthrough"
    if t in ("Sequential", "ModuleList", "ModuleDict"):
        return "container"
    return "module"


@dataclass(frozen=True)
class ContextInfo:
    """Everything the annotator needs about one context id, computed once."""

    cid: int
    path: str
    type: str
    depth: int
    layer_index: int | None
    kind: str  # module_kind of the innermost module
    leaf_role: str | None  # role every op inside this module gets (projections, norms...)
    in_attention: bool
    in_cross_attention: bool
    in_ffn: bool
    in_block: bool
    in_head: bool
    in_fusion: bool
    recsys_part: str | None  # "bottom_mlp" | "top_mlp" | "feature_interaction" | "embedding"
    modality_hint: str | None  # from names along the path
    attention_path: str | None  # path of the enclosing attention module
    fusion_path: str | None
    branch: str  # first path component below the root ("" at the root)
    ffn_named: bool = False  # some module name on the path says FFN
    embeddings_named: bool = False  # some module name on the path says embeddings


NO_CONTEXT = ContextInfo(
    0,
    "",
    "",
    0,
    None,
    "none",
    None,
    False,
    False,
    False,
    False,
    False,
    False,
    None,
    None,
    None,
    None,
    "",
)


@lru_cache(maxsize=8192)
def _name_flags(name: str) -> tuple[bool, bool, bool, bool, bool, str | None, str | None]:
    """(attention, cross, ffn, fusion, embeddings, recsys part, modality hint) of one module
    name; names repeat across layers, so each is searched once."""
    recsys = None
    if _BOTTOM.search(name):
        recsys = Role.BOTTOM_MLP
    elif _TOP.search(name):
        recsys = Role.TOP_MLP
    elif _INTERACT.search(name):
        recsys = Role.FEATURE_INTERACTION
    return (
        bool(_ATTENTION.search(name)),
        bool(_CROSS.search(name)),
        bool(_FFN.search(name)),
        bool(_FUSION.search(name)),
        bool(_EMBEDDINGS.search(name)),
        recsys,
        _modality_hint([name]),
    )


@lru_cache(maxsize=4096)
def _type_flags(type_name: str) -> tuple[bool, bool, bool]:
    """(cross, ffn, block) of one module class name."""
    return (
        bool(_CROSS.search(type_name)),
        bool(_FFN.search(type_name)),
        bool(_BLOCK.search(type_name)),
    )


def _modality_hint(names: list[str]) -> str | None:
    for name in names:
        if _VISION.search(name):
            return Modality.VISION
        if _AUDIO.search(name):
            return Modality.AUDIO
        if _TEXT.search(name):
            return Modality.TEXT
        if _RECSYS.search(name):
            return Modality.CATEGORICAL
    return None


def context_info(
    table: ContextTable, cid: int, memo: dict[int, ContextInfo] | None = None
) -> ContextInfo:
    """Derive a ContextInfo for ``cid`` from its own module and its parent's ContextInfo
    (looked up in, and added to, ``memo``), so each context costs a few regex searches."""
    if memo is not None:
        hit = memo.get(cid)
        if hit is not None:
            return hit
    ctx = table.get(cid)
    if ctx is None:
        return NO_CONTEXT
    parent_ctx = table.get(ctx.parent)
    parent = context_info(table, ctx.parent, memo) if parent_ctx is not None else None
    name, type_name = ctx.name, ctx.type
    kind = module_kind(type_name)
    named = bool(ctx.path)
    attn_n, cross_n, ffn_n, fusion_n, emb_n, recsys_n, hint_n = (
        _name_flags(name) if named else (False, False, False, False, False, None, None)
    )
    cross_t, ffn_t, block_t = _type_flags(type_name)
    own_attention = named and (attn_n or kind in ("attention", "mha"))
    p = parent
    in_attention = own_attention or (p is not None and p.in_attention)
    attention_path = ctx.path if own_attention else (p.attention_path if p else None)
    in_cross = (p is not None and p.in_cross_attention) or (own_attention and (cross_n or cross_t))
    grand_ctx = table.get(parent_ctx.parent) if parent_ctx is not None else None
    ffn_named = (p is not None and p.ffn_named) or ffn_n
    in_ffn = (
        ffn_named
        or ffn_t
        or any(_type_flags(c.type)[1] for c in (parent_ctx, grand_ctx) if c is not None)
    )
    in_block = (p is not None and p.in_block) or block_t
    fusion_path = (p.fusion_path if p is not None else None) or (ctx.path if fusion_n else None)
    pname = parent_ctx.name if parent_ctx is not None and parent_ctx.path else ""
    in_head = (
        name == "lm_head"
        or (named and bool(_HEAD.search(name)))
        or bool(pname and _HEAD.search(pname))
    )
    recsys = recsys_n if recsys_n is not None else (p.recsys_part if p is not None else None)
    in_embeddings = (p is not None and p.embeddings_named) or emb_n
    hint = hint_n if named else _modality_hint([ctx.root])
    if hint is None and p is not None:
        hint = p.modality_hint
    leaf = _leaf_role(ctx, kind, pname, in_attention, in_ffn, in_head, recsys, in_embeddings)
    info = ContextInfo(
        cid=cid,
        path=ctx.path,
        type=type_name,
        depth=ctx.depth,
        layer_index=ctx.layer_index,
        kind=kind,
        leaf_role=leaf,
        in_attention=in_attention,
        in_cross_attention=in_cross,
        in_ffn=in_ffn,
        in_block=in_block,
        in_head=in_head,
        in_fusion=fusion_path is not None,
        recsys_part=recsys,
        modality_hint=hint,
        attention_path=attention_path,
        fusion_path=fusion_path,
        branch=ctx.path.split(".", 1)[0] if named else "",
        ffn_named=ffn_named,
        embeddings_named=in_embeddings,
    )
    if memo is not None:
        memo[cid] = info
    return info


def _leaf_role(
    ctx: ModuleContext,
    kind: str,
    pname: str,
    in_attention: bool,
    in_ffn: bool,
    in_head: bool,
    recsys: str | None,
    in_embeddings: bool,
) -> str | None:
    name = ctx.name
    if kind == "embedding_bag":
        return Role.EMBEDDING_BAG
    if kind == "embedding":
        if _SEGMENT.search(name):
            return Role.SEGMENT_EMBEDDING
        if _POSITION.search(name):
            return Role.POSITION_EMBEDDING
        if _TOKEN.search(name) or (_TEXT.search(name) and not _RECSYS.search(name)):
            return Role.TOKEN_EMBEDDING
        return Role.EMBEDDING
    if kind == "linear":
        if name == "lm_head":
            return Role.LM_HEAD
        if _QKV.search(name):
            return Role.QKV_PROJECTION
        if in_attention:
            if _Q.search(name):
                return Role.Q_PROJECTION
            if _K.search(name):
                return Role.K_PROJECTION
            if _V.search(name):
                return Role.V_PROJECTION
            if _OUT.search(name) or _OUT.search(pname) or pname == "output":
                return Role.ATTENTION_OUTPUT
        if recsys in (Role.BOTTOM_MLP, Role.TOP_MLP):
            return recsys
        if pname == "intermediate" or (in_ffn and _UP.search(name)):
            return Role.FFN_UP
        if (in_ffn and _DOWN.search(name)) or (pname == "output" and not in_attention):
            return Role.FFN_DOWN
        if _POOLER.search(pname) or _POOLER.search(name):
            return Role.POOLER
        if in_head or _HEAD.search(name):
            return Role.CLASSIFIER_HEAD
        return Role.MLP if in_ffn else Role.LINEAR
    if kind == "conv":
        if _PATCH.search(name) or _PATCH.search(pname) or in_embeddings:
            return Role.PATCH_EMBEDDING
        return Role.CONV_BACKBONE
    if kind == "layer_norm":
        return Role.LAYER_NORM
    if kind == "batch_norm":
        return Role.BATCH_NORM
    if kind == "norm":
        return Role.NORMALIZATION
    if kind == "act":
        if _POOLER.search(pname):
            return Role.POOLER
        return Role.FFN_ACTIVATION if in_ffn and not recsys else None
    if kind == "pool":
        return Role.POOLING
    if kind == "module" and _POOLER.search(name):
        return Role.POOLER
    if recsys == Role.FEATURE_INTERACTION:
        return Role.FEATURE_INTERACTION
    return None


_TABLE_ROLES = frozenset(
    {
        Role.TOKEN_EMBEDDING,
        Role.POSITION_EMBEDDING,
        Role.SEGMENT_EMBEDDING,
        Role.EMBEDDING,
        Role.EMBEDDING_BAG,
    }
)
_LOOKUP_CLASSES = frozenset({OpClass.EMBEDDING, OpClass.EMBEDDING_BAG, OpClass.VIEW, OpClass.INDEX})

# op class -> role when no module rule names the op
_OP_ROLE = {
    OpClass.MATMUL: Role.LINEAR,
    OpClass.CONV: Role.CONV,
    OpClass.ATTENTION: Role.ATTENTION,
    OpClass.SOFTMAX: Role.ATTENTION,
    OpClass.NORM: Role.NORMALIZATION,
    OpClass.ACT: Role.ACTIVATION,
    OpClass.EMBEDDING: Role.EMBEDDING,
    OpClass.EMBEDDING_BAG: Role.EMBEDDING_BAG,
    OpClass.POOL: Role.POOLING,
    OpClass.REDUCE: Role.REDUCTION,
    OpClass.CAT: Role.OTHER,
    OpClass.ADD: Role.ELEMENTWISE,
    OpClass.ELEMENTWISE: Role.ELEMENTWISE,
    OpClass.COPY: Role.OTHER,
    OpClass.INDEX: Role.OTHER,
    OpClass.FACTORY: Role.FACTORY,
    OpClass.VIEW: Role.VIEW,
    OpClass.OTHER: Role.OTHER,
}


def op_role(cls: str) -> str:
    return _OP_ROLE.get(cls, Role.OTHER)


def role_in_context(info: ContextInfo, cls: str, after_attention_core: bool) -> str:
    """The role of an op of class ``cls`` recorded inside ``info``'s module."""
    leaf = info.leaf_role
    if leaf is not None and (leaf not in _TABLE_ROLES or cls in _LOOKUP_CLASSES):
        return leaf  # a table role only for lookups: a RotaryEmbedding's cos/sin are not
    if info.recsys_part is not None:
        return info.recsys_part
    if info.in_attention:
        if cls == OpClass.MATMUL and info.kind == "mha":
            # nn.MultiheadAttention calls its projections functionally: order tells them apart
            return Role.ATTENTION_OUTPUT if after_attention_core else Role.QKV_PROJECTION
        if cls in (
            OpClass.ATTENTION,
            OpClass.SOFTMAX,
            OpClass.MATMUL,
            OpClass.VIEW,
            OpClass.ELEMENTWISE,
            OpClass.COPY,
            OpClass.CAT,
            OpClass.OTHER,
        ):
            return Role.CROSS_ATTENTION if info.in_cross_attention else Role.ATTENTION
    if info.in_ffn and cls in (OpClass.ACT, OpClass.ELEMENTWISE, OpClass.ADD):
        return Role.FFN_ACTIVATION
    if cls == OpClass.ACT and info.modality_hint == Modality.VISION and not info.in_head:
        return Role.CONV_BACKBONE
    if info.in_head and cls in (OpClass.MATMUL, OpClass.ACT):
        return Role.CLASSIFIER_HEAD
    return op_role(cls)
