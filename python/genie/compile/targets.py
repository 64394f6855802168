"""Where compiled programs run: in this process (``LocalTarget``) or on a genie server
(``RemoteTarget``); a ``Placed`` program is one lowered program on one target. Which
storage a target holds for which of the caller's tensors: Note: [Compiled residency] in
residency.py.

Note: [The per-call path]
Once a program is placed, a call should cost the client only its guards, the arguments that
changed, one exchange and the outputs. Everything a call needs that does not depend on the
call's values is worked out when the program is placed (``Placed.__init__``: which inputs are
kept, which outputs are fetched and under which refs, which outputs stay resident), and the
residency check of every parameter is the check of what the last call found, one native pass
over ids and versions (Note: [Checking what was found] in residency.py); only the arguments it
does not cover (a fresh input, a tensor the program writes) are looked up
(``Residency.lookup_all``, one tight pass). A program without random steps draws no generator
states. Where a call's client CPU goes: README, "torch.compile".
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Any, NamedTuple

import numpy as np
import torch

from genie.compile.lower import InputSpec, Lowered, dense_copy
from genie.compile.residency import SIDS, Residency, Snapshot, bumps_after_call, dense_at_start
from genie.errors import ExecutionError
from genie.runtime.program import execute
from genie.runtime.replay import Environment, byte_view

__all__ = ["LocalTarget", "Placed", "RemoteTarget"]

logger = logging.getLogger(__name__)

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
    if not steps:
        return {}
    seeds = torch.randint(0, 1 << 62, (len(steps),)).tolist()
    states = {}
    for k, seed in zip(steps, seeds, strict=True):
        states[k] = torch.Generator().manual_seed(seed).get_state()
    return states


class _Held(NamedTuple):
    """What the last call found held (Note: [Checking what was found]), the binding that
    gives it, and the plain inputs looked up each call."""

    snapshot: Snapshot
    binding: list[int]
    rest: list[tuple]
    rest_found: int  # how many of `rest` were found held then (a .grad by its storage)


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
        self,
        target: LocalTarget | RemoteTarget,
        lowered: Lowered,
        keep_from: int | None = None,
        defer: bool = False,
    ):
        self.target = target
        self.low = lowered
        self.sids = [next(SIDS) for _ in range(lowered.program.nlocals)]
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
        # What every call needs, worked out once (Note: [The per-call path]).
        self.arg_local = {i: k for i, k, _, _ in lowered.inputs}
        self._kept_inputs = [(i, k) for i, k, spec, _ in lowered.inputs if spec.kept]
        self._plain_inputs = [e for e in lowered.inputs if not e[2].kept]
        self._input_locals = [k for _, k, _, _ in lowered.inputs]
        self._fetched = [
            (o.local, o.ref)
            for j, o in enumerate(lowered.outputs)
            if o.kind == "ref" and j not in self.kept
        ]
        # Floating-point arguments the program writes stay there with `defer` (Note: [Deferred
        # host copies]); the others are fetched and copied into the caller's tensors.
        self.defer = defer
        self.deferred_writes = [
            (i, r) for i, r in lowered.writes if defer and r["dtype"].is_floating_point
        ]
        self._copied_writes = [
            (i, r) for i, r in lowered.writes if (i, r) not in self.deferred_writes
        ]
        self._fetched += [(self.arg_local[i], r) for i, r in self._copied_writes]
        # A backward under `defer` keeps its gradients there too (keep_from=0): poisoned.
        self.poison_kept = defer and keep_from == 0
        # Outputs whose storage a later program may bind in place of uploading the value
        # (a backward's gradients, read by a compiled optimizer step): dense, at offset 0.
        self.resident_outputs = [
            (j, o.local)
            for j, o in enumerate(lowered.outputs)
            if o.kind == "ref" and j not in self.kept and dense_at_start(o.ref)
        ]
        self.random_steps = lowered.program.random_steps
        self._ahead: dict[int, int] | None = None  # argument -> AOT's bumps before the call
        self._held: _Held | None = None  # Note: [Checking what was found]
        weakref.finalize(self, target.drop, list(self.sids))

    def bind(self, args: list[Any]) -> tuple[list[int], list[tuple]]:
        """The binding of this call and the (storage id, argument index, layout, bytes) to
        upload: arguments the target does not hold (Note: [Compiled residency]). What the last
        lookup found is checked first, in one pass (Note: [Checking what was found]); the
        rest is looked up."""
        held = self._held
        if held is not None and held.snapshot.holds_args(args):
            binding = held.binding.copy()
            rest = held.rest
        else:
            binding, rest, held = self.sids.copy(), self._plain_inputs, None
        for i, k in self._kept_inputs:
            sid = self.target.saved_sid(args[i])
            if sid is None:
                raise ExecutionError(
                    "genie.compile: a tensor a compiled forward saved for backward is not "
                    f"held by {self.target.name} any more (argument {i} of the backward)"
                )
            binding[k] = sid
        if self._ahead is None:
            before = not bumps_after_call()
            self._ahead = {e[0]: int(before and e[0] in self.bumped) for e in self._plain_inputs}
        ahead = self._ahead
        found = self.target.residency.lookup_all(
            [args[e[0]] for e in rest], [ahead[e[0]] for e in rest], [e[2] for e in rest]
        )
        uploads = []
        own, sids = self.own, self.sids
        n_found = 0  # tensors looked up and found held
        for e, sid in zip(rest, found, strict=True):
            k = e[1]
            if sid is None or (sid in own and sid != sids[k]):
                uploads.append((sids[k], e[0], e[2], e[3]))
            else:
                binding[k] = sid
                n_found += 1
        # Where every tensor looked up is uploaded, only the checked ones are bound to what the
        # target holds (one storage each, as the full check found) and each upload goes to a
        # storage of this program: no storage is bound twice.
        if held is None or n_found:
            self._one_storage_each(binding, uploads)
        if held is None or n_found > held.rest_found:
            self._held = self._check_next(args, binding, {u[1] for u in uploads})
        return binding, uploads

    def _one_storage_each(self, binding: list[int], uploads: list[tuple]) -> None:
        """Each input local bound to a storage of its own (`binding` and `uploads` amended)."""
        sids = self.sids
        bound = [binding[k] for k in self._input_locals]
        if len(set(bound)) != len(bound):
            # One storage bound to two locals (the same tensor passed twice): the program was
            # recorded with two storages, so each gets one.
            seen: set[int] = set()
            for i, k, spec, nbytes in self.low.inputs:
                if binding[k] in seen and binding[k] != sids[k]:
                    if spec.kept:
                        raise ExecutionError(
                            "genie.compile: two arguments of a compiled backward name one "
                            f"storage {self.target.name} holds (argument {i})"
                        )
                    binding[k] = sids[k]
                    uploads.append((sids[k], i, spec, nbytes))
                seen.add(binding[k])

    def _check_next(self, args: list[Any], binding: list[int], uploaded: set[int]) -> _Held:
        """What the next call checks in one pass: the arguments bound to what the target
        holds, found there by tensor, except those the program writes (their version moves
        every call)."""
        written = {i for i, _ in self.low.writes} | self.bumped
        cand = [e for e in self._plain_inputs if e[0] not in uploaded and e[0] not in written]
        snapshot, covered = self.target.residency.snapshot(
            args, [e[0] for e in cand], [binding[e[1]] for e in cand]
        )
        base = self.sids.copy()
        for j in covered:
            base[cand[j][1]] = binding[cand[j][1]]
        taken = {cand[j][0] for j in covered}
        rest = [e for e in self._plain_inputs if e[0] not in taken]
        rest_found = sum(1 for e in rest if e[0] not in uploaded)
        return _Held(snapshot, base, rest, rest_found)

    def refs(self, binding: list[int]) -> list[dict]:
        """What to fetch: the outputs the program computes, then the arguments it writes."""
        return [{**ref, "storage": binding[k]} for k, ref in self._fetched]

    def results(self, args: list[Any], fetched: list[torch.Tensor], kept: dict | None = None):
        """The graph's outputs from the fetched values and the kept ones, in its container."""
        out = self.outputs(args, fetched, kept)
        if self.low.container is None:
            return out[0]
        return self.low.container(out)

    def outputs(self, args: list[Any], fetched: list[torch.Tensor], kept: dict | None = None):
        """The graph's outputs, a list; the arguments it writes get their new values."""
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
            for (i, _), v in zip(self._copied_writes, values, strict=True):
                args[i].copy_(v)
        return out

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

    def place(self, lowered: Lowered, keep_from: int | None = None, defer: bool = False) -> Placed:
        """`lowered` on this target; outputs saved for backward are views here anyway, and
        there is no host copy to defer."""
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


# Note: [Deferred host copies]
# A compiled training step writes the parameters and the optimizer state in place. Keeping the
# host's tensors current means bringing every written tensor back each step, and the gradients
# the backward returns as well: for SGD with momentum three times the parameters' bytes per
# step, more than compiling only the model moves (its optimizer runs on the host, so the
# parameters go up again each step). With ``defer_host_copies`` a server program's
# floating-point writes are not fetched: the server's copy stays the only current one, the
# Residency binds it in every later program, and the host tensor is filled with NaN through
# ``.data`` (no version bump), so that a read before ``synchronize()`` is loudly wrong rather
# than silently old. A backward keeps every gradient there too (``keep_from=0``: stand-ins as
# for saved activations, NaN-filled), which a compiled optimizer step binds by their storage
# (autograd keeps a detached alias as .grad). ``synchronize()`` fetches what is stale, by
# tensor or, for gradients, by host storage, and writes it through ``.data``, so that the
# Residency still holds. Integer writes (num_batches_tracked) are still brought back. What
# this cannot see: a read of the host copy between steps (an eager evaluation, a checkpoint)
# without ``synchronize()`` reads NaN; an in-place host write to a stale tensor (seen through
# its version) uploads the NaN-filled values it was applied to.


class RemoteTarget:
    """Runs programs on a genie server through a RemoteExecutor session: the program goes once,
    then each call is its key, its binding, the uploads it needs and the fetches of its
    outputs, in one exchange (RemoteExecutor.run_program)."""

    def __init__(self, executor):
        self.executor = executor
        self.residency = Residency()
        self.lock = threading.RLock()
        self._saved: dict[int, int] = {}  # stand-in's data pointer -> storage id on the server
        # id(host tensor) -> (its weakref, ref of the server's storage holding its value): host
        # copies not brought back yet (Note: [Deferred host copies]).
        self._stale: dict[int, tuple[weakref.ref, dict]] = {}
        self.name = executor.name
        self.device = torch.device("cpu")  # where arguments are uploaded from

    @property
    def counters(self) -> dict:
        return self.executor.counters

    def place(self, lowered: Lowered, keep_from: int | None = None, defer: bool = False) -> Placed:
        """`lowered` on this target; its outputs from `keep_from` on (a forward's tensors saved
        for backward) stay here (Note: [Saved tensors stay on the server]); with `defer`, so do
        the floating-point arguments it writes (Note: [Deferred host copies])."""
        return Placed(self, lowered, keep_from, defer)

    def saved_sid(self, t: torch.Tensor) -> int | None:
        """The storage on the server that stands behind `t`, a stand-in made by ``_keep``."""
        return self._saved.get(t.untyped_storage().data_ptr())

    def _keep(self, ref: dict, sid: int, storages: dict[int, torch.UntypedStorage]) -> torch.Tensor:
        """A stand-in for the server's storage `sid` under `ref`'s geometry: host memory never
        written (so never touched), whose end releases `sid` (Note: [Saved tensors stay on
        the server]). Outputs in one storage get views of one stand-in (`storages`: this
        call's, by sid), so that the backward binds that storage once."""
        st = storages.get(sid)
        if st is None:
            arr = np.empty(max(int(ref["storage_nbytes"]), 1), dtype=np.uint8)
            st = storages[sid] = torch.from_numpy(arr).untyped_storage()
            ptr = st.data_ptr()
            self._saved[ptr] = sid
            weakref.finalize(arr, self._unkeep, ptr, sid)
        t = torch.empty(0, dtype=ref["dtype"])
        return t.set_(st, ref["offset"], ref["shape"], ref["stride"])

    def _unkeep(self, ptr: int, sid: int) -> None:
        self._saved.pop(ptr, None)
        self.drop([sid])

    def synchronize(self) -> int:
        """Bring back every host copy a deferred program left stale (Note: [Deferred host
        copies]); the number of tensors brought back."""
        with self.lock:
            stale, self._stale = self._stale, {}
            n = 0
            for ref_t, ref in stale.values():
                t = ref_t()
                if t is None:
                    continue
                if isinstance(t, torch.UntypedStorage):  # a gradient's stand-in
                    view = torch.empty(0, dtype=ref["dtype"])
                    t = view.set_(t, ref["offset"], ref["shape"], ref["stride"])
                value = self.executor.fetch(ref)
                with torch.no_grad():
                    t.data.copy_(value.view(ref["shape"]))  # .data: no version bump
                n += 1
            return n

    def run(self, placed: Placed, args: list[Any]):
        low = placed.low
        constants: dict[int, torch.Tensor] = {}
        if not placed.constants_sent:
            constants = {placed.sids[k]: value for k, value in low.constants}
        binding, uploads = placed.bind(args)
        for sid, i, spec, nbytes in uploads:
            constants[sid] = _upload_value(args[i], spec, nbytes, self.device)[0]
            self.residency.remember(args[i], sid)
            self._stale.pop(id(args[i]), None)  # the host's value is the current one now
        for k in placed.kept_locals:  # a storage of their own per call, until backward
            binding[k] = next(SIDS)
        rng = []
        if placed.random_steps:
            states = fresh_states(placed.random_steps)
            rng = [[k, st.numpy().tobytes()] for k, st in states.items()]
        residency = self.residency
        for _, k in placed.resident_outputs:  # the run replaces what they held
            residency.forget(binding[k])
        fetched = self.executor.run_program(low.enc, binding, constants, placed.refs(binding), rng)
        placed.constants_sent = True
        kept, stand_ins = {}, {}
        for j in placed.kept:
            o = low.outputs[j]
            kept[j] = self._keep(o.ref, binding[o.local], stand_ins)
            if placed.poison_kept and kept[j].is_floating_point():
                kept[j].fill_(float("nan"))
                # The autograd engine keeps a detached alias as .grad: the storage is what
                # lives on, so that is what a synchronize() writes.
                st = kept[j].untyped_storage()
                self._stale[id(st)] = (weakref.ref(st), o.ref | {"storage": binding[o.local]})
        out = placed.outputs(args, fetched, kept)
        for j, k in placed.resident_outputs:
            if out[j] is not None and out[j].is_contiguous():
                residency.remember(out[j], binding[k])
        bumps = int(bumps_after_call())
        for i, _ in low.writes:  # the server's copy is current (and the host's, unless deferred)
            residency.remember(args[i], binding[placed.arg_local[i]], bumps * (i in placed.bumped))
        for i, ref in placed.deferred_writes:
            sid = binding[placed.arg_local[i]]
            known = self._stale.get(id(args[i]))
            if known is None or known[0]() is not args[i]:  # else still NaN from a last step
                with torch.no_grad():
                    args[i].data.fill_(float("nan"))  # .data: no version bump
            self._stale[id(args[i])] = (weakref.ref(args[i]), ref | {"storage": sid})
        if low.container is None:
            return out[0]
        return low.container(out)

    def drop(self, sids: list[int]) -> None:
        for sid in sids:
            self.residency.forget(sid)
        dropped = set(sids)
        for key in [k for k, (_, ref) in self._stale.items() if ref["storage"] in dropped]:
            del self._stale[key]
        try:
            self.executor.release(sids)
        except Exception as e:  # noqa: BLE001 - a closed session holds nothing any more
            logger.debug("genie.compile: releasing a dropped program's storages: %s", e)
