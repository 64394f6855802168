"""Which of the caller's tensors a target already holds, and under which storage id.

Note: [Compiled residency]
A program's storages on a target get ids of the compile path's own (``SIDS``, far above the
recorder's), one per local, chosen once. Each call binds the program to them, so a call
re-creates the same storages in place of the last call's: a program keeps one call's results
and intermediates resident, and they go when the compiled graph is dropped. A tensor argument
is uploaded unless the target already holds it: ``Residency`` remembers, per target, which
storage holds which of the caller's tensors at which version (``Tensor._version``, bumped by
every in-place write, an optimizer step included). What it remembers:
- an argument uploaded for a call;
- an argument the program writes (an optimizer step's parameters and momentum, batch norm's
  running statistics, a StaticCache): the server's copy is current after the call. AOT
  autograd bumps such an argument's version once more per call, after the graph on older
  torch, before it on torch whose runtime wrapper is generated code; the bump after is
  remembered ahead, the bump before is allowed for when the writing graph looks it up;
- on a server, an output the program computes whose storage is its whole, dense value: a
  backward's gradients, which a compiled optimizer step then reads where they are. The
  autograd engine stores a detached alias of the gradient in ``.grad``, so a tensor is also
  found by its host storage (the same geometry and version counter) when it is not the
  object remembered.
Parameters and buffers are therefore uploaded at the first call and are bound by id
afterwards, by every program that reads them (forward and backward, each side of a graph
break, each shape, a compiled optimizer step); an input that is a new tensor each call is
uploaded each call. A write through ``.data`` (or through another tensor ``set_`` on the same
storage) does not bump the version, so it is not seen.

Note: [Checking what was found]
Between two calls of a serving loop nothing a program reads has usually changed, and looking
up each of a model's parameters again (a dict lookup, a weak reference, a version each) is most
of a call's own cost; with the caches cold (the server ran a model in between) every object
touched per parameter is a cache miss. ``Residency.snapshot`` keeps what one lookup found for
some tensors: their ids and the versions seen. It stays valid while none of the storages found
is forgotten (``forget`` drops every snapshot that found one: each change of an entry goes
through it) and none of the tensors dies (a weak reference's callback drops it, so that an id
cannot name another tensor while it is valid). ``Snapshot.holds_args`` then asks of the next call's
tensors only their ids (no object read) and versions, in one native pass over the call's
argument list (``_C.VersionCheck``: reading ``Tensor._version`` through Python for each of
BERT-base's 200 parameters was about 0.2 ms a call on a GPU host). Where both match, the
lookup would find what it found before; where not, the caller looks up again.
"""

from __future__ import annotations

import functools
import itertools
import weakref

import torch

from genie.compile.lower import InputSpec

__all__ = ["Residency", "SIDS", "Snapshot", "bumps_after_call", "dense_at_start"]

SIDS = itertools.count(1 << 48)  # storage ids of the compile path (Note: [Compiled residency])


@functools.cache
def bumps_after_call() -> bool:
    """Whether AOT autograd bumps the version of each argument a graph wrote after calling the
    compiled graph (older torch) or before it (torch whose runtime wrapper is generated code,
    ``_codegen_increment_mutation_versions``): a write is remembered at the version it will
    have once AOT autograd is done (Note: [Compiled residency])."""
    from torch._functorch._aot_autograd import runtime_wrappers

    return not hasattr(runtime_wrappers, "_codegen_increment_mutation_versions")


def dense_at_start(ref: dict) -> bool:
    """A ref that views its whole storage from its start, densely (row-major)."""
    stride, expect = list(ref["stride"]), []
    n = 1
    for size in reversed(ref["shape"]):
        expect.append(n)
        n *= size
    expect.reverse()
    itemsize = torch.empty(0, dtype=ref["dtype"]).element_size()
    sized = all(
        s == e or size == 1 for s, e, size in zip(stride, expect, ref["shape"], strict=True)
    )
    return ref["offset"] == 0 and sized and n * itemsize == ref["storage_nbytes"]


class Residency:
    """Which storage on a target holds which tensor of the caller (Note: [Compiled residency])."""

    def __init__(self) -> None:
        # id(tensor) -> (its weakref, version, sid); id(host storage) -> (its weakref,
        # version, sid, geometry); sid -> (id(tensor), id(host storage)).
        self._by_tensor: dict[int, tuple] = {}
        self._by_storage: dict[int, tuple] = {}
        self._by_sid: dict[int, tuple[int, int]] = {}
        # sid -> the snapshots that found it (Note: [Checking what was found])
        self._watch: dict[int, list[_Validity]] = {}

    @staticmethod
    def _version(t: torch.Tensor) -> int | None:
        try:
            return t._version
        except RuntimeError:  # an inference tensor keeps no version: never assumed unchanged
            return None

    @staticmethod
    def _whole(t: torch.Tensor) -> bool:
        """`t` covers its host storage from its start, densely: the target's copy of `t` then
        holds that storage's bytes, and any view of them is read from it."""
        return (
            t.storage_offset() == 0
            and t.numel() * t.element_size() == t.untyped_storage().nbytes()
            # is_contiguous first: prims' check costs ~10 us, and this runs every call
            and (t.is_contiguous() or torch._prims_common.is_non_overlapping_and_dense_or_false(t))
        )

    def lookup_all(
        self, tensors: list[torch.Tensor], ahead: list[int], specs: list[InputSpec]
    ) -> list[int | None]:
        """The storage holding each of `tensors`, None where none holds its current version;
        `ahead`: bumps each version has had that changed nothing (AOT autograd's, made before
        the call); `specs`: the layout the program reads each with. The tensor itself is
        looked up first, in one pass with no call per tensor but the version's: this runs on
        every call of a compiled graph, once per parameter (Note: [The per-call path]); a miss
        is looked up by its host storage."""
        get = self._by_tensor.get
        found: list[int | None] = []
        for t, bumps, spec in zip(tensors, ahead, specs, strict=True):
            e = get(id(t))
            if e is not None and e[0]() is t:
                try:
                    if e[1] + bumps == t._version:
                        found.append(e[2])
                        continue
                except RuntimeError:  # an inference tensor: never assumed unchanged
                    found.append(None)
                    continue
            found.append(self._by_host_storage(t, bumps, spec) if self._by_storage else None)
        return found

    def snapshot(self, args: list, picks: list[int], sids: list[int]) -> tuple[Snapshot, list[int]]:
        """What the lookup finds for those of the arguments `args` at `picks` it finds by
        tensor, at the storage `sids` names, and at their current version (Note: [Checking
        what was found]); and which of `picks` those are, by position."""
        found, covered = [], []
        for j, (i, sid) in enumerate(zip(picks, sids, strict=True)):
            t = args[i]
            e = self._by_tensor.get(id(t))
            version = self._version(t) if e is not None else None
            if e is None or e[0]() is not t or e[2] != sid or version != e[1]:
                continue
            found.append(t)
            covered.append(j)
        snapshot = Snapshot(found, args, [picks[j] for j in covered])
        for j in covered:
            watchers = self._watch.setdefault(sids[j], [])
            if len(watchers) > 8:  # snapshots replaced since: keep the list short
                watchers[:] = [v for v in watchers if v.ok]
            watchers.append(snapshot.validity)
        return snapshot, covered

    def _by_host_storage(self, t: torch.Tensor, bumps: int, spec: InputSpec) -> int | None:
        """A storage holding all of `t`'s host storage (remembered through another tensor over
        it: the alias autograd keeps as .grad, a transposed view of a weight), where the
        program reads `t` as it lies there."""
        st = t.untyped_storage()
        e = self._by_storage.get(id(st))
        if e is None or e[0]() is not st or t.dtype != e[3]:
            return None
        if t.storage_offset() != spec.offset or tuple(t.stride()) != spec.stride:
            return None
        version = self._version(t)
        return e[2] if version is not None and e[1] + bumps == version else None

    def remember(self, t: torch.Tensor, sid: int, bumps: int = 0) -> None:
        """`sid` holds `t`'s values; `bumps`: version bumps still to come that change nothing
        (AOT autograd's, after a graph wrote `t` and the same values were copied back)."""
        self.forget(sid)
        version = self._version(t)
        if version is None:
            return
        old = self._by_tensor.get(id(t))
        if old is not None:
            self.forget(old[2])
        st = t.untyped_storage()
        self._by_tensor[id(t)] = (weakref.ref(t), version + bumps, sid)
        if self._whole(t):
            self._by_storage[id(st)] = (weakref.ref(st), version + bumps, sid, t.dtype)
        self._by_sid[sid] = (id(t), id(st))

    def forget(self, sid: int) -> None:
        ids = self._by_sid.pop(sid, None)
        if ids is None:
            return
        for validity in self._watch.pop(sid, ()):
            validity.drop()
        for table, key in ((self._by_tensor, ids[0]), (self._by_storage, ids[1])):
            e = table.get(key)
            if e is not None and e[2] == sid:
                del table[key]


class _Validity:
    """Whether a snapshot still holds; dropped by a forgotten storage or a tensor's death."""

    __slots__ = ("ok",)

    def __init__(self) -> None:
        self.ok = True

    def drop(self, _ref: object = None) -> None:
        self.ok = False


class Snapshot:
    """Tensors a ``Residency`` found: valid while none of them dies and none of the storages
    found is forgotten (Note: [Checking what was found])."""

    __slots__ = ("_check", "_refs", "validity")

    def __init__(self, tensors: list[torch.Tensor], args: list, picks: list[int]):
        """`tensors`: those found, which are `args` at `picks`, in order."""
        from genie import _C

        self.validity = _Validity()
        self._refs = [weakref.ref(t, self.validity.drop) for t in tensors]
        self._check = _C.VersionCheck(args, picks)  # their ids and versions now

    def holds_args(self, args: list) -> bool:
        """Whether a later call's `args` has the same tensors at the same versions at the
        snapshot's picks, in one native pass: the lookup would find what it found then."""
        return self.validity.ok and self._check.holds(args)
