"""What a SemanticAnalyzer reports about its own work: analyses, cache hits, timings per tier,
and the analyses slower than GENIE_ANALYZER_SLOW_MS (each also logged once, with its tiers)."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from genie.semantic.profile import WorkloadProfile

logger = logging.getLogger(__name__)

__all__ = ["AnalysisStats"]

_KEEP = 4096  # timings kept for the medians
_KEEP_SLOW = 64  # slow analyses kept for the report


class AnalysisStats:
    """Counts and timings of one analyzer's analyses; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.analyses = 0
        self.hits = 0
        self.misses = 0
        self.total_ms = 0.0
        self.max_ms = 0.0
        self.cold_ms: list[float] = []
        self.hit_ms: list[float] = []
        self.tiers: dict[str, float] = {}  # summed over misses
        self.slow: list[dict[str, Any]] = []

    def account(
        self,
        ms: float,
        hit: bool,
        profile: WorkloadProfile,
        tiers: dict[str, float] | None,
        slow_ms: float,
    ) -> None:
        """One analysis of `ms` milliseconds (`hit`: answered from the cache)."""
        with self._lock:
            self.analyses += 1
            self.total_ms += ms
            self.max_ms = max(self.max_ms, ms)
            if hit:
                self.hits += 1
                _push(self.hit_ms, ms, _KEEP)
            else:
                self.misses += 1
                _push(self.cold_ms, ms, _KEEP)
                for k, v in (tiers or {}).items():
                    self.tiers[k] = self.tiers.get(k, 0.0) + v
        if ms > slow_ms:
            rec = {
                "graph_hash": profile.graph_hash[:16],
                "ms": round(ms, 3),
                "nodes": profile.metadata.get("nodes"),
                "cache_hit": hit,
                "tier_ms": profile.metadata.get("tier_ms"),
            }
            with self._lock:
                _push(self.slow, rec, _KEEP_SLOW)
            logger.warning(
                "genie: semantic analysis of graph %s (%s nodes) took %.1f ms, over "
                "GENIE_ANALYZER_SLOW_MS=%g; tiers: %s",
                rec["graph_hash"],
                rec["nodes"],
                ms,
                slow_ms,
                rec["tier_ms"],
            )

    def report(self) -> dict[str, Any]:
        """Counts, hit rate and timings (the analyzer adds what it knows of its cache)."""
        with self._lock:
            n, misses = self.analyses, self.misses
            return {
                "analyses": n,
                "cache_hits": self.hits,
                "cache_misses": misses,
                "hit_rate": self.hits / n if n else 0.0,
                "total_ms": round(self.total_ms, 3),
                "avg_ms": round(self.total_ms / n, 4) if n else 0.0,
                "max_ms": round(self.max_ms, 3),
                "cold_median_ms": round(_median(sorted(self.cold_ms)), 4),
                "hit_median_ms": round(_median(sorted(self.hit_ms)), 4),
                "tier_avg_ms": {k: round(v / misses, 4) for k, v in self.tiers.items()}
                if misses
                else {},
                "slow_analyses": list(self.slow),
            }


def _push(xs: list, x: Any, cap: int) -> None:
    xs.append(x)
    if len(xs) > cap:
        del xs[: len(xs) - cap]


def _median(xs: list[float]) -> float:
    if not xs:
        return 0.0
    m = len(xs) // 2
    return xs[m] if len(xs) % 2 else (xs[m - 1] + xs[m]) / 2
