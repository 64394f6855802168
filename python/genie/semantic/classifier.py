"""The workload classifier: one WorkloadType from the patterns' votes.

Each matched pattern may vote for a workload with its confidence. Op-stream evidence decides
first: multimodal fusion wins when present (its branches would otherwise vote LLM and VISION),
then recommender, then the strongest single-modality vote (LLM, vision, audio). Votes marked
``hints["prior"]`` (the model structure's) are heard only when the op stream decided nothing.
Nothing at 0.5 or more is UNKNOWN: a plain MLP stays unknown rather than being called an LLM.
"""

from __future__ import annotations

from collections.abc import Iterable

from genie.semantic.patterns.base import MatchedPattern
from genie.semantic.vocab import WorkloadType

__all__ = ["classify", "THRESHOLD"]

THRESHOLD = 0.5
_SINGLE = (WorkloadType.LLM, WorkloadType.VISION, WorkloadType.AUDIO)


def _decide(votes: dict[WorkloadType, MatchedPattern]) -> MatchedPattern | None:
    for wt in (WorkloadType.MULTIMODAL, WorkloadType.RECSYS):
        m = votes.get(wt)
        if m is not None and m.confidence >= THRESHOLD:
            return m
    best = max((votes[w] for w in _SINGLE if w in votes), key=lambda m: m.confidence, default=None)
    if best is not None and best.confidence >= THRESHOLD:
        return best
    return None


def classify(patterns: Iterable[MatchedPattern]) -> tuple[WorkloadType, float, str]:
    """(workload type, confidence, the pattern that decided it or a reason)."""
    votes: dict[WorkloadType, MatchedPattern] = {}
    priors: dict[WorkloadType, MatchedPattern] = {}
    for m in patterns:
        if m.workload is None:
            continue
        wt = WorkloadType(m.workload)
        into = priors if m.hints.get("prior") else votes
        if wt not in into or m.confidence > into[wt].confidence:
            into[wt] = m
    m = _decide(votes) or _decide(priors)
    if m is not None:
        return WorkloadType(m.workload), m.confidence, m.name
    top = max((m.confidence for m in (*votes.values(), *priors.values())), default=0.0)
    return WorkloadType.UNKNOWN, round(1.0 - top, 4) if top else 1.0, "no pattern voted >= 0.5"
