"""Profiles per call: analyse every top-level forward of a model while it runs, so a
``generate()`` loop shows its prefill and then its decode steps.

::

    analyzer = SemanticAnalyzer()
    with analyzer.observe(model) as calls:
        model.generate(ids, max_new_tokens=8)
    [p.call_phase for p in calls.profiles]   # ["prefill", "decode", "decode", ...]

Note: [Observing calls]
A forward hook on the model's root runs after each top-level call and analyses the pending
graph, which then holds that call's ops (and any small tail of the previous step that had not
been flushed, such as the logits processing of generate()). The module-context hooks are
installed too, so the nodes carry module paths and roles. Analysis never runs the graph: the
call's results are materialised when the caller reads them, as without the observer.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from genie.semantic.context import ModuleContextTracker

if TYPE_CHECKING:
    from genie.semantic.analyzer import SemanticAnalyzer
    from genie.semantic.profile import WorkloadProfile

logger = logging.getLogger(__name__)

__all__ = ["CallObserver"]


class CallObserver:
    """Analyses each top-level forward of ``model`` with ``analyzer``; a context manager.
    ``profiles`` holds one WorkloadProfile per call; ``errors`` the analyses that raised
    (logged, never propagated into the model's forward)."""

    def __init__(self, analyzer: SemanticAnalyzer, model: torch.nn.Module):
        self.analyzer = analyzer
        self.model = model
        self.profiles: list[WorkloadProfile] = []
        self.errors: list[str] = []
        self._tracker = ModuleContextTracker(model)
        self._handle = None

    @property
    def phases(self) -> list[str | None]:
        """The call phase of each observed call, in order."""
        return [p.call_phase for p in self.profiles]

    def __enter__(self) -> CallObserver:
        self._tracker.install()
        self._handle = self.model.register_forward_hook(self._after_call)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._tracker.remove()

    def _after_call(self, module, args, output) -> None:
        import genie

        try:
            self.profiles.append(self.analyzer.analyze_graph(genie.get_graph(), self.model))
        except Exception as exc:  # noqa: BLE001 - analysis must not break the user's forward
            logger.warning("genie: analysing a call of %s failed: %s", type(module).__name__, exc)
            self.errors.append(f"{type(exc).__name__}: {exc}")

    def __repr__(self) -> str:
        return f"CallObserver({type(self.model).__name__}, calls={len(self.profiles)})"
