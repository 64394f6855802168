"""Tiny random-weight transformers models from a name, for ``genie analyze --hf`` and the
semantic zoo: the class comes from transformers' own auto mappings, the config is the class's
default with every size shrunk (hidden 32, two layers, vocabulary 256, 32-pixel images), the
weights are random -- nothing is downloaded. ``make_inputs`` makes the generic inputs of the
mapping's task (token ids, encoder and decoder ids, pixels, pixels with text, a waveform, a
multivariate time series).
"""

from __future__ import annotations

import importlib
import math
from typing import Any

import torch

__all__ = [
    "TASK_INPUTS",
    "NotTiny",
    "build",
    "build_hf",
    "find",
    "make_inputs",
    "mapping",
    "shrink_config",
]

VOCAB = 256
HIDDEN = 32
HEADS = 2
IMAGE = 32
SEQ = 8
MAX_PARAMS = 3_000_000

# attribute -> tiny value, applied where the config has the attribute
_INTS = {
    "hidden_size": HIDDEN,
    "n_embd": HIDDEN,
    "d_model": HIDDEN,
    "embed_dim": HIDDEN,
    "dim": HIDDEN,
    "embedding_size": HIDDEN,
    "word_embed_proj_dim": HIDDEN,
    "projection_dim": HIDDEN,
    "text_embed_dim": HIDDEN,
    "vision_embed_dim": HIDDEN,
    "num_hidden_layers": 2,
    "n_layer": 2,
    "num_layers": 2,
    "n_layers": 2,
    "encoder_layers": 1,
    "decoder_layers": 1,
    "num_decoder_layers": 1,
    "num_encoder_layers": 1,
    "num_attention_heads": HEADS,
    "n_head": HEADS,
    "n_heads": HEADS,
    "num_heads": HEADS,
    "encoder_attention_heads": HEADS,
    "decoder_attention_heads": HEADS,
    "num_key_value_heads": 1,
    "multi_query_group_num": 1,
    "num_kv_heads": 1,
    "intermediate_size": 64,
    "ffn_dim": 64,
    "encoder_ffn_dim": 64,
    "decoder_ffn_dim": 64,
    "d_ff": 64,
    "n_inner": 64,
    "hidden_dim": 64,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "d_kv": HIDDEN // HEADS,
    "head_dim": HIDDEN // HEADS,
    "kv_channels": HIDDEN // HEADS,
    "max_position_embeddings": 128,
    "n_positions": 128,
    "max_seq_len": 128,
    "image_size": IMAGE,
    "num_channels": 3,
    "patch_size": 4,
    "window_size": 4,
    "num_queries": 8,
    "num_labels": 4,
    "encoder_hidden_size": HIDDEN,
    "decoder_hidden_size": HIDDEN,
    "first_k_dense_replace": 1,
    "q_lora_rank": 16,
    "kv_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
    "num_mel_bins": 16,
    "conv_dim_last": HIDDEN,
    "num_feat_extract_layers": 2,
}
_LISTS = {  # per-stage lists: as many stages, each tiny
    "hidden_sizes": lambda n: [8 * 2**i for i in range(n)],
    "depths": lambda n: [1] * n,
    "embed_dims": lambda n: [8 * 2**i for i in range(n)],
    "num_heads": lambda n: [1] * n,
    "num_attention_heads": lambda n: [1] * n,
    "conv_dim": lambda n: [HIDDEN] * n,
    "sr_ratios": lambda n: [1] * n,
    "mlp_ratios": lambda n: [2] * n,
}
_FLAGS = {"use_timm_backbone": False, "use_pretrained_backbone": False}


def shrink_config(cfg: Any, _depth: int = 0) -> Any:
    """Set every size attribute the config has to a tiny value; recurse into sub-configs."""
    from transformers import PretrainedConfig

    for key, value in list(vars(cfg).items()):
        if isinstance(value, PretrainedConfig) and type(value).__name__.startswith("Timm"):
            # a timm backbone needs the timm package: transformers' own ResNet instead
            from transformers import ResNetConfig

            stages = [f"stage{i}" for i in range(1, 5)]
            _set(cfg, key, shrink_config(ResNetConfig(out_features=stages), _depth + 1))
        elif isinstance(value, PretrainedConfig) and _depth < 3:
            shrink_config(value, _depth + 1)
        elif isinstance(value, dict) and key.endswith("_config") and _depth < 3:
            continue
        elif key in _LISTS and isinstance(value, (list, tuple)) and value:
            _set(cfg, key, _LISTS[key](len(value)))
        elif key in _FLAGS:
            _set(cfg, key, _FLAGS[key])
        elif key in _INTS and isinstance(value, int) and not isinstance(value, bool):
            _set(cfg, key, min(value, _INTS[key]) if key == "num_channels" else _INTS[key])
        elif key == "vocab_size" and isinstance(value, int):
            cfg.vocab_size = VOCAB
        elif key.endswith("token_id") and isinstance(value, int) and value >= VOCAB:
            setattr(cfg, key, VOCAB - 1 - (hash(key) % 8))
        elif key.endswith("token_index") and isinstance(value, int) and value >= VOCAB:
            setattr(cfg, key, VOCAB - 10)
        elif key == "layer_types" and isinstance(value, list):
            setattr(cfg, key, value[:2])
    for attr in ("hidden_size", "d_model"):
        h = getattr(cfg, attr, None)
        if isinstance(h, int) and hasattr(cfg, "head_dim") and isinstance(cfg.head_dim, int):
            heads = getattr(cfg, "num_attention_heads", HEADS)
            if isinstance(heads, int) and heads:
                _set(cfg, "head_dim", h // heads)
    return cfg


def _set(cfg, key: str, value) -> None:
    try:
        setattr(cfg, key, value)
    except (AttributeError, TypeError, ValueError):
        pass  # a derived (read-only) attribute: its source is shrunk instead


#: auto mappings -> the generic inputs a model of that mapping takes, in lookup order
TASK_INPUTS = {
    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES": "text",
    "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES": "seq2seq",
    "MODEL_FOR_MASKED_LM_MAPPING_NAMES": "text",
    "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES": "image",
    "MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES": "image",
    "MODEL_FOR_ZERO_SHOT_IMAGE_CLASSIFICATION_MAPPING_NAMES": "image_text",
    "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES": "image_text",
    "MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES": "audio",
    "MODEL_FOR_CTC_MAPPING_NAMES": "audio",
    "MODEL_FOR_TIME_SERIES_CLASSIFICATION_MAPPING_NAMES": "time_series",
    "MODEL_FOR_TIME_SERIES_REGRESSION_MAPPING_NAMES": "time_series",
}


def mapping(name: str) -> dict[str, str]:
    """An auto mapping as model type -> class name (the first class where it lists several)."""
    from transformers.models.auto import modeling_auto

    m = getattr(modeling_auto, name, None) or {}
    return {t: c if isinstance(c, str) else c[0] for t, c in m.items()}


def find(name: str) -> tuple[str, str, str]:
    """(model type, class name, mapping) of a model class name (``MistralForCausalLM``) or a
    config name (``mistral``: its first task in TASK_INPUTS order). Raises LookupError."""
    for m in TASK_INPUTS:
        for model_type, cls in mapping(m).items():
            if name in (cls, model_type):
                return model_type, cls, m
    raise LookupError(
        f"{name!r} is neither a model class nor a config name in transformers' "
        f"auto mappings ({', '.join(TASK_INPUTS)})"
    )


def build(name: str) -> tuple[torch.nn.Module, tuple, dict]:
    """(model, args, kwargs): a tiny random-weight model named as ``find`` takes it."""
    model_type, cls, m = find(name)
    return build_hf(model_type, cls, TASK_INPUTS[m])


def _resolve(model_type: str, class_name: str):
    """(config class, model class): the class's own config class where it names one (a
    mapping may list a class under a model type whose config is not the class's)."""
    import transformers
    from transformers import CONFIG_MAPPING

    model_cls = getattr(transformers, class_name, None)
    if model_cls is None:
        module = importlib.import_module(CONFIG_MAPPING[model_type].__module__.rsplit(".", 1)[0])
        model_cls = getattr(module, class_name)
    cfg_cls = getattr(model_cls, "config_class", None) or CONFIG_MAPPING[model_type]
    return cfg_cls, model_cls


def build_hf(model_type: str, class_name: str, inputs: str) -> tuple[torch.nn.Module, tuple, dict]:
    """(model, args, kwargs) of a tiny random-weight ``class_name``; raises what fails."""
    cfg_cls, model_cls = _resolve(model_type, class_name)
    cfg = shrink_config(cfg_cls())
    torch.manual_seed(0)
    model = model_cls(cfg).eval()
    n = sum(p.numel() for p in model.parameters())
    if n > MAX_PARAMS:
        raise NotTiny(f"{n / 1e6:.1f}M parameters after shrinking")
    return model, *make_inputs(model, cfg, inputs)


class NotTiny(RuntimeError):
    """The model is still too large after shrinking its config."""


def _image_size(cfg) -> int:
    for c in (getattr(cfg, "vision_config", None), getattr(cfg, "backbone_config", None), cfg):
        s = getattr(c, "image_size", None) if c is not None else None
        if isinstance(s, int):
            return s
        if isinstance(s, (list, tuple)) and s:
            return int(s[0])
    return IMAGE


def make_inputs(model, cfg, kind: str) -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(1)
    vocab = (
        getattr(getattr(cfg, "text_config", None), "vocab_size", None)
        or getattr(cfg, "vocab_size", VOCAB)
        or VOCAB
    )
    ids = torch.randint(4, min(vocab, VOCAB) - 16, (1, SEQ), generator=g)
    if kind == "text":
        return (), {"input_ids": ids}
    if kind == "seq2seq":
        return (), {"input_ids": ids, "decoder_input_ids": ids[:, :4]}
    size = _image_size(cfg)
    pixels = torch.randn(1, 3, size, size, generator=g)
    if kind == "image":
        return (), {"pixel_values": pixels}
    if kind == "image_text":
        kw: dict[str, Any] = {"input_ids": ids, "pixel_values": pixels}
        token = getattr(cfg, "image_token_id", None) or getattr(cfg, "image_token_index", None)
        if token is not None:
            n = _image_tokens(model, cfg, pixels)
            kw["input_ids"] = torch.cat([torch.full((1, n), token), ids], 1)
        return (), kw
    if kind == "time_series":
        length = getattr(cfg, "context_length", 32) or 32
        channels = getattr(cfg, "num_input_channels", 1) or 1
        return (), {"past_values": torch.randn(1, length, channels, generator=g)}
    if kind == "audio":
        return (), {"input_values": torch.randn(1, 1600, generator=g)}
    raise ValueError(kind)


def _image_tokens(model, cfg, pixels) -> int:
    """How many image tokens the text must hold: what the model's image features measure."""
    with torch.no_grad():
        get = getattr(model, "get_image_features", None) or getattr(
            getattr(model, "model", None), "get_image_features", None
        )
        feats = get(pixel_values=pixels)
    if hasattr(feats, "pooler_output") and not isinstance(feats, torch.Tensor):
        feats = feats.pooler_output
    if isinstance(feats, (list, tuple)):
        return sum(math.prod(f.shape[:-1]) for f in feats)
    return math.prod(feats.shape[:-1])
