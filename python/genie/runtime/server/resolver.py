"""From what a request names to a checked program: a key, a body, or a base and a patch
(Note: [Programs and bindings], Note: [Program patches], Note: [Program instances]), and the
helper that checks the likely next instance ahead (Note: [Preparing the next instance])."""

from __future__ import annotations

import contextlib
import logging
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from genie.errors import GenieError
from genie.runtime import protocol as P
from genie.runtime.program import Program, ProgramCache, next_patch, patch_key

logger = logging.getLogger(__name__)

__all__ = ["Preparer", "ProgramResolver", "UnknownProgram"]


class UnknownProgram(GenieError):
    """The request names a program by key that the server does not have; the client sends it
    again with its body."""


# Note: [Preparing the next instance]
# In a decode loop every step is a new instance of one template (Note: [Program
# instances]): checking it and building its C++ runner cost about a millisecond of the
# server's thread per step on an H200 host, with the GPU waiting. The server can guess
# the next instance as well as the client does: each int of the last patch moved on by
# its last change (program.next_patch). So when a request names an instance, the session
# hands the guess to the server's helper thread, which checks and caches that instance
# and its runner while this thread launches the current step in C++ (the GIL is free
# then). A right guess is found in the cache; a wrong one costs the helper's time and a
# cache entry. The guess is checked like any program, since it is made of the client's
# numbers. Only CUDA servers do this: on a CPU server the helper would take a core from
# the kernels.
class Preparer:
    """The server's helper thread that checks likely next instances ahead; shared by every
    session of a server."""

    def __init__(
        self, programs: ProgramCache, limits: P.Limits, device: torch.device, enabled: bool
    ):
        self._programs = programs
        self._limits = limits
        self._device = device
        self._helper: ThreadPoolExecutor | None = None
        self.hits = 0  # requests that found a prepared instance
        if enabled:
            self._helper = ThreadPoolExecutor(1, thread_name_prefix="genie-prepare")
            # A thread that wants the GIL back from the helper waits at most this long.
            sys.setswitchinterval(min(sys.getswitchinterval(), 0.0005))

    def submit(self, base: Program, before: list, last: list) -> None:
        """Prepare the instance that likely follows the patches `before` and `last` of `base`."""
        if self._helper is None:
            return

        def job() -> None:
            guess = next_patch(before, last)
            if guess is None:
                return
            try:
                self._programs.prepare(base, guess, self._limits, self._device)
            except GenieError as e:  # a guess that does not check: the client will not send it
                logger.debug("genie: no prepared instance: %s", e)
            except Exception:  # noqa: BLE001 - the helper must outlive a bad guess
                logger.exception("genie: preparing the next instance failed")

        with contextlib.suppress(RuntimeError):  # shut down meanwhile
            self._helper.submit(job)

    def wait(self) -> None:
        """Block until every guess submitted so far has been prepared (or dropped)."""
        if self._helper is not None:
            self._helper.submit(lambda: None).result()

    def shutdown(self) -> None:
        if self._helper is not None:
            self._helper.shutdown(wait=False, cancel_futures=True)
            self._helper = None


class ProgramResolver:
    """One session's view of the server's program cache: resolves the program a request
    names and remembers the last patch of each base, from which the next is guessed."""

    def __init__(self, programs: ProgramCache, limits: P.Limits, preparer: Preparer):
        self._programs = programs
        self._limits = limits
        self._preparer = preparer
        self._last_patch: dict[bytes, list] = {}  # base key -> the last patch of it named

    def resolve(self, ref: P.ProgramRef) -> Program | None:
        """The program `ref` names (Note: [Program refs]): its body when it carries one, else
        the cached program its key names, or the one it describes as a patch of a cached
        base: an instance (Note: [Program instances]) when the key is the patch's key, else a
        patched program whose bytes hash to the key (Note: [Program patches]). None when the
        server does not have it (the client then sends the body)."""
        if ref.body is not None:
            program = self._programs.add(ref.body, self._limits)
            P.need(program.key == ref.key, "the program key does not match the program")
            return program
        return self.lookup(ref)

    def lookup(self, ref: P.ProgramRef) -> Program | None:
        """resolve() without the body (a spec names only programs the server has)."""
        cache = self._programs
        key = ref.key
        program = cache.get(key)
        if ref.base is None:
            return program
        base = cache.get(ref.base)
        if base is None:
            return program
        patch = ref.patch
        if program is not None:
            if program.meta.pop("prepared", False):
                self._preparer.hits += 1
            self._prepare_next(base, patch)
            return program
        if key == patch_key(base.key, patch):
            program = cache.instance(base, patch, key, self._limits)
            self._prepare_next(base, patch)
            return program
        program = cache.patched(base, patch, self._limits)
        return program if program.key == key else None  # packed differently: the body follows

    def _prepare_next(self, base: Program, patch: Any) -> None:
        before = self._last_patch.pop(base.key, None)
        self._last_patch[base.key] = patch
        while len(self._last_patch) > 4:
            del self._last_patch[next(iter(self._last_patch))]
        if before is not None:
            self._preparer.submit(base, before, patch)
