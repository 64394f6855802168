"""The structure prior: what the model's module tree says the workload is.

Heard only when the op stream decides nothing (see genie.semantic.classifier): a
data-dependent op may flush part of a forward, leaving the pending graph only its tail.
"""

from __future__ import annotations

from genie.semantic.patterns.base import MatchedPattern, PatternContext
from genie.semantic.vocab import WorkloadType

__all__ = ["StructurePrior"]

# what a model's structure (its module tree: tables, attention, convolutions, branches)
# says the workload is; a prior, heard only when the op stream decides nothing (see classifier)
_STRUCTURE_VOTES = {
    "language_model": WorkloadType.LLM,
    "transformer_decoder": WorkloadType.LLM,
    "transformer_encoder": WorkloadType.LLM,
    "transformer_seq2seq": WorkloadType.LLM,
    "vit": WorkloadType.VISION,
    "resnet": WorkloadType.VISION,
    "cnn": WorkloadType.VISION,
    "recsys": WorkloadType.RECSYS,
    "multimodal": WorkloadType.MULTIMODAL,
    "audio": WorkloadType.AUDIO,
}


class StructurePrior:
    """Votes the workload the model's module tree names, at a confidence just over the
    threshold; the classifier hears it only when no op-stream pattern decided, e.g. when a
    data-dependent op flushed part of the forward and the pending graph is only its tail."""

    name = "structure_prior"
    confidence = 0.55

    def match(self, ctx: PatternContext) -> MatchedPattern | None:
        st = ctx.structure
        if st.source == "graph":
            return None  # inferred from these very ops: no independent evidence
        wt = _STRUCTURE_VOTES.get(st.architecture)
        if wt is None:
            return None
        if wt == WorkloadType.LLM and not st.features.get("token_embedding"):
            return None  # attention over something other than tokens (a time series)
        return MatchedPattern(
            self.name,
            self.confidence,
            {"prior": True, "source": st.source, "architecture": st.architecture},
            wt,
            evidence=[f"structure[{st.source}]={st.architecture}"],
        )

    def __repr__(self) -> str:
        return "StructurePrior()"
