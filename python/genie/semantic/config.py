"""AnalyzerConfig: the semantic layer's switches, from arguments or the environment.

=========================  =======================================================  =========
variable                   meaning                                                  default
=========================  =======================================================  =========
GENIE_ANALYZER_CACHE       0/false/off disables the result cache; a number > 1 sets  on, 256
                           how many graphs it keeps (least recently used leave)
GENIE_ANALYZER_SLOW_MS     log a warning when one analysis takes longer (ms)         100
GENIE_ANALYZER_DEBUG       1: log each tier's time and every pattern's verdict at    off
                           INFO and keep them in ``profile.metadata["debug"]``
GENIE_FAST_PATTERNS        1: skip NetworkX subgraph matching; patterns fall back     off
                           to op counts and roles
GENIE_PHASE_DETECTION      0: do not detect phases (no ``execution_phase``)           on
GENIE_PATTERN_PLUGINS      ``mod:Class,mod:factory`` plugins (read by the registry)   none
=========================  =======================================================  =========
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

logger = logging.getLogger(__name__)

__all__ = ["AnalyzerConfig"]

_FALSE = {"0", "false", "off", "no", ""}
_TRUE = {"1", "true", "on", "yes"}


@dataclass
class AnalyzerConfig:
    cache: bool = True
    cache_size: int = 256
    slow_ms: float = 100.0
    debug: bool = False
    fast_patterns: bool = False
    phase_detection: bool = True
    try_fx: bool = True  # trace non-HF models with torch.fx in tier 2
    topology: bool = True  # NetworkX DAG and component checks in tier 1

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> AnalyzerConfig:
        env = os.environ if env is None else env
        cfg = cls()
        raw = env.get("GENIE_ANALYZER_CACHE")
        if raw is not None:
            v = raw.strip().lower()
            if v in _FALSE:
                cfg.cache = False
            elif v.isdigit() and int(v) > 1:
                cfg.cache_size = int(v)
            elif v not in _TRUE:
                logger.warning("genie: GENIE_ANALYZER_CACHE=%r not understood; cache stays on", raw)
        raw = env.get("GENIE_ANALYZER_SLOW_MS")
        if raw:
            try:
                cfg.slow_ms = float(raw)
            except ValueError:
                logger.warning("genie: GENIE_ANALYZER_SLOW_MS=%r is not a number", raw)
        cfg.debug = _flag(env, "GENIE_ANALYZER_DEBUG", False)
        cfg.fast_patterns = _flag(env, "GENIE_FAST_PATTERNS", False)
        cfg.phase_detection = _flag(env, "GENIE_PHASE_DETECTION", True)
        return cfg


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None:
        return default
    v = raw.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    logger.warning("genie: %s=%r not understood (use 0 or 1); using %s", name, raw, default)
    return default
