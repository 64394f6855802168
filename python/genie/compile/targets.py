"""Where compiled programs run: in this process (``LocalTarget``) or on a genie server
(``RemoteTarget``); a ``Placed`` program is one lowered program on one target.

Note: [Compiled residency]
A program's storages on a target get ids of the compile path's own (``_SIDS``, far above the
recorder's), one per local, chosen once. Each call binds the program to them, so a call
re-creates the same storages in place of the last call's: a program keeps one call's results
and intermediates resident, and they go when the compiled graph is dropped. A tensor argument
is uploaded unless the target already holds it: ``Residency`` remembers, per target, which
storage holds which of the caller's tensors at which version (``Tensor._version``, bumped by
every in-place write, an optimizer step included; a write the program made itself, which AOT
autograd bumps the version for after the call, is remembered with that bump). Parameters and
buffers are therefore uploaded
at the first call and are bound by id afterwards, by every program that reads them (forward and
backward, each side of a graph break, each shape); an input that is a new tensor each call
is uploaded each call. A write through ``.data`` does not bump the version, so it is not seen.
"""

from __future__ import annotations

import itertools
import logging
import threading
import weakref
from typing import Any

import numpy as np
import torch

from genie.compile.lower import InputSpec, Lowered, dense_copy
from genie.errors import ExecutionError
from genie.runtime.program import execute
from genie.runtime.replay import Environment, byte_view

__all__ = ["LocalTarget", "Placed", "RemoteTarget", "Residency"]

logger = logging.getLogger(__name__)

_SIDS = itertools.count(1 << 48)  # Note: [Compiled residency]


class Residency:
    """Which storage on a target holds which tensor of the caller (Note: [Compiled residency])."""

    def __init__(self) -> None:
        self._by_tensor: dict[int, tuple[weakref.ref, int, int]] = {}
        self._by_sid: dict[int, int] = {}

    @staticmethod
    def _version(t: torch.Tensor) -> int | None:
        try:
            return t._version
        except RuntimeError:  # an inference tensor keeps no version: never assumed unchanged
            return None

    def lookup(self, t: torch.Tensor) -> int | None:
        e = self._by_tensor.get(id(t))
        if e is None or e[0]() is not t or e[1] != self._version(t) or e[1] is None:
            return None
        return e[2]

    def remember(self, t: torch.Tensor, sid: int, bumps: int = 0) -> None:
        """`sid` holds `t`'s values; `bumps`: version bumps still to come that change nothing
        (AOT autograd's, after a graph wrote `t` and the same values were copied back)."""
        self.forget(sid)
        version = self._version(t)
        if version is not None:
            self._by_tensor[id(t)] = (weakref.ref(t), version + bumps, sid)
            self._by_sid[sid] = id(t)

    def forget(self, sid: int) -> None:
        tid = self._by_sid.pop(sid, None)
        if tid is not None:
            self._by_tensor.pop(tid, None)


# Note: [Saved tensors stay on the server]
# A training forward returns, after the user's outputs, the activations AOT autograd saves for
# backward. On a server target those are not fetched: each call gives them storages of their own
# (fresh ids, so that a second forward before the first backward cannot overwrite them), and the
# forward returns stand-ins: host tensors of the right geometry over memory never written, whose
# data pointer names the server's storage. The backward program records a stand-in's own view of
# its storage and binds the server's storage in its place; when autograd frees the saved tensors
# the stand-in's memory goes and the server's storage is released with the next request. A
# saved tensor read on the host (a saved-tensor hook that offloads it) would see garbage: such
# hooks are not supported with a server target.


# Note: [Random steps of compiled programs]
# A recorded random step (dropout, bernoulli, rand) carries the generator state it drew from at
# recording. A compiled program runs many times, so each call gives each random step a fresh
# CPU generator state, seeded from torch's default generator: results are random from call to
# call and reproducible after torch.manual_seed, but not the numbers eager draws (AOT autograd
# and eager consume the generator differently). Programs with random steps run step by step in
# Python on the server (Note: [Running programs in C++]).
def fresh_states(steps: list[int]) -> dict[int, torch.Tensor]:
    """A generator state for each random step, drawn from torch's default generator."""
    seeds = torch.randint(0, 1 << 62, (len(steps),)).tolist()
    states = {}
    for k, seed in zip(steps, seeds, strict=True):
        states[k] = torch.Generator().manual_seed(seed).get_state()
    return states


# Note: [Unbound results]
# A kernel whose result has another shape than its meta kernel declared leaves that result
# unbound on every executor (Note: [Binding a result on a server] in program/run.py). The one
# known case is CPU batch norm outside training, whose saved statistics are empty where the
# meta kernel sizes them by channel; AOT autograd still returns them from a forward graph, to
# be saved for backward, which does not read them. Such an output comes back as zeros of the
# declared shape.
class Placed:
    """A lowered program on a target, with the storage ids it owns there."""

    def __init__(
        self, target: LocalTarget | RemoteTarget, lowered: Lowered, keep_from: int | None = None
    ):
        self.target = target
        self.low = lowered
        self.sids = [next(_SIDS) for _ in range(lowered.program.nlocals)]
        self.own = frozenset(self.sids)
        self.constants_sent = False
        self.bumped: frozenset[int] = frozenset()  # see CompiledGraph.bumped
        # Outputs saved for backward that stay on the target (Note: [Saved tensors stay on
        # the server]): from `keep_from` on, where the target keeps them.
        self.kept = frozenset(
            j
            for j, o in enumerate(lowered.outputs)
            if keep_from is not None and j >= keep_from and o.kind == "ref"
        )
        self.kept_locals = sorted({lowered.outputs[j].local for j in self.kept})
        self.keep_from = keep_from
        weakref.finalize(self, target.drop, list(self.sids))

    def bind(self, args: list[Any]) -> tuple[list[int], list[tuple]]:
        """The binding of this call and the (storage id, argument index, layout, bytes) to
        upload: arguments the target does not hold (Note: [Compiled residency])."""
        binding = list(self.sids)
        residency = self.target.residency
        bound: set[int] = set()
        uploads = []
        for i, k, spec, nbytes in self.low.inputs:
            if spec.kept:
                sid = self.target.saved_sid(args[i])
                if sid is None or sid in bound:
                    raise ExecutionError(
                        "genie.compile: a tensor a compiled forward saved for backward is not "
                        f"held by {self.target.name} any more (argument {i} of the backward)"
                    )
                binding[k] = sid
                bound.add(sid)
                continue
            sid = residency.lookup(args[i])
            if sid is None or sid in bound or (sid in self.own and sid != self.sids[k]):
                sid = self.sids[k]
                uploads.append((sid, i, spec, nbytes))
            binding[k] = sid
            bound.add(sid)
        return binding, uploads

    def results(self, args: list[Any], fetched: list[torch.Tensor], kept: dict | None = None):
        """The graph's outputs from the fetched values and the kept ones, in its container."""
        values = iter(fetched)
        out = []
        for j, o in enumerate(self.low.outputs):
            if j in self.kept:
                out.append(kept[j])
            elif o.kind == "ref":
                v = next(values)
                if v is None:  # Note: [Unbound results]
                    v = torch.zeros(o.ref["shape"], dtype=o.ref["dtype"])
                stride = tuple(o.ref["stride"])
                if v.dim() > 1 and tuple(v.stride()) != stride:
                    v = torch.empty_strided(v.shape, stride, dtype=v.dtype).copy_(v)
                out.append(v)
            elif o.kind == "arg":
                r, a = o.ref, args[o.arg]
                if (
                    self.keep_from is not None
                    and j >= self.keep_from
                    and list(a.shape) == r["shape"]
                    and list(a.stride()) == r["stride"]
                    and a.storage_offset() == r["offset"]
                ):
                    out.append(a)  # an argument saved for backward as it is: still resident
                else:
                    out.append(a.as_strided(r["shape"], r["stride"], r["offset"]))
            elif o.kind == "cpu":
                out.append(o.value.clone())
            else:
                out.append(o.value)
        with torch.no_grad():
            for (i, _), v in zip(self.low.writes, values, strict=True):
                args[i].copy_(v)
        if self.low.container is None:
            return out[0]
        return self.low.container(out)

    def refs(self, binding: list[int]) -> list[dict]:
        """What to fetch: the outputs the program computes, then the arguments it writes."""
        refs = [
            {**o.ref, "storage": binding[o.local]}
            for j, o in enumerate(self.low.outputs)
            if o.kind == "ref" and j not in self.kept
        ]
        arg_local = {i: k for i, k, _, _ in self.low.inputs}
        refs += [{**r, "storage": binding[arg_local[i]]} for i, r in self.low.writes]
        return refs

    def __call__(self, args: list[Any]):
        with self.target.lock:  # a backward runs on autograd's thread
            return self.target.run(self, args)


def _upload_value(
    t: torch.Tensor, spec: InputSpec, nbytes: int, device: torch.device
) -> tuple[torch.Tensor, bool]:
    """`t` as the program reads it on `device`, and whether that is `t`'s own memory: as it is
    where its layout fits, else a copy."""
    if t.device == device and spec.fits(t, nbytes) and not t.is_conj() and not t.is_neg():
        return t.detach(), True
    return dense_copy(t, spec, device), False


class LocalTarget:
    """Runs programs in this process on `device`, checked as a server checks them, with the C++
    program runner. CPU arguments on a CPU target are read where they are, never copied."""

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.env = Environment(self.device)
        self.residency = Residency()
        self.lock = threading.RLock()
        self.name = f"local:{self.device}"
        self.counters = {"runs": 0, "programs": 0, "uploads": 0, "upload_bytes": 0}

    def place(self, lowered: Lowered, keep_from: int | None = None) -> Placed:
        """`lowered` on this target; outputs saved for backward are views here anyway."""
        self.counters["programs"] += 1
        return Placed(self, lowered)

    def saved_sid(self, t: torch.Tensor) -> int | None:
        return None

    def run(self, placed: Placed, args: list[Any]):
        low, storages = placed.low, self.env.storages
        if not placed.constants_sent:
            for k, value in low.constants:
                storages[placed.sids[k]] = (
                    byte_view(value.untyped_storage()).to(self.device, copy=True).untyped_storage()
                )
            placed.constants_sent = True
        binding, uploads = placed.bind(args)
        borrowed = []
        for sid, i, spec, nbytes in uploads:
            t, own = _upload_value(args[i], spec, nbytes, self.device)
            storages[sid] = t.untyped_storage()
            if own:
                borrowed.append(sid)  # the caller's own memory: not kept after the call
            else:
                self.residency.remember(args[i], sid)
                self.counters["uploads"] += 1
                self.counters["upload_bytes"] += t.untyped_storage().nbytes()
        execute(low.program, binding, fresh_states(low.program.random_steps), self.env)
        self.counters["runs"] += 1
        fetched = []
        for r in placed.refs(binding):
            st = storages.get(r["storage"])
            if st is None:  # Note: [Unbound results]
                fetched.append(None)
                continue
            v = torch.empty(0, dtype=r["dtype"], device=st.device)
            v = v.set_(st, r["offset"], r["shape"], r["stride"])
            fetched.append(v if self.device.type == "cpu" else v.cpu())
        out = placed.results(args, fetched)
        for sid in borrowed:
            storages.pop(sid, None)
        return out

    def drop(self, sids: list[int]) -> None:
        for sid in sids:
            self.env.storages.pop(sid, None)
            self.residency.forget(sid)


class RemoteTarget:
    """Runs programs on a genie server through a RemoteExecutor session: the program goes once,
    then each call is its key, its binding, the uploads it needs and the fetches of its
    outputs, in one exchange (RemoteExecutor.run_program)."""

    def __init__(self, executor):
        self.executor = executor
        self.residency = Residency()
        self.lock = threading.RLock()
        self._saved: dict[int, int] = {}  # stand-in's data pointer -> storage id on the server
        self.name = executor.name
        self.device = torch.device("cpu")  # where arguments are uploaded from

    @property
    def counters(self) -> dict:
        return self.executor.counters

    def place(self, lowered: Lowered, keep_from: int | None = None) -> Placed:
        """`lowered` on this target; its outputs from `keep_from` on (a forward's tensors saved
        for backward) stay here (Note: [Saved tensors stay on the server])."""
        return Placed(self, lowered, keep_from)

    def saved_sid(self, t: torch.Tensor) -> int | None:
        """The storage on the server that stands behind `t`, a stand-in made by ``_keep``."""
        return self._saved.get(t.untyped_storage().data_ptr())

    def _keep(self, ref: dict, sid: int) -> torch.Tensor:
        """A stand-in for the server's storage `sid` under `ref`'s geometry: host memory never
        written (so never touched), whose end releases `sid` (Note: [Saved tensors stay on
        the server])."""
        arr = np.empty(max(int(ref["storage_nbytes"]), 1), dtype=np.uint8)
        st = torch.from_numpy(arr).untyped_storage()
        ptr = st.data_ptr()
        self._saved[ptr] = sid
        weakref.finalize(arr, self._unkeep, ptr, sid)
        t = torch.empty(0, dtype=ref["dtype"])
        return t.set_(st, ref["offset"], ref["shape"], ref["stride"])

    def _unkeep(self, ptr: int, sid: int) -> None:
        self._saved.pop(ptr, None)
        self.drop([sid])

    def run(self, placed: Placed, args: list[Any]):
        low = placed.low
        constants: dict[int, torch.Tensor] = {}
        if not placed.constants_sent:
            constants = {placed.sids[k]: value for k, value in low.constants}
        binding, uploads = placed.bind(args)
        for sid, i, spec, nbytes in uploads:
            constants[sid] = _upload_value(args[i], spec, nbytes, self.device)[0]
            self.residency.remember(args[i], sid)
        for k in placed.kept_locals:  # a storage of their own per call, until backward
            binding[k] = next(_SIDS)
        states = fresh_states(low.program.random_steps)
        rng = [[k, st.numpy().tobytes()] for k, st in states.items()]
        refs = placed.refs(binding)
        fetched = self.executor.run_program(low.enc, binding, constants, refs, rng)
        placed.constants_sent = True
        kept = {}
        for j in placed.kept:
            o = low.outputs[j]
            kept[j] = self._keep(o.ref, binding[o.local])
        out = placed.results(args, fetched, kept)
        arg_local = {i: k for i, k, _, _ in low.inputs}
        for i, _ in low.writes:  # written here and there alike: the server's copy is current
            self.residency.remember(args[i], binding[arg_local[i]], int(i in placed.bumped))
        return out

    def drop(self, sids: list[int]) -> None:
        for sid in sids:
            self.residency.forget(sid)
        try:
            self.executor.release(sids)
        except Exception as e:  # noqa: BLE001 - a closed session holds nothing any more
            logger.debug("genie.compile: releasing a dropped program's storages: %s", e)
