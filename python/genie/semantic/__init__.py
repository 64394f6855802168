"""The semantic layer: what a recorded graph *is*.

::

    analyzer = genie.SemanticAnalyzer()
    profile = analyzer.analyze_graph(genie.get_graph(), model)   # or analyzer.analyze(model, x)
    profile.workload_type        # LLM / VISION / AUDIO / MULTIMODAL / RECSYS / UNKNOWN
    profile.patterns             # [MatchedPattern("llm", 0.94, {...hints}), ...]
    profile.phases               # {"prefill": [node ids], "embedding": [...], ...}
    profile.metadata["skipped"]  # what the analysis could not read (it never raises on it)

    with analyzer.observe(model) as calls:     # one profile per call
        model.generate(ids, max_new_tokens=8)
    calls.phases                 # ["prefill", "decode", "decode", ...]

The workload is read from evidence that generalises -- what the data inputs are (token ids,
NCHW pixels, waveforms, dense and categorical features), the op families, how streams meet
-- never from model names (genie.semantic.input_kinds, patterns). ``genie.semantic.hf_models``
builds tiny random-weight transformers models by name (``genie analyze --hf``);
``genie.semantic.draw`` draws an annotated graph (``genie analyze --draw``).

Three tiers feed one WorkloadProfile: (1) op-stream statistics (genie.semantic.op_stats),
(2) model structure from torch.fx or the nn.Module tree (structure), (3) module contexts
stamped by forward hooks (context) turned into per-node meaning (roles, annotate); then the
phase detector (phases), the pattern registry (patterns) and the classifier (classifier).
This layer never imports genie.runtime or genie.scheduler.

Vocabulary written into ``node.meta`` (constants in genie.semantic.vocab):

``module_path`` (str)
    dotted path of the innermost module running when the op was recorded ("" = the root);
    absent when the op ran outside any tracked module.
``module_type`` (str)
    that module's class name ("GPT2Attention", "Conv2d").
``layer_depth`` (int)
    nesting depth of that module (root 0). ``layer_index`` (int): index of the innermost
    numbered block on the path (``transformer.h.3.attn`` -> 3), when there is one.
``semantic_role`` (str)
    token_embedding, position_embedding, segment_embedding, embedding, embedding_bag,
    patch_embedding, q_projection, k_projection, v_projection, qkv_projection, attention,
    cross_attention, attention_output, kv_cache_update, ffn_up, ffn_down, ffn_activation,
    layer_norm, batch_norm, residual_add, conv_backbone, pooling, pooler, lm_head,
    classifier_head, bottom_mlp, top_mlp, feature_interaction, fusion, mlp; and, where no
    module names the op: linear, conv, activation, normalization, elementwise, reduction,
    view, weight (a view of a weight outside any module), factory, other.
``modality`` (str)
    text, vision, audio, tabular (dense features), categorical (sparse ids), fusion
    (derived from two or more of text/vision/audio), none.
``execution_phase`` (str)
    setup, embedding, prefill, decode, text_encoder, vision_backbone, vision_head,
    audio_encoder, multimodal_fusion, dense_mlp, interaction, forward.
``data_residency`` (str; of the node's output storage)
    persistent_weight (parameters, buffers and views of them), ephemeral_activation,
    stateful_kv_cache (keys/values kept across decode steps; the cat that extends them).
``lineage`` (dict; fusion points only)
    ``{"fusion_of": ["text", "vision"], "sources": {modality: [producer node ids]},
    "branches": {modality: [top-level modules upstream]}, "ancestors": {modality: count}}``.

Environment switches (see genie.semantic.config): GENIE_ANALYZER_CACHE,
GENIE_ANALYZER_SLOW_MS, GENIE_ANALYZER_DEBUG, GENIE_FAST_PATTERNS, GENIE_PHASE_DETECTION,
GENIE_PATTERN_PLUGINS (plus the ``genie.patterns`` entry-point group).
"""

from genie.semantic.analyzer import SemanticAnalyzer
from genie.semantic.classifier import classify
from genie.semantic.config import AnalyzerConfig
from genie.semantic.context import ContextTable, ModuleContext, ModuleContextTracker, context_table
from genie.semantic.observe import CallObserver
from genie.semantic.op_stats import OpStreamStats
from genie.semantic.patterns import (
    FunctionPattern,
    MatchedPattern,
    Pattern,
    PatternContext,
    PatternRegistry,
    PluginError,
    PredicatePattern,
    Template,
    any_chain,
    chain,
    default_registry,
    register_pattern,
)
from genie.semantic.phases import CallPhase, PhaseDetector
from genie.semantic.profile import WorkloadProfile
from genie.semantic.structure import ModelStructure
from genie.semantic.vocab import META_KEYS, Modality, Phase, Residency, Role, WorkloadType

__all__ = [
    "META_KEYS",
    "AnalyzerConfig",
    "CallObserver",
    "CallPhase",
    "ContextTable",
    "FunctionPattern",
    "MatchedPattern",
    "Modality",
    "ModelStructure",
    "ModuleContext",
    "ModuleContextTracker",
    "OpStreamStats",
    "Pattern",
    "PatternContext",
    "PatternRegistry",
    "Phase",
    "PhaseDetector",
    "PluginError",
    "PredicatePattern",
    "Residency",
    "Role",
    "SemanticAnalyzer",
    "Template",
    "WorkloadProfile",
    "WorkloadType",
    "any_chain",
    "chain",
    "classify",
    "context_table",
    "default_registry",
    "register_pattern",
]
