"""The words the semantic layer writes into ``node.meta``.

Other layers (the scheduler first of all) compare against these strings, so they are spelled
once, here. Keep them lower-case snake case and add new words rather than changing old ones.
"""

from __future__ import annotations

from enum import Enum

__all__ = ["META_KEYS", "Modality", "Phase", "Residency", "Role", "WorkloadType"]

#: Every key the semantic layer writes into ``node.meta``. ``lineage`` is written only at
#: fusion points; ``layer_index`` only inside repeated blocks (``h.3`` -> 3).
META_KEYS = (
    "module_path",
    "module_type",
    "layer_depth",
    "layer_index",
    "semantic_role",
    "modality",
    "execution_phase",
    "data_residency",
    "lineage",
)


class Phase:
    """``node.meta["execution_phase"]``."""

    SETUP = "setup"  # views of weights recorded outside any forward call (Module.to)
    EMBEDDING = "embedding"  # token/position/segment lookups, embedding bags
    PREFILL = "prefill"  # causal LM over the prompt (query length > 1)
    DECODE = "decode"  # causal LM generating one token against a KV cache
    TEXT_ENCODER = "text_encoder"  # bidirectional text encoding (BERT, a VQA question branch)
    VISION_BACKBONE = "vision_backbone"  # convolutions / patch embedding + encoder over pixels
    VISION_HEAD = "vision_head"  # pooling and classifier after the backbone
    AUDIO_ENCODER = "audio_encoder"  # convolutions / attention over a waveform or spectrogram
    MULTIMODAL_FUSION = "multimodal_fusion"  # where modalities meet, and everything after
    DENSE_MLP = "dense_mlp"  # recommender bottom/top MLPs
    INTERACTION = "interaction"  # recommender feature interaction
    FORWARD = "forward"  # anything the detector cannot name more precisely

    ALL = (
        SETUP,
        EMBEDDING,
        PREFILL,
        DECODE,
        TEXT_ENCODER,
        VISION_BACKBONE,
        VISION_HEAD,
        AUDIO_ENCODER,
        MULTIMODAL_FUSION,
        DENSE_MLP,
        INTERACTION,
        FORWARD,
    )


class Residency:
    """``node.meta["data_residency"]``: what the node's output storage is."""

    PERSISTENT_WEIGHT = "persistent_weight"  # parameters/buffers and views of them
    EPHEMERAL_ACTIVATION = "ephemeral_activation"  # produced and consumed within one call
    STATEFUL_KV_CACHE = "stateful_kv_cache"  # attention keys/values kept across decode steps

    ALL = (PERSISTENT_WEIGHT, EPHEMERAL_ACTIVATION, STATEFUL_KV_CACHE)


class Modality:
    """``node.meta["modality"]``: which input the node's value derives from."""

    TEXT = "text"  # token ids through an embedding
    VISION = "vision"  # pixels (4-D float input into a convolution)
    AUDIO = "audio"
    TABULAR = (
        "tabular"  # dense features (recommenders), and anything mixing only non-perceptual inputs
    )
    CATEGORICAL = "categorical"  # sparse ids into embedding bags / tables (recommenders)
    FUSION = "fusion"  # derived from two or more of text, vision, audio
    NONE = "none"  # constants and weights used by no modality branch

    PERCEPTUAL = (TEXT, VISION, AUDIO)
    ALL = (TEXT, VISION, AUDIO, TABULAR, CATEGORICAL, FUSION, NONE)


class Role:
    """``node.meta["semantic_role"]``."""

    TOKEN_EMBEDDING = "token_embedding"
    POSITION_EMBEDDING = "position_embedding"
    SEGMENT_EMBEDDING = "segment_embedding"
    EMBEDDING = "embedding"
    EMBEDDING_BAG = "embedding_bag"
    PATCH_EMBEDDING = "patch_embedding"
    Q_PROJECTION = "q_projection"
    K_PROJECTION = "k_projection"
    V_PROJECTION = "v_projection"
    QKV_PROJECTION = "qkv_projection"
    ATTENTION = "attention"  # scores, softmax, the fused attention kernel, head reshapes
    CROSS_ATTENTION = "cross_attention"
    ATTENTION_OUTPUT = "attention_output"
    KV_CACHE_UPDATE = "kv_cache_update"
    FFN_UP = "ffn_up"
    FFN_DOWN = "ffn_down"
    FFN_ACTIVATION = "ffn_activation"
    LAYER_NORM = "layer_norm"
    BATCH_NORM = "batch_norm"
    RESIDUAL_ADD = "residual_add"
    CONV_BACKBONE = "conv_backbone"
    POOLING = "pooling"
    POOLER = "pooler"
    LM_HEAD = "lm_head"
    CLASSIFIER_HEAD = "classifier_head"
    FUSION = "fusion"
    BOTTOM_MLP = "bottom_mlp"
    TOP_MLP = "top_mlp"
    FEATURE_INTERACTION = "feature_interaction"
    MLP = "mlp"
    LINEAR = "linear"
    CONV = "conv"
    ACTIVATION = "activation"
    NORMALIZATION = "normalization"
    ELEMENTWISE = "elementwise"
    REDUCTION = "reduction"
    VIEW = "view"
    WEIGHT = "weight"  # a view of a weight outside any module (Module.to's detach)
    FACTORY = "factory"
    OTHER = "other"


class WorkloadType(str, Enum):
    """What a graph is, as a whole (``WorkloadProfile.workload_type``)."""

    LLM = "llm"
    VISION = "vision"
    MULTIMODAL = "multimodal"
    RECSYS = "recsys"
    AUDIO = "audio"  # waveforms or spectrograms through convolutions / attention
    UNKNOWN = "unknown"

    def __str__(self) -> str:
        return self.value
