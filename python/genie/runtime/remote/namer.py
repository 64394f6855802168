"""How the client names a flush to the server (Note: [Program refs] in protocol.py): by key
when the server has the program, as a numbers-only instance of a template, as a patch of a
similar program, or in full; and what it learns from each run to name the next one."""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from genie.runtime import protocol as P
from genie.runtime.program import EncodedProgram, diff_program, patch_key

logger = logging.getLogger(__name__)

__all__ = ["Known", "ProgramNamer", "Sources", "Template", "make_template", "storage_span"]

MAX_BASES = 64  # programs kept to patch against (Note: [Program patches])
MAX_DIGESTS = 256  # programs known by their digest (Note: [Program digests])
MAX_TEMPLATES = 64  # structures whose next programs go as numbers (Note: [Program templates])


@dataclass
class Sources:
    """Where the new inputs of the request being recorded come from (Note: [Client
    speculation]): the uploads begun early for it and the storages the flush before this
    one created, each in order."""

    uploads: list[int] | tuple = ()
    made_before: list[int] | tuple = ()

    def positions(self) -> tuple[dict[int, int], dict[int, int]]:
        return (
            {sid: k for k, sid in enumerate(self.uploads)},
            {sid: j for j, sid in enumerate(self.made_before)},
        )


@dataclass
class Known:
    key: bytes
    enc: Any  # EncodedProgram: the body, for a server that forgot it, and a patch base
    created: list[tuple[int, int]]  # (local, bytes) of storages the program creates
    external: list[int]  # locals the program does not create
    random: bool
    last: list[int] | None = None  # bindings of the last two runs
    before: list[int] | None = None
    empty_last: frozenset[int] = frozenset()  # locals bound to empty uploads in those runs
    empty_before: frozenset[int] = frozenset()
    # local -> (position among the uploads begun early for the request, position among the
    # storages the flush before created) in each of those runs (Note: [Client speculation])
    sources_last: tuple[dict[int, int], dict[int, int]] | None = None
    sources_before: tuple[dict[int, int], dict[int, int]] | None = None

    def predict(
        self, resident: dict[int, int], sources: Sources | None = None
    ) -> list | int | None:
        """The next run's binding (Note: [Client speculation]); None when there is no guess;
        an int when it binds that many early uploads and fewer have begun."""
        b1, b0 = self.last, self.before
        if b1 is None or b0 is None or self.random:
            return None
        made0 = None
        out: list[Any] = [None] * len(b1)
        need = 0
        src1, src0 = self.sources_last, self.sources_before
        sources = sources or Sources()
        for s in self.external:
            x = b1[s]
            if x != b0[s]:
                if src1 is not None and src0 is not None:
                    k = src1[0].get(s, -1)
                    if k >= 0 and src0[0].get(s) == k:  # the k-th upload begun at .to()
                        if k < len(sources.uploads):
                            out[s] = sources.uploads[k]
                        need = max(need, k + 1)
                        continue
                    j = src1[1].get(s, -1)
                    if j >= 0 and src0[1].get(s) == j and j < len(sources.made_before):
                        x = sources.made_before[j]  # made by the flush before, as last time
                        if x not in resident:
                            return None
                        out[s] = x
                        continue
                if made0 is None:
                    made0 = {b0[j]: j for j, _ in self.created}
                j = made0.get(x)
                if j is None:
                    if s in self.empty_last and s in self.empty_before:
                        # An empty tensor made on the host each time (HF's DynamicCache
                        # starts from torch.tensor([])): it carries no bytes to predict.
                        out[s] = P.EMPTY_UPLOAD
                        continue
                    return None
                x = b1[j]
            if x not in resident:
                return None
            out[s] = x
        if need > len(sources.uploads):
            return need
        return out


# Note: [Program templates]
# A decode loop with HF's DynamicCache records a new program every step: the cache grows by
# one position, so sizes, strides and byte counts move, and so does the digest. The C++
# digest also gives the program's structure (everything but those integers) and the integers
# themselves (Note: [Program templates] in csrc/capture/digest.h). The first program of a
# structure goes in full and becomes the template's base. Each later program of that
# structure goes as the base's key plus a patch of the integers that differ from the base's
# ([path, value] entries), named patch_key(base, patch): no node is converted or encoded on
# the client, and the server checks only the references and arguments the patch changes
# (Note: [Program instances] in program/cache.py). Because the integers of a decode step move by the same amount
# every step, the next step's are predicted (last + (last - before)), and that guess goes right
# behind the current step's run and fetch (Speculator.behind), so the server starts the next step as
# soon as it has answered, while this process records it (Note: [Client speculation]). The paths come from C++; the
# client checks once per structure that each one names a leaf of its own encoding holding that
# integer, and never uses a structure that fails the check.
@dataclass
class Template:
    known: Known  # the base program; bindings of this structure's last runs
    params: np.ndarray  # the base's integers
    paths: list[list[int]]  # where each integer sits in the encoded program
    fresh: list[tuple[int, int]]  # (local, index of its byte count) for created storages
    last: np.ndarray | None = None  # integers of this structure's last two runs
    before: np.ndarray | None = None
    named: tuple | None = None  # (base key, integers, patch, key) last named: the next run's

    def patch(self, params: np.ndarray) -> list[list]:
        paths = self.paths
        return [[paths[i], v] for i, v in zip(*_changed(self.params, params), strict=True)]

    def name(self, params: np.ndarray) -> tuple[list[list], bytes]:
        """The patch of the base that makes the program with `params`, and its key; a guess
        names the next run first (Note: [Program templates]), so each is made once."""
        named, base = self.named, self.known.key
        if named is not None and named[0] == base and np.array_equal(named[1], params):
            return named[2], named[3]
        patch = self.patch(params)
        key = patch_key(base, patch)
        self.named = (base, params, patch, key)
        return patch, key

    def created(self, binding: list[int], params: np.ndarray) -> dict[int, int]:
        """Storage id -> bytes of each storage a run with `params` creates (none if empty)."""
        where = self.__dict__.get("_fresh_at")
        if where is None:
            where = self._fresh_at = np.array([i for _, i in self.fresh], dtype=np.int64)
        sizes = params[where].tolist()
        return {binding[local]: n for (local, _), n in zip(self.fresh, sizes, strict=True) if n}

    def predict(self) -> np.ndarray | None:
        """The next run's integers, continued in a straight line from the last two runs; None
        where that would make an integer negative that was not (a byte count or a size that
        shrank: the server refuses such a program, so the guess would only cost a round trip
        and a warning)."""
        if self.last is None or self.before is None:
            return None
        nxt = 2 * self.last - self.before
        if ((nxt < 0) & (self.last >= 0)).any():
            return None
        return nxt


def _changed(a: np.ndarray, b: np.ndarray) -> tuple[list[int], list[int]]:
    idx = np.flatnonzero(a != b)
    return idx.tolist(), b[idx].tolist()


def _leaf(nodes: list, path: list[int]) -> Any:
    x: Any = nodes
    for i in path:
        if type(x) is not list or not 0 <= i < len(x):
            return None
        x = x[i]
    return x


def make_template(known: Known, params: np.ndarray, paths: list[list[int]]) -> Template | None:
    nodes = known.enc.nodes
    if len(paths) != len(params):
        return None
    for path, v in zip(paths, params.tolist(), strict=True):
        leaf = _leaf(nodes, path)
        if type(leaf) is not int or leaf != v:
            return None
    index = {tuple(p): i for i, p in enumerate(paths)}
    made: dict[int, int] = {}  # local -> index of the byte count of the output creating it
    for k, n in enumerate(nodes):
        for j, (r, a) in enumerate(zip(n[3], n[4], strict=True)):
            if r is not None and a == -1 and r[0] not in made:
                made[r[0]] = index.get((k, 3, j, 5), -1)
    fresh = [(local, made.get(local, -1)) for local, _ in known.created]
    if any(i < 0 for _, i in fresh):
        return None
    return Template(known=known, params=params, paths=paths, fresh=fresh)


def storage_span(t: torch.Tensor) -> tuple[int, int]:
    """The bytes [lo, hi) of t's storage that t's view covers."""
    if t.numel() == 0:
        return 0, 0
    isz = t.element_size()
    last = t.storage_offset() + sum((s - 1) * st for s, st in zip(t.shape, t.stride(), strict=True))
    return t.storage_offset() * isz, (last + 1) * isz


class ProgramNamer:
    """Turns a flush into one ProgramRef and learns from each run (Note: [Program refs]).

    It keeps what the server has been sent (keys), recent programs to patch against by their
    op sequence, programs known by their C++ digest with their last bindings, and templates
    by structure with their last integers."""

    def __init__(self) -> None:
        self.patches = True  # send programs as patches of similar ones (Note: [Program patches])
        self.templates = True  # name programs of a known structure as instances
        self.sent: set[bytes] = set()  # keys of programs the server has checked
        self._bases: OrderedDict[tuple, tuple[bytes, list]] = OrderedDict()  # op sequence ->
        # (key, program) sent last
        self.known: OrderedDict[bytes, Known] = OrderedDict()  # digest -> program
        # structure -> its template, or None for one that cannot be (Note: [Program templates])
        self._templates: OrderedDict[bytes, Template | None] = OrderedDict()

    # -- naming -----------------------------------------------------------------------------
    def ref(self, enc: EncodedProgram) -> P.ProgramRef:
        """`enc` by key when the server has it, else as a patch of a similar program it has
        (Note: [Program patches]) when that is much smaller, else in full."""
        if enc.key in self.sent:
            return P.ProgramRef(enc.key)
        base = self._bases.get(enc.signature)
        if base is not None and self.patches:
            patch = diff_program(base[1], enc.nodes)
            if len(patch) * 24 < len(enc.body) // 2:
                return P.ProgramRef(enc.key, base=base[0], patch=patch)
        return P.ProgramRef(enc.key, body=enc.body)

    def instance(self, tpl: Template, params: np.ndarray) -> P.ProgramRef:
        """The program with `params` as an instance of `tpl` (Note: [Program templates])."""
        patch, key = tpl.name(params)
        return P.ProgramRef(key, base=tpl.known.key, patch=patch)

    def template(self, template: tuple | None) -> tuple[bytes | None, Any, Template | None]:
        """(structure, integers, its template if known) of a flush's C++ template digest."""
        if template is None or not self.templates:
            return None, None, None
        structure, params = template[0], np.frombuffer(template[1], dtype=np.int64)
        tpl = self._templates.get(structure)
        if tpl is not None and len(params) != len(tpl.params):
            tpl = None
        return structure, params, tpl

    def by_digest(self, fingerprint: bytes) -> Known | None:
        known = self.known.get(fingerprint)
        if known is not None:
            self.known.move_to_end(fingerprint)
        return known

    # -- learning ---------------------------------------------------------------------------
    def sent_in_full(self, enc: EncodedProgram) -> None:
        """`enc` went as a program of its own: the next one of its op sequence patches it."""
        self._bases.pop(enc.signature, None)
        self._bases[enc.signature] = (enc.key, enc.nodes)
        if len(self._bases) > MAX_BASES:
            self._bases.popitem(last=False)  # the least recently sent

    def checked(self, key: bytes) -> None:
        """The server accepted the program keyed `key`."""
        self.sent.add(key)

    def forget_template(self, structure: bytes) -> None:
        """The server lost a template's base: the structure starts again."""
        self._templates.pop(structure, None)

    def learn(
        self,
        fingerprint: bytes,
        enc: EncodedProgram,
        binding: list[int],
        structure: bytes | None,
        params: Any,
        paths: Any,
    ) -> Known:
        """A program converted and sent for digest `fingerprint`: known from now on, and the
        base of its structure's template when it has one."""
        slot_of = {sid: i for i, sid in enumerate(binding)}
        created = {s for d in enc.nodes for s in d[6]}
        created.update(slot_of[sid] for sid in enc.fresh)
        known = Known(
            key=enc.key,
            enc=enc,
            created=[(s, enc.fresh.get(binding[s], 0)) for s in sorted(created)],
            external=[s for s in range(len(binding)) if s not in created],
            random=bool(enc.rng),
        )
        self.known[fingerprint] = known
        if len(self.known) > MAX_DIGESTS:
            self.known.popitem(last=False)
        if structure is not None and structure not in self._templates:
            tpl = make_template(known, params.copy(), paths())
            if tpl is None:
                logger.debug("genie: a program's integers do not match its encoding")
            self._templates[structure] = tpl
            if len(self._templates) > MAX_TEMPLATES:
                self._templates.popitem(last=False)
        return known

    @staticmethod
    def settle(tpl, known, binding, params, constants, sources: Sources | None = None) -> None:
        """Remember this flush's integers and binding: what the next one is predicted from;
        `sources`: where its request's new inputs came from."""
        if tpl is not None:
            tpl.before, tpl.last = tpl.last, params
        known.before, known.last = known.last, list(binding)
        empties = {sid for sid, t in constants.items() if storage_span(t) == (0, 0)}
        known.empty_before = known.empty_last
        known.empty_last = frozenset(i for i, sid in enumerate(binding) if sid in empties)
        known.sources_before = known.sources_last
        if sources is None:
            known.sources_last = None
            return
        uploads, made = sources.positions()
        known.sources_last = (
            {i: uploads[sid] for i, sid in enumerate(binding) if sid in uploads},
            {i: made[sid] for i, sid in enumerate(binding) if sid in made},
        )

    def templates_known(self) -> list[Template]:
        return [t for t in self._templates.values() if t is not None]
