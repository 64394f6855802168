"""The client's side of speculative runs: the recorder's hook, guesses sent at the first
nodes of a recording, behind an instance's run, or once an early upload they need has begun
(Note: [Client speculation] in speculator.py; Note: [Speculative runs] in
server/speculation.py). The Speculator decides what to guess; this sends it, on the
RemoteExecutor's connection, under its lock.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from genie import _C
from genie.runtime.remote.namer import Known, Sources, Template
from genie.runtime.remote.speculator import SPECULATION_WINDOW

if TYPE_CHECKING:
    from genie.runtime.remote.client import RemoteExecutor

__all__ = ["SpeculatingClient", "SpeculationHook"]


class SpeculationHook:
    """The recorder's hook into a client (Note: [Speculation hook] in
    csrc/capture/speculation_hook.h): how many nodes to fingerprint, and what to do then."""

    window = SPECULATION_WINDOW

    def __init__(self, client: RemoteExecutor):
        self._client = client

    def on_window(self, prefix: bytes) -> None:
        self._client.speculate(prefix)


class SpeculatingClient:
    """RemoteExecutor's speculation methods (a mixin: they use its lock, channel, namer,
    speculator, early uploads and resident map)."""

    def _guess_behind(self, tpl, binding, params, constants, fresh, sources) -> None:
        """Sent right behind an instance's run and fetch, before their replies are read: the
        next step of a decode loop, predicted (Note: [Program templates]), so that the server
        starts it as soon as it has answered the fetch, while this process goes back to the
        user's code to record that step. What the run creates counts as resident for the
        guess; if the run fails, the server declines the guess or the next request undoes it
        (Note: [Speculative runs] in server/speculation.py)."""
        self.namer.settle(tpl, tpl.known, binding, params, constants, sources)
        # The next step's uploads have not begun: a guess that needs one is no guess.
        nothing = Sources()
        if self.speculator.enabled and self._send_spec(tpl, {**self._resident, **fresh}, nothing):
            self.speculator.ahead = True  # the value fetched with this run was read before

    def speculate(self, window: bytes) -> None:
        """The recorder's first nodes since the last flush fingerprint as `window`: if the
        last window like it was followed by a program, ask the server to start that program
        now (Note: [Client speculation])."""
        early = self.early
        follows = self.speculator.on_window(window, 0 if early.flushed else len(early.arrivals))
        if not self._lock.acquire(blocking=False):
            # Another thread is talking to the server (the early-upload sender, say): the
            # guess goes behind what it sends.
            if follows is not None and self.early.enabled:
                flushes = self.counters["flushes"]
                self.early.later(lambda: self._guess_now(follows, flushes))
            return
        started = time.perf_counter()
        try:
            if follows is None or self._broken is not None:
                return
            # Storages the user dropped since the last flush (last call's outputs) are released
            # with the guess, so that the server need not keep them from being overwritten.
            _C._collect()
            if self._send_spec(follows, wait=True):
                self._prefetched = None
        finally:
            self.speculator.ahead = False
            self.counters["speculate_seconds"] += time.perf_counter() - started
            self._lock.release()

    def _send_spec(
        self,
        follows: Known | Template,
        resident: dict | None = None,
        sources: Sources | None = None,
        wait: bool = False,
    ) -> bool:
        """Send the Speculator's guess for `follows` without waiting for its answer; False
        when there is no guess. `sources`: where the guessed request's new inputs come from
        (default: the one being recorded). With `wait`, a guess that binds inputs being
        uploaded early waits for the uploads it needs (Note: [Client speculation])."""
        resident = self._resident if resident is None else resident
        if sources is None:
            sources = Sources(list(self.early.arrivals), self._made_last)
        guess = self.speculator.guess(follows, resident, sources, wait)
        if guess is None or self.channel.specs_unread:
            return False
        self.early.send_queued(progress=False)  # the guess goes behind the uploads it binds
        self.channel.send_unanswered(guess)
        self.counters["spec_sent"] += 1
        return True

    def upload_early(self, sid: int, value: torch.Tensor) -> None:
        """The recorder made `value` storage `sid`'s upload (the copy kernel's private CPU
        snapshot at .to(), or a CPU operand of a remote op): start sending it (Note: [Early
        uploads]); then a guess that waited for it goes."""
        if not self.early.begin(sid, value):
            return
        uploads = len(self.early.arrivals)
        follows = self.speculator.ready(uploads)
        if follows is None and (follows := self.speculator.at_upload(uploads)) is not None:
            self.speculator.ahead = True  # Note: [Guessing at the upload]
            self.counters["spec_at_upload"] += 1
        if follows is not None:
            # As at the window: storages the user dropped since the last flush (the last
            # call's outputs) are released with the guess, so that its run (a CUDA graph
            # replay) need not copy them away first. This runs on the recording thread,
            # outside the recorder's lock, as the window's hook does.
            _C._collect()
            flushes = self.counters["flushes"]
            self.early.later(lambda: self._guess_now(follows, flushes))

    def _guess_now(self, follows: Known | Template, flushes: int) -> None:
        """Send a guess that waited (the caller holds the lock); not once the flush it
        guessed has begun."""
        if flushes != self.counters["flushes"] or self._broken is not None:
            return
        if self._send_spec(follows, wait=True):
            self._prefetched = None
