"""Tier 2: the model's structure.

From ``torch.fx`` where symbolic tracing works (plain nn.Module code), from the nn.Module tree
where it does not (HF models branch on Python values and are not traced: transformers
classes are recognised and go straight to the tree), from the module contexts stamped on the
graph when the analyzer has no model, and from the op stream alone as the last resort.
The result names the architecture -- ``transformer_decoder``, ``transformer_encoder``,
``vit``, ``resnet``, ``cnn``, ``mlp``, ``recsys``, ``multimodal`` or ``unknown`` -- with depth
(repeated blocks, or layers on the longest path), width (hidden size or widest layer) and
parameter count.
"""

from __future__ import annotations

import logging
import operator
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from genie.semantic.roles import module_kind

logger = logging.getLogger(__name__)

__all__ = [
    "ModelStructure",
    "structure_from_model",
    "structure_from_contexts",
    "structure_from_ops",
    "ARCHITECTURES",
]

ARCHITECTURES = (
    "language_model",
    "transformer_decoder",
    "transformer_encoder",
    "transformer_seq2seq",
    "vit",
    "resnet",
    "cnn",
    "mlp",
    "recsys",
    "multimodal",
    "audio",
    "unknown",
)

# HF's task naming convention (``...ForCausalLM``, ``...LMHeadModel``), not model names
_CAUSAL = re.compile(r"CausalLM|LMHead", re.IGNORECASE)
_RESIDUAL_TYPES = re.compile(r"Block|Bottleneck|Residual|ResNet", re.IGNORECASE)
_VISION = re.compile(r"vision|visual|image|img|pixel|cnn|backbone", re.IGNORECASE)
_TEXT = re.compile(r"text|language|lang|question|word|caption|token", re.IGNORECASE)
_CROSS = re.compile(r"cross|fusion|co_attn|coattn|encoder_attn", re.IGNORECASE)
_TOKEN = re.compile(r"wte|word|token|tok|embed_tokens|shared|text", re.IGNORECASE)
_POS = re.compile(r"wpe|pos|token_type|segment", re.IGNORECASE)
_RECSYS = re.compile(r"sparse|interaction|embedding_bag|tables", re.IGNORECASE)
_PATCH = re.compile(r"patch", re.IGNORECASE)
_MAX_HIERARCHY = 512


@dataclass
class ModelStructure:
    source: str = "graph"  # "fx" | "module_tree" | "contexts" | "graph"
    architecture: str = "unknown"
    model_type: str | None = None
    depth: int = 0
    width: int = 0
    parameter_count: int = 0
    num_modules: int = 0
    module_types: Counter = field(default_factory=Counter)
    hierarchy: list[dict[str, Any]] = field(default_factory=list)
    blocks: list[str] = field(default_factory=list)
    features: dict[str, Any] = field(default_factory=dict)
    fx_error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "architecture": self.architecture,
            "model_type": self.model_type,
            "depth": self.depth,
            "width": self.width,
            "parameter_count": self.parameter_count,
            "num_modules": self.num_modules,
            "module_types": dict(self.module_types.most_common(24)),
            "blocks": self.blocks[:64],
            "features": self.features,
            "fx_error": self.fx_error,
            "hierarchy": self.hierarchy,
        }


@dataclass(frozen=True)
class _Rec:
    path: str
    type: str
    kind: str
    depth: int


# -- shared inference over module records --------------------------------------------------


def _features(recs: list[_Rec], root_type: str | None) -> dict[str, Any]:
    kinds = Counter(r.kind for r in recs)
    attention = kinds["attention"] + kinds["mha"]
    conv_recs = [r for r in recs if r.kind == "conv"]
    emb_recs = [r for r in recs if r.kind == "embedding"]
    token = [
        r
        for r in emb_recs
        if _TOKEN.search(r.path.rsplit(".", 1)[-1])
        and not _POS.search(r.path.rsplit(".", 1)[-1])
        and not _RECSYS.search(r.path)
    ]
    top = {r.path.split(".", 1)[0] for r in recs if r.path}
    names = " ".join(r.path for r in recs) + " " + " ".join(r.type for r in recs)
    return {
        "attention_modules": attention,
        "conv_modules": len(conv_recs),
        "linear_modules": kinds["linear"],
        "embedding_modules": len(emb_recs),
        "embedding_bags": kinds["embedding_bag"],
        "norm_modules": kinds["batch_norm"] + kinds["layer_norm"] + kinds["norm"],
        "token_embedding": bool(token),
        "patch_embedding": any(_PATCH.search(r.path) for r in conv_recs),
        # convolutions over one axis only and no token table: a waveform, not pixels or text
        "conv_1d_only": bool(conv_recs) and all(r.type.endswith("1d") for r in conv_recs),
        "conv_1d": sum(r.type.endswith("1d") for r in conv_recs),
        # the task's naming convention here; attention modules' ``is_causal`` and the
        # config's ``is_decoder`` where the model is given (structure_from_model)
        "causal": bool(root_type and _CAUSAL.search(root_type)),
        "cross_attention": bool(_CROSS.search(names)),
        "vision_branch": sorted(t for t in top if _VISION.search(t)),
        "text_branch": sorted(t for t in top if _TEXT.search(t)),
        "recsys_names": bool(_RECSYS.search(names)),
        "residual_types": any(_RESIDUAL_TYPES.search(r.type) for r in recs if r.kind == "module"),
    }


def _architecture(f: dict[str, Any]) -> str:
    vision = f["conv_modules"] > 0 or f["patch_embedding"] or bool(f["vision_branch"])
    text = f["token_embedding"] or bool(f["text_branch"])
    if vision and text and (f["cross_attention"] or (f["vision_branch"] and f["text_branch"])):
        return "multimodal"
    if f["embedding_bags"] or (
        f["recsys_names"] and f["embedding_modules"] >= 2 and not f["attention_modules"]
    ):
        return "recsys"
    if f.get("conv_1d_only") and not f["token_embedding"] and not f["vision_branch"]:
        return "audio"
    if f["attention_modules"]:
        if (f["patch_embedding"] or f["conv_modules"]) and not f["token_embedding"]:
            return "vit"
        if f.get("encoder_decoder") and f["token_embedding"]:
            return "transformer_seq2seq"
        return "transformer_decoder" if f["causal"] else "transformer_encoder"
    if f["token_embedding"] and not f["conv_modules"] - f.get("conv_1d", 0):
        return "language_model"  # a token table without attention: a state-space or RNN LM
    if f["conv_modules"]:
        return "resnet" if f["residual_types"] or f.get("residual_adds", 0) else "cnn"
    if f["linear_modules"]:
        return "mlp"
    return "unknown"


def _blocks(recs: list[_Rec]) -> list[str]:
    """Paths of the longest run of numbered siblings holding submodules (transformer layers,
    ResNet stages' blocks)."""
    children: dict[str, list[str]] = {}
    has_children: set[str] = set()
    for r in recs:
        if not r.path:
            continue
        parent, _, last = r.path.rpartition(".")
        has_children.add(parent)
        if last.isdigit():
            children.setdefault(parent, []).append(r.path)
    best: list[str] = []
    for paths in children.values():
        numbered = [p for p in paths if p in has_children]
        if len(numbered) > len(best):
            best = numbered
    return best


def _hierarchy(recs: Iterable[_Rec], params: dict[str, int] | None = None) -> list[dict]:
    out = []
    for r in recs:
        if len(out) >= _MAX_HIERARCHY:
            break
        d = {"path": r.path, "type": r.type, "depth": r.depth}
        if params is not None and r.path in params:
            d["params"] = params[r.path]
        out.append(d)
    return out


# -- from a model ------------------------------------------------------------------------------


def _is_hf(model: torch.nn.Module) -> bool:
    return type(model).__module__.startswith("transformers.")


def structure_from_model(model: torch.nn.Module, try_fx: bool = True) -> ModelStructure:
    recs: list[_Rec] = []
    own: dict[str, int] = {}
    params = 0
    width = 0
    causal_attr = patch = False
    unread: list[str] = []  # modules named like a kind they are not, or that could not be read
    rows: set[int] = set()  # embedding tables' row counts
    outs: set[int] = set()  # linear layers' output widths
    for path, m in model.named_modules():
        kind, n = "module", 0
        try:
            kind = _kind(m)
            if kind == "module" and module_kind(type(m).__name__) != "module":
                unread.append(
                    f"{path or '<root>'}: a {type(m).__name__} is named like a "
                    f"{module_kind(type(m).__name__)} but holds no such weight"
                )
            n = sum(p.numel() for p in m._parameters.values() if p is not None)
            if kind == "linear" and isinstance(m, torch.nn.Linear):
                width = max(width, m.in_features, m.out_features)
                outs.add(m.out_features)
            elif kind == "conv" and isinstance(m, torch.nn.modules.conv._ConvNd):
                width = max(width, m.out_channels)
                if m.kernel_size == m.stride and m.kernel_size[0] > 1:
                    patch = True  # non-overlapping windows: a patch embedding
            elif kind in ("embedding", "embedding_bag"):
                width = max(width, _embedding_dim(m))
                if kind == "embedding" and isinstance(getattr(m, "weight", None), torch.Tensor):
                    rows.add(int(m.weight.shape[0]))
            elif kind == "attention" and getattr(m, "is_causal", False) is True:
                causal_attr = True
        except Exception as exc:  # noqa: BLE001 - a module class we cannot read: skip it
            unread.append(
                f"{path or '<root>'}: {type(m).__name__} not read: {type(exc).__name__}: {exc}"
            )
        recs.append(_Rec(path, type(m).__name__, kind, 0 if not path else path.count(".") + 1))
        own[path] = n
        params += n
    st = ModelStructure(source="module_tree", model_type=type(model).__name__)
    st.num_modules = len(recs)
    st.module_types = Counter(r.type for r in recs)
    st.parameter_count = params
    st.hierarchy = _hierarchy(recs, own)
    f = _features(recs, st.model_type)
    f["causal"] = f["causal"] or causal_attr
    f["patch_embedding"] = f["patch_embedding"] or patch
    f["unread_modules"] = unread[:32]
    config = getattr(model, "config", None)
    # a table with as many rows as the vocabulary (the config's, or a linear layer's outputs:
    # logits over it) holds tokens, whatever it is called
    vocab = {getattr(config, "vocab_size", None)} | outs
    f["token_embedding"] = f["token_embedding"] or any(r > 1 and r in vocab for r in rows)
    if config is not None and getattr(config, "is_decoder", False) is True:
        f["causal"] = True
    # an encoder and a decoder stack: the config says so, or top-level modules named so
    tops = {r.path for r in recs if r.path and "." not in r.path}
    f["encoder_decoder"] = getattr(config, "is_encoder_decoder", False) is True or (
        any("encoder" in t for t in tops) and any("decoder" in t for t in tops)
    )
    st.blocks = _blocks(recs)
    if try_fx and not _is_hf(model):
        _from_fx(model, st, f)
    st.features = f
    st.architecture = _architecture(f)
    st.depth = st.depth or _depth(st, f)
    st.width = _config_width(config) or width
    return st


def _kind(m: torch.nn.Module) -> str:
    """The module's kind, from what it is where torch says so, else from its class name --
    but a name alone never makes a lookup table or a convolution: a ``RotaryEmbedding``
    holds no table, a ``PositionalConvEmbedding`` wraps a convolution (its child says so)."""
    if isinstance(m, torch.nn.EmbeddingBag):
        return "embedding_bag"
    if isinstance(m, torch.nn.Embedding):
        return "embedding"
    if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
        return "conv"
    if isinstance(m, torch.nn.MultiheadAttention):
        return "mha"
    if isinstance(m, torch.nn.Linear):
        return "linear"
    kind = module_kind(type(m).__name__)
    if kind in ("embedding", "embedding_bag", "conv"):
        w = getattr(m, "weight", None)
        own_table = isinstance(w, torch.Tensor) and w.dim() == (2 if kind != "conv" else 3)
        return kind if own_table else "module"
    return kind


def _embedding_dim(m: torch.nn.Module) -> int:
    d = getattr(m, "embedding_dim", None)
    if isinstance(d, int):
        return d
    w = getattr(m, "weight", None)
    return int(w.shape[-1]) if isinstance(w, torch.Tensor) and w.dim() == 2 else 0


def _from_fx(model: torch.nn.Module, st: ModelStructure, f: dict[str, Any]) -> None:
    """Trace with torch.fx and read dataflow facts: skip connections, the longest chain of
    layers. Failure is normal for dynamic models and leaves the module-tree answer."""
    import torch.fx as fx

    try:
        gm = fx.symbolic_trace(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure means "use the tree"
        st.fx_error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        logger.debug("fx tracing of %s failed: %s", type(model).__name__, st.fx_error)
        return
    st.source = "fx"
    modules = dict(gm.named_modules())
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    layer_depth: dict[fx.Node, int] = {}
    residual = 0
    sdpa = 0
    for n in gm.graph.nodes:
        ins = [a for a in n.all_input_nodes]
        d = max((layer_depth.get(a, 0) for a in ins), default=0)
        if n.op == "call_module" and _kind(modules[n.target]) in (
            "linear",
            "conv",
            "mha",
            "embedding",
            "embedding_bag",
        ):
            d += 1
        layer_depth[n] = d
        is_add = (
            n.op == "call_function" and n.target in (operator.add, torch.add, operator.iadd)
        ) or (n.op == "call_method" and n.target in ("add", "add_"))
        if is_add and len(ins) >= 2:
            a, b = ins[0], ins[1]
            if abs(order[a] - order[b]) >= 3 and abs(layer_depth[a] - layer_depth[b]) >= 1:
                residual += 1
        if n.op == "call_function" and getattr(n.target, "__name__", "") in (
            "scaled_dot_product_attention",
            "softmax",
        ):
            sdpa += 1
    f["residual_adds"] = residual
    f["fx_nodes"] = len(order)
    if sdpa and not f["attention_modules"]:
        f["attention_modules"] = sdpa
    st.depth = max(layer_depth.values(), default=0)


def _depth(st: ModelStructure, f: dict[str, Any]) -> int:
    if st.blocks and st.architecture not in ("mlp",):
        return len(st.blocks)
    if f["conv_modules"]:
        return f["conv_modules"]
    return f["linear_modules"]


def _config_width(config) -> int:
    for attr in ("hidden_size", "n_embd", "d_model", "dim", "embed_dim"):
        v = getattr(config, attr, None) if config is not None else None
        if isinstance(v, int):
            return v
    return 0


# -- without a model ---------------------------------------------------------------------------


def structure_from_contexts(
    contexts: Iterable, weight_shapes: Iterable[tuple[int, ...]] = (), parameter_count: int = 0
) -> ModelStructure | None:
    """Structure from the ModuleContexts stamped on a graph: the module tree as far as it ran."""
    seen: dict[str, _Rec] = {}
    root = None
    for ctx in contexts:
        if ctx is None:
            continue
        if not ctx.path:
            root = ctx.type
        if ctx.path not in seen:
            seen[ctx.path] = _Rec(ctx.path, ctx.type, module_kind(ctx.type), ctx.depth)
    if not seen:
        return None
    recs = sorted(seen.values(), key=lambda r: r.path)
    st = ModelStructure(source="contexts", model_type=root)
    st.num_modules = len(recs)
    st.module_types = Counter(r.type for r in recs)
    st.hierarchy = _hierarchy(recs)
    f = _features(recs, root)
    st.features = f
    st.blocks = _blocks(recs)
    st.architecture = _architecture(f)
    st.depth = _depth(st, f)
    st.parameter_count = parameter_count
    st.width = max((max(s) for s in weight_shapes if s), default=0)
    return st


def structure_from_ops(
    class_histogram: Counter,
    ann,
    parameter_count: int = 0,
    weight_shapes: Iterable[tuple[int, ...]] = (),
) -> ModelStructure:
    """Last resort: infer the architecture from the op stream and tier-3 annotations."""
    from genie.semantic.vocab import Modality, Role

    st = ModelStructure(source="graph")
    attention = class_histogram.get("attention", 0) or class_histogram.get("softmax", 0)
    conv = class_histogram.get("conv", 0)
    mods = ann.modalities
    if ann.fusion_points:
        arch = "multimodal"
    elif class_histogram.get("embedding_bag", 0) or mods.get(Modality.CATEGORICAL, 0):
        arch = "recsys"
    elif attention and mods.get(Modality.TEXT, 0):
        arch = (
            "transformer_decoder" if (ann.kv_cache_nodes or ann.causal) else "transformer_encoder"
        )
    elif attention and mods.get(Modality.VISION, 0):
        arch = "vit"
    elif conv:
        arch = "resnet" if ann.roles.get(Role.RESIDUAL_ADD, 0) else "cnn"
    elif class_histogram.get("matmul", 0):
        arch = "mlp"
    else:
        arch = "unknown"
    st.architecture = arch
    st.depth = attention or conv or class_histogram.get("matmul", 0)
    st.parameter_count = parameter_count
    st.width = max((max(s) for s in weight_shapes if s), default=0)
    st.features = {"attention_ops": attention, "conv_ops": conv}
    return st
