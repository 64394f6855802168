"""On/off settings from the environment (``GENIE_SPECULATE``, ``GENIE_DPDK_IN_PROCESS``, ...),
read one way everywhere: a setting that reads as neither raises rather than being taken as
whichever default the reader happened to have."""

from __future__ import annotations

import os

from genie.errors import GenieError

__all__ = ["env_flag"]

_ON = ("1", "true", "yes", "on")
_OFF = ("0", "false", "no", "off")


def env_flag(name: str, default: bool) -> bool:
    """``$name`` as a switch: 1/true/yes/on or 0/false/no/off in any case; `default` when it
    is unset or empty."""
    text = os.environ.get(name, "").strip().lower()
    if not text:
        return default
    if text in _ON:
        return True
    if text in _OFF:
        return False
    raise GenieError(
        f"genie: {name}={os.environ[name]!r} is not a switch: use one of "
        f"{', '.join(_ON)} or {', '.join(_OFF)}"
    )
