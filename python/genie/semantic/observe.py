"""Profiles per call: analyse every top-level forward of a model while it runs, so a
``generate()`` loop shows its prefill and then its decode steps.

::

    analyzer = SemanticAnalyzer()
    with analyzer.observe(model) as calls:
        model.generate(ids, max_new_tokens=8)
    [p.call_phase for p in calls.profiles]   # ["prefill", "decode", "decode", ...]

Note: [Observing calls]
A forward pre-hook on the model's root runs what is pending (``genie.synchronize()``), so
the graph a call records is that call alone (what is pending and was recorded inside the
model's submodules -- a seq2seq encoder generate() runs through ``get_encoder()`` -- is
analysed first, as a call of its own) -- the runtime may otherwise keep several
generate() steps pending in one graph when nothing read a value between them. A forward hook
then analyses the pending graph after each top-level call. The module-context hooks are
installed too, so the nodes carry module paths and roles. When a data-dependent op inside
the call needed a value (MoE routing, a mask check), the call was flushed part way and the
analysed graph holds only its tail: ``metadata["flushes_in_call"]`` says how many flushes.
The observer costs one flush per call; the results are the same as without it.
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
        self._handles: list = []
        self._flushes = 0
        self._seen: set[int] = set()  # node ids of the graph analysed last

    @property
    def phases(self) -> list[str | None]:
        """The call phase of each observed call, in order."""
        return [p.call_phase for p in self.profiles]

    def __enter__(self) -> CallObserver:
        self._handles = [self.model.register_forward_pre_hook(self._before_call)]
        self._tracker.install()
        self._handles.append(self.model.register_forward_hook(self._after_call))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._tracker.remove()

    def _before_call(self, module, args) -> None:
        import genie

        pending = genie.get_graph()
        mine, seen = self._tracker.contexts, self._seen
        if any(n.context in mine and n.id not in seen for n in pending.nodes):
            # a submodule ran outside a top-level call (generate() runs a seq2seq encoder
            # through get_encoder()): that is a call too
            self._analyze(pending, module, flushes=0)
        genie.synchronize()
        self._flushes = genie.stats()["flushes"]

    def _after_call(self, module, args, output) -> None:
        import genie

        self._analyze(genie.get_graph(), module, genie.stats()["flushes"] - self._flushes)

    def _analyze(self, graph, module, flushes: int) -> None:
        try:
            self._seen = {n.id for n in graph.nodes}
            profile = self.analyzer.analyze_graph(graph, self.model)
            profile.metadata["flushes_in_call"] = flushes
            self.profiles.append(profile)
        except Exception as exc:  # noqa: BLE001 - analysis must not break the user's forward
            logger.warning("genie: analysing a call of %s failed: %s", type(module).__name__, exc)
            self.errors.append(f"{type(exc).__name__}: {exc}")

    def __repr__(self) -> str:
        return f"CallObserver({type(self.model).__name__}, calls={len(self.profiles)})"
