"""The server's cache of validated programs, shared by its sessions."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import torch

from genie.runtime import protocol as P
from genie.runtime.program.decode import Program, decode_raw
from genie.runtime.program.encode import program_key
from genie.runtime.program.patches import apply_patch, numeric_steps, patch_key, sizes
from genie.runtime.program.run import native_runner

__all__ = ["ProgramCache"]


class ProgramCache:
    """Validated programs by key, shared by all sessions of a server (LRU, bounded bytes)."""

    def __init__(self, max_bytes: int = 256 << 20):
        self._items: OrderedDict[bytes, Program] = OrderedDict()
        self._raws: OrderedDict[bytes, list] = OrderedDict()  # patch bases, unpacked
        self._bytes = 0
        self._max = max_bytes
        self._lock = threading.Lock()
        self.hits = 0
        self.prepared = 0  # instances checked ahead by prepare()
        self.misses = 0

    def get(self, key: bytes) -> Program | None:
        with self._lock:
            p = self._items.get(key)
            if p is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return p

    def add(self, body: bytes, limits: P.Limits) -> Program:
        key = program_key(body)
        with self._lock:
            p = self._items.get(key)
        if p is not None:
            return p
        raw = P.unpack(body, limits)
        p = self._insert(decode_raw(raw, limits, key, body))
        self._remember_raw(key, raw)
        return p

    def patched(self, base: Program, patch: Any, limits: P.Limits) -> Program:
        """The program `patch` makes of `base` (Note: [Program patches]), validated and cached.
        Nodes the patch does not touch keep their checked form from `base`; the dataflow of
        the whole program is checked again."""
        raw = apply_patch(self._raw(base, limits), patch, limits)
        body = P.pack(raw)
        P.need(len(body) <= limits.max_header, "the patched program is too large")
        key = program_key(body)
        with self._lock:
            p = self._items.get(key)
        if p is not None:
            return p
        touched = {entry[0][0] for entry in patch}
        reuse = {k: s for k, s in enumerate(base.steps) if k not in touched}
        # `raw` is what unpacking `body` would give: the base's values and the patch's, both
        # decoded by the same unpacker.
        p = self._insert(decode_raw(raw, limits, key, body, reuse))
        self._remember_raw(key, raw)
        return p

    def _raw(self, program: Program, limits: P.Limits) -> list | None:
        """The decoded-but-unchecked program lists, kept for the last few patch bases; None
        for an instance (Note: [Program instances]), which keeps no body to patch."""
        with self._lock:
            raw = self._raws.get(program.key)
        if raw is None:
            if not program.body:
                return None
            raw = P.unpack(program.body, limits)
            self._remember_raw(program.key, raw)
        return raw

    # Note: [Program instances]
    # A client that knows a program's structure (Note: [Program templates] in remote/namer.py)
    # names the next decode step as base key + a patch of numbers; its key is
    # patch_key(base, patch), computed here. When every patch entry replaces an int leaf
    # that a structure leaves out (a size, stride, offset or storage size of a reference, an
    # int value argument), the ops, wiring, aliasing and creations are the base's, already
    # checked: each reference or argument a patch changes is checked again in full (as
    # decode_node would), and then the only facts of the whole program that numbers
    # decide: every view within its storage's declared size, the bytes each input must
    # hold, and the bytes the program creates.
    # Any other patch is checked like a new program. Instances keep no body: they are never
    # a patch base, and a client that lost track sends its program in full.
    def instance(self, base: Program, patch: Any, key: bytes, limits: P.Limits) -> Program | None:
        """The program keyed `key` = patch_key(base.key, patch), checked and cached; None when
        `base` cannot be patched here (the client then sends its program in full)."""
        with self._lock:
            p = self._items.get(key)
        if p is not None:
            return p
        raw_base = self._raw(base, limits)
        if raw_base is None:
            return None
        entries = P.get_list(patch, "patch", limits.max_list)
        numeric = numeric_steps(base, raw_base, entries, limits)
        if numeric is None:  # not numbers only: checked like a new program
            raw = apply_patch(raw_base, entries, limits)
            touched = {e[0][0] for e in entries}
            reuse = {k: s for k, s in enumerate(base.steps) if k not in touched}
            return self._insert(decode_raw(raw, limits, key, b"", reuse))
        steps, replaced = numeric
        extent, fresh_bytes = sizes(base, steps, replaced)
        return self._insert(
            Program(
                key=key,
                steps=steps,
                nlocals=base.nlocals,
                inputs=base.inputs,
                produced=base.produced,
                extent=extent,
                fresh_bytes=fresh_bytes,
                random_steps=base.random_steps,
                nbytes=base.nbytes,
            )
        )

    def prepare(self, base: Program, patch: list, limits: P.Limits, device: torch.device) -> None:
        """Check and cache the instance `patch` makes of `base` and build its C++ runner, so
        that a request naming it later finds both ready (raises what the check raises)."""
        key = patch_key(base.key, patch)
        with self._lock:
            program = self._items.get(key)
        if program is None:
            program = self.instance(base, patch, key, limits)
            if program is None:
                return
            program.meta["prepared"] = True
            self.prepared += 1
        native_runner(program, device)

    def _remember_raw(self, key: bytes, raw: list) -> None:
        with self._lock:
            self._raws[key] = raw
            self._raws.move_to_end(key)
            while len(self._raws) > 16:
                self._raws.popitem(last=False)

    def _insert(self, p: Program) -> Program:
        with self._lock:
            self._items[p.key] = p
            self._bytes += p.nbytes
            while self._bytes > self._max and len(self._items) > 1:
                _, old = self._items.popitem(last=False)
                self._bytes -= old.nbytes
        return p

    def __len__(self) -> int:
        return len(self._items)
