"""The workload classifier: one WorkloadType from the patterns' votes.

Each matched pattern may vote for a workload with its confidence. Multimodal fusion wins
when present (its branches would otherwise vote LLM and VISION), then recommender, then the
stronger of LLM and vision. Nothing at 0.5 or more is UNKNOWN: a plain MLP stays unknown
rather than being called an LLM.
"""

from __future__ import annotations

from collections.abc import Iterable

from genie.semantic.patterns.base import MatchedPattern
from genie.semantic.vocab import WorkloadType

__all__ = ["classify", "THRESHOLD"]

THRESHOLD = 0.5


def classify(patterns: Iterable[MatchedPattern]) -> tuple[WorkloadType, float, str]:
    """(workload type, confidence, the pattern that decided it or a reason)."""
    votes: dict[WorkloadType, MatchedPattern] = {}
    for m in patterns:
        wt = m.workload
        if wt is None:
            continue
        wt = WorkloadType(wt)
        if wt not in votes or m.confidence > votes[wt].confidence:
            votes[wt] = m
    for wt in (WorkloadType.MULTIMODAL, WorkloadType.RECSYS):
        m = votes.get(wt)
        if m is not None and m.confidence >= THRESHOLD:
            return wt, m.confidence, m.name
    best = max((votes[w] for w in (WorkloadType.LLM, WorkloadType.VISION) if w in votes),
               key=lambda m: m.confidence, default=None)
    if best is not None and best.confidence >= THRESHOLD:
        return WorkloadType(best.workload), best.confidence, best.name
    top = max((m.confidence for m in votes.values()), default=0.0)
    return WorkloadType.UNKNOWN, round(1.0 - top, 4) if top else 1.0, "no pattern voted >= 0.5"
