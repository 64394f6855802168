"""The phase detector: which stage of its workload each node belongs to, and how calls follow
one another (a prompt's prefill, then decode steps against the KV cache).

Per call, a causal text model is in *prefill* when its attention queries span more than one
position and in *decode* when the query is a single position and a cache is present (a KV
cache read from a previous step, or keys longer than the query). Bidirectional text is
``text_encoder``. Pixels run through ``vision_backbone`` until the last backbone op
(convolution, attention, normalisation, residual add) and ``vision_head`` after it; where
modalities meet is ``multimodal_fusion``. Across calls the detector keeps a bounded history,
the transitions between call phases and per-phase statistics until ``reset()``.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from genie.semantic.annotate import Annotations
from genie.semantic.graph_utils import GraphView, OpClass
from genie.semantic.vocab import Modality, Phase, Residency, Role

logger = logging.getLogger(__name__)

__all__ = ["PhaseDetector", "PhaseResult", "CallPhase"]

_EMBED_ROLES = {
    Role.TOKEN_EMBEDDING,
    Role.POSITION_EMBEDDING,
    Role.SEGMENT_EMBEDDING,
    Role.EMBEDDING,
    Role.EMBEDDING_BAG,
}
_HEAD_ROLES = {Role.CLASSIFIER_HEAD, Role.POOLER}
_BACKBONE_CLASSES = {OpClass.CONV, OpClass.ATTENTION, OpClass.NORM}
_DECODER_ARCHS = {"transformer_decoder", "transformer_seq2seq", "language_model"}
_NOT_DECODER_ARCHS = {"transformer_encoder", "vit", "multimodal"}
# call phases, most specific first, that name what a call as a whole was doing
_CALL_ORDER = (
    Phase.DECODE,
    Phase.PREFILL,
    Phase.MULTIMODAL_FUSION,
    Phase.TEXT_ENCODER,
    Phase.VISION_BACKBONE,
    Phase.AUDIO_ENCODER,
    Phase.INTERACTION,
    Phase.DENSE_MLP,
    Phase.FORWARD,
)


@dataclass(frozen=True)
class CallPhase:
    """One analysed call, as the detector's history records it."""

    phase: str
    query_len: int | None = None
    kv_len: int | None = None
    kv_cache: bool = False
    batch_size: int | None = None
    nodes: int = 0
    graph_hash: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "query_len": self.query_len,
            "kv_len": self.kv_len,
            "kv_cache": self.kv_cache,
            "batch_size": self.batch_size,
            "nodes": self.nodes,
            "graph_hash": self.graph_hash[:16],
        }


@dataclass
class PhaseResult:
    """The phases of one graph: node ids per phase, by node position for cache replay."""

    call: CallPhase
    positions: dict[str, list[int]] = field(default_factory=dict)  # phase -> node positions

    def node_ids(self, nodes) -> dict[str, list[int]]:
        return {p: [nodes[i].id for i in pos] for p, pos in self.positions.items()}


class PhaseDetector:
    """Assigns ``execution_phase`` to nodes and tracks phases across calls."""

    def __init__(self, history: int = 1024):
        self._lock = threading.Lock()
        self.history: deque[CallPhase] = deque(maxlen=history)
        self.transitions: Counter = Counter()
        self._stats: dict[str, dict[str, float]] = {}
        self.current_phase: str | None = None

    # -- per graph --------------------------------------------------------------------------
    def detect(
        self, gv: GraphView, ann: Annotations, architecture: str | None = None, graph_hash: str = ""
    ) -> PhaseResult:
        """Write ``execution_phase`` into every node and return the phases of this call.
        Does not touch the history; ``observe`` does."""
        nodes = gv.nodes
        text_q, text_k = None, None
        for nid, q, k in ann.attention:
            if nodes[gv.pos[nid]].meta.get("modality") == Modality.TEXT:
                text_q = q if text_q is None else max(text_q, q)
                text_k = k if text_k is None else max(text_k, k)
        # a causal mask alone does not make a decoder (CLIP's text tower is causal): a KV
        # cache or a decoder architecture does; a causal graph of unknown make counts too
        decoder = (
            bool(ann.kv_cache_nodes)
            or architecture in _DECODER_ARCHS
            or (ann.causal and architecture not in _NOT_DECODER_ARCHS)
        )
        if architecture == "transformer_seq2seq" and not ann.kv_cache_nodes and not ann.causal:
            decoder = False  # the encoder alone (generate() runs it as a call of its own)
        kv_present = bool(ann.kv_cache_storages)
        if decoder:
            # decode: a step against a cache -- one new token (the ids the call was given),
            # or, where no ids say so, a single query position against longer keys
            if ann.new_tokens is not None and kv_present:
                decode = ann.new_tokens == 1
            else:
                decode = text_q == 1 and (kv_present or (text_k or 0) > 1)
            text_phase = Phase.DECODE if decode else Phase.PREFILL
        else:
            text_phase = Phase.TEXT_ENCODER
        recsys = ann.modalities.get(Modality.CATEGORICAL, 0) > 0
        fusion_modules = tuple(m + "." for m in ann.fusion_modules) + tuple(ann.fusion_modules)

        # the last backbone op of the vision branch: everything after it is the head
        last_backbone = len(nodes) if ann.fusion_points else -1
        for i, n in enumerate(nodes if not ann.fusion_points else ()):
            if n.meta.get("modality") == Modality.VISION and (
                gv.cls[n.id] in _BACKBONE_CLASSES
                or n.meta.get("semantic_role") == Role.RESIDUAL_ADD
            ):
                last_backbone = i

        encoder = _encoder_nodes(gv, ann) if decoder else set()
        positions: dict[str, list[int]] = {}
        for i, n in enumerate(nodes):
            meta = n.meta
            role = meta.get("semantic_role")
            mod = meta.get("modality")
            path = meta.get("module_path")
            if role == Role.WEIGHT or (
                path is None
                and meta.get("data_residency") == Residency.PERSISTENT_WEIGHT
                and n.id in gv.views
            ):
                phase = Phase.SETUP
            elif mod == Modality.FUSION or (
                fusion_modules and path is not None and path.startswith(fusion_modules)
            ):
                phase = Phase.MULTIMODAL_FUSION
            elif role in _EMBED_ROLES and mod != Modality.VISION:
                phase = Phase.EMBEDDING
            elif mod == Modality.TEXT:
                phase = Phase.TEXT_ENCODER if n.id in encoder else text_phase
            elif mod == Modality.VISION:
                phase = (
                    Phase.VISION_HEAD
                    if role in _HEAD_ROLES or i > last_backbone
                    else Phase.VISION_BACKBONE
                )
            elif mod == Modality.AUDIO:
                phase = Phase.AUDIO_ENCODER
            elif mod in (Modality.TABULAR, Modality.CATEGORICAL) and recsys:
                phase = Phase.INTERACTION if role == Role.FEATURE_INTERACTION else Phase.DENSE_MLP
            else:
                phase = Phase.FORWARD
            meta["execution_phase"] = phase
            positions.setdefault(phase, []).append(i)

        call = Phase.FORWARD
        for p in _CALL_ORDER:
            if p in positions:
                call = p
                break
        if call == Phase.FORWARD and Phase.VISION_HEAD in positions:
            call = Phase.VISION_BACKBONE
        result = PhaseResult(
            call=CallPhase(
                phase=call,
                query_len=text_q,
                kv_len=text_k,
                kv_cache=kv_present,
                batch_size=ann.batch_size,
                nodes=len(nodes),
                graph_hash=graph_hash,
            ),
            positions=positions,
        )
        return result

    # -- across calls -----------------------------------------------------------------------
    def observe(self, call: CallPhase) -> None:
        """Record one call: history, transition from the previous call, statistics."""
        with self._lock:
            prev = self.current_phase
            if prev is not None:
                self.transitions[(prev, call.phase)] += 1
            self.current_phase = call.phase
            self.history.append(call)
            st = self._stats.setdefault(call.phase, {"calls": 0, "nodes": 0, "query_tokens": 0})
            st["calls"] += 1
            st["nodes"] += call.nodes
            if call.query_len is not None:
                st["query_tokens"] += call.query_len * (call.batch_size or 1)
            if prev is not None and prev != call.phase:
                logger.debug("phase transition %s -> %s", prev, call.phase)

    def statistics(self) -> dict[str, Any]:
        """Calls per phase, average nodes per call, transitions seen, the current phase."""
        with self._lock:
            phases = {
                p: {
                    "calls": int(s["calls"]),
                    "avg_nodes": s["nodes"] / s["calls"] if s["calls"] else 0.0,
                    "query_tokens": int(s["query_tokens"]),
                }
                for p, s in self._stats.items()
            }
            return {
                "calls": int(sum(s["calls"] for s in self._stats.values())),
                "current_phase": self.current_phase,
                "phases": phases,
                "transitions": {f"{a}->{b}": c for (a, b), c in self.transitions.items()},
            }

    def reset(self) -> None:
        """Forget the history (a new generation, a new request)."""
        with self._lock:
            self.history.clear()
            self.transitions.clear()
            self._stats.clear()
            self.current_phase = None


def _encoder_nodes(gv: GraphView, ann: Annotations) -> set[int]:
    """The nodes of an encoder that a decoder attends to, in one graph (seq2seq).

    Note: [Encoder and decoder streams]
    Each token-id input is a stream; every node carries the set of streams it derives from
    (a bit per input). Where an attention's keys derive from a stream its queries do not,
    that stream is an encoder the queries' stream cross-attends to. Nodes deriving only from
    encoder streams are ``text_encoder``; the decoder's are prefill or decode. One stream
    (a decoder-only model, a decode step against a resident encoder output) finds none."""
    sources = [s for s, lab in ann.input_modalities.items() if lab == Modality.TEXT]
    if len(sources) < 2 or not ann.attention:
        return set()
    bit = {s: 1 << i for i, s in enumerate(sources)}
    node_bits: dict[int, int] = {}
    writer: dict[int, int] = {}
    for n in gv.nodes:
        b = 0
        for t in n.inputs:
            w = writer.get(t.storage)
            b |= node_bits.get(w, 0) if w is not None else bit.get(t.storage, 0)
        node_bits[n.id] = b
        for o in n.outputs:
            writer[o.storage] = n.id
        for s in n.writes:
            writer[s] = n.id
    nodes, pos, names = gv.nodes, gv.pos, gv.names
    enc = 0
    for nid, _, _ in ann.attention:
        n = nodes[pos[nid]]
        qk = n.inputs[1:3] if names[nid] == "baddbmm" else n.inputs[0:2]
        if len(qk) < 2:
            continue
        q, k = (node_bits.get(writer.get(t.storage, -1), bit.get(t.storage, 0)) for t in qk)
        enc |= k & ~q
    if not enc:
        return set()
    return {nid for nid, b in node_bits.items() if b and not (b & ~enc)}
