"""The one speculative run a session may hold: start, then commit or undo when the next
request arrives (Note: [Speculative runs]), with its own counters."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from genie.errors import GenieError, RemoteError
from genie.runtime import protocol as P
from genie.runtime.program import Program, check_binding, program_key
from genie.runtime.replay import byte_view
from genie.runtime.requests import Request, Run, Spec, Upload
from genie.runtime.transports.base import Frame

if TYPE_CHECKING:
    from genie.runtime.server.session import Session

logger = logging.getLogger(__name__)

__all__ = ["SpeculationSlot"]


@dataclass
class _Speculation:
    """A speculative run waiting for the request that adopts or undoes it
    (Note: [Speculative runs])."""

    program: Program
    bind: list[Any]  # as predicted: an id; None: a storage the program creates; ["up", 0]: an
    # empty storage the run uploads
    temps: dict[int, int]  # local -> the temporary id its storage is held under
    saved: list[tuple[int, torch.UntypedStorage | None, torch.Tensor | None]]  # sid, object, bytes
    handed: tuple  # GraphRunner.handed(program.key) before

    @property
    def fixed(self) -> tuple[list[int], list[int]]:
        """(locals the speculation gave an id, the others)."""
        ints = [i for i, b in enumerate(self.bind) if type(b) is int]
        taken = set(ints)
        return ints, [i for i in range(len(self.bind)) if i not in taken]


class SpeculationSlot:
    """A session's speculation. It uses the session through a narrow interface: its storages
    (``env``), its GraphRunner (``runner``), its resolver, and its upload and memory checks."""

    def __init__(self, session: Session):
        self._session = session
        self.pending: _Speculation | None = None  # started, waiting for the next request
        # (key, bind, [(input id, storage)], plan): the speculation checked last
        self._valid: tuple | None = None
        self.started = 0
        self.declined = 0
        self.hits = 0
        self.misses = 0

    def take(self) -> _Speculation | None:
        """The pending speculation, which the request being handled resolves."""
        spec, self.pending = self.pending, None
        return spec

    def stats(self) -> dict[str, int]:
        return {
            "spec_started": self.started,
            "spec_declined": self.declined,
            "spec_hits": self.hits,
            "spec_misses": self.misses,
        }

    # Note: [Speculative runs]
    # Why: while the user's Python is still recording a forward pass, the client usually knows
    # which cached program the recording will become (the next decode step is the last one's
    # program again) and most of its binding. A "spec" request names that program and the
    # predicted binding, None for each storage the program creates (and ["up", 0] for an empty
    # tensor the run will upload: HF's DynamicCache starts from one), so the device computes
    # while the client finishes recording; the "run" that follows adopts the results.
    #
    # Start: the created storages get private temporary ids (negative: never a client's id).
    # Every storage the program may write that the client already holds (a local in
    # program.produced bound to an id) is snapshotted first: its storage object and a copy of
    # its bytes, or "absent". The run then goes through the GraphRunner like any run. Whatever
    # stops it from starting (unknown program, random steps (their generator states come with
    # the run), a binding the run would refuse, the memory limit counting the snapshots, a
    # failure while running, undone at once) declines it: {"spec": False, "why"}, the session
    # unchanged apart from the request's own "pre".
    #
    # The session holds at most one speculation; the very next request resolves it, except an
    # "upload" of new storages only, with no "pre" (a client's early upload, Note: [Early
    # uploads] in remote/early.py): it cannot touch what the speculative run read or wrote,
    # so the speculation stays pending behind it.
    # - Commit: a "run" of the same program that uploads nothing but the empty storages the
    #   speculation foresaw, whose binding passes
    #   check_binding and equals the speculation's wherever the speculation gave an id, and
    #   whose "pre" does nothing but release storages outside that binding. It read the same
    #   storages with the same bytes (nothing ran in between) and so computed what the run
    #   would; "pre" touches none of those storages, so applying it after the run instead of
    #   before changes nothing. The temporaries are renamed to the run's ids, in the session
    #   and in the GraphRunner's record of the outputs it handed out; the reply is
    #   {"spec": "hit"} and nothing runs again.
    # - Abort, for anything else (a failed or malformed request too): each snapshotted object
    #   goes back under its id with its bytes restored, ids that were absent are removed, the
    #   temporaries are dropped and the GraphRunner's handed-out record is restored (a replay
    #   may have overwritten a graph output the session holds again after the undo, and the
    #   next replay must copy it away first). Then the request is handled as if no speculation
    #   had happened: "pre" first, then the request.
    # The price of a speculation is the snapshot: a copy of every written storage the client
    # holds (a KV cache updated in place is copied whole), and the memory for it.
    def start(self, req: Spec, frame: Frame) -> tuple[dict, list]:
        key = req.program.key
        bind = req.bind  # ids, None and EMPTY_UPLOAD only (requests.Spec.parse)
        program = self._session.resolver.lookup(req.program)
        # The same speculation as the last one (a serving loop's next forward) whose inputs
        # are still the very storages it checked, or new ones only where a fresh input came:
        # nothing to check again.
        plan = self._revalidate(program, key, bind)
        if plan is not None:
            return self._start(program, bind, plan)
        storages = self._session.env.storages
        ids = [b for b in bind if type(b) is int]
        if program is None:
            return self._decline("unknown program")
        P.need(
            len(bind) == program.nlocals,
            f"binding has {len(bind)} ids for {program.nlocals} storages",
        )
        if program.random_steps:
            return self._decline("the program has random steps")
        unbound = [local for local in program.inputs if bind[local] is None]
        if unbound:
            return self._decline(f"local {unbound[0]} is an input of the program but has no id")
        # check_binding wants real ids: stand-ins that no entry uses for the created storages
        # (none of them is an input, so whether they are resident does not matter) and for
        # the empty uploads (incoming, 0 bytes).
        taken = set(ids)
        probe, stand_in, incoming = [], P._MAX_SID, {}
        for b in bind:
            if type(b) is not int:
                while stand_in in taken:
                    stand_in -= 1
                if b is not None:
                    incoming[stand_in] = 0
                b, stand_in = stand_in, stand_in - 1
            probe.append(b)
        try:
            check_binding(program, probe, None, self._session.env, incoming)
        except GenieError as e:
            return self._decline(str(e).removeprefix("genie: "))
        temps: dict[int, int] = {}
        binding = []
        for local, b in enumerate(bind):
            if type(b) is not int:
                b = temps[local] = -1 - len(temps)
            binding.append(b)
        written = [bind[local] for local in program.produced if type(bind[local]) is int]
        plan = (binding, temps, written)
        self._valid = (
            key,
            list(bind),
            [(i, bind[i], storages[bind[i]]) for i in program.inputs if type(bind[i]) is int],
            plan,
        )
        return self._start(program, bind, plan)

    def _revalidate(self, program: Program | None, key: bytes, bind: list) -> tuple | None:
        """The plan of the speculation checked last when `bind` passes what check_binding
        asked of it: the same binding over the very storages it checked, or one whose only
        changes are inputs (never written) bound to other resident storages large enough, each
        id once (a serving loop's fresh input, Note: [Early uploads] in remote/early.py).
        None: check in full."""
        valid = self._valid
        if program is None or valid is None or valid[0] != key or len(valid[1]) != len(bind):
            return None
        storages = self._session.env.storages
        last, inputs, (binding, temps, written) = valid[1], valid[2], valid[3]
        if last == bind:
            return valid[3] if all(storages.get(sid) is st for _, sid, st in inputs) else None
        changed = {i for i, (a, b) in enumerate(zip(last, bind, strict=True)) if a != b}
        if len(changed) > 8:
            return None
        now = []
        for local, sid, st in inputs:
            if local in changed:
                sid = bind[local]
                st = storages.get(sid) if type(sid) is int else None
                if st is None or st.nbytes() < program.extent.get(local, 0):
                    return None
            elif storages.get(sid) is not st:
                return None
            now.append((local, sid, st))
        if len(changed) != sum(1 for local, _, _ in inputs if local in changed):
            return None  # a created storage's id or an empty upload changed
        ids = [b for b in bind if type(b) is int]
        if not changed.isdisjoint(program.produced) or len(set(ids)) != len(ids):
            return None
        binding = list(binding)
        for local in changed:
            binding[local] = bind[local]
        plan = (binding, temps, written)
        self._valid = (key, list(bind), now, plan)
        return plan

    def _start(self, program: Program, bind: list, plan: tuple) -> tuple[dict, list]:
        """Run a checked speculation (Note: [Speculative runs]); `plan` is the binding with
        temporaries, the temporaries by local, and the ids the run may write."""
        binding, temps, written = plan
        storages = self._session.env.storages
        for local, temp in temps.items():
            if bind[local] is not None:  # an empty upload: an empty storage stands in
                storages[temp] = torch.empty(
                    0, dtype=torch.uint8, device=self._session.server.device
                ).untyped_storage()
        snapshot = sum(storages[sid].nbytes() for sid in written if sid in storages)
        try:
            self._session.check_memory(program.fresh_bytes + snapshot)
        except RemoteError:
            for temp in temps.values():
                storages.pop(temp, None)
            return self._decline("over the session's memory limit")
        spec = _Speculation(program, bind, temps, [], self._session.runner.handed(program.key))
        try:
            for sid in written:
                st = storages.get(sid)
                spec.saved.append((sid, st, None if st is None else byte_view(st).clone()))
            started = time.perf_counter()
            self._session.runner.run(program, binding, {}, self._session.env)
            self._session.time("spec_launch", time.perf_counter() - started)
            if self._session.over_limit():  # Note: [Real memory accounting]
                self.abort(spec, miss=False)
                return self._decline("over the session's memory limit")
        except Exception as e:  # noqa: BLE001 - any failure declines; the session is restored
            self.abort(spec, miss=False)
            msg = str(e).removeprefix("genie: ")
            self._session.after_failure(msg, isinstance(e, (MemoryError, torch.OutOfMemoryError)))
            return self._decline(f"the speculative run failed: {msg}")
        self.pending = spec
        self.started += 1
        return {"ok": True, "spec": True}, []

    def _decline(self, why: str) -> tuple[dict, list]:
        self.declined += 1
        logger.debug("genie: session %d: speculation declined: %s", self._session.number, why)
        return {"ok": True, "spec": False, "why": why[:200]}, []

    def leaves_pending(self, req: Request, pre: list | None, frame: Frame) -> bool:
        """True when `req` is an upload of new storages only, with no "pre": it leaves a
        pending speculation pending (Note: [Speculative runs])."""
        if not isinstance(req, Upload) or pre is not None:
            return False
        try:
            uploads = self._session.check_uploads(req.pieces, frame)
        except GenieError:
            return False  # handled as a normal request, which reports what is wrong
        storages = self._session.env.storages
        return all(new and sid not in storages for sid, _, _, _, new in uploads)

    def resolve(self, spec: _Speculation, req: Request, pre: list | None, frame: Frame) -> bool:
        """Commit `spec` when `req` (with its deferred operations `pre`, None when it has
        none, both as requests.py parsed them) is the run it predicted, else undo it; True
        on commit. An early upload leaves it pending (False, nothing undone)."""
        if self.leaves_pending(req, pre, frame):
            self.pending = spec
            return False
        try:
            binding = self._confirmed(spec, req, pre, frame)
        except Exception:  # noqa: BLE001 - a request that cannot even be compared is a miss
            logger.exception(
                "genie: session %d: comparing a run with a speculation", self._session.number
            )
            binding = None
        if binding is None:
            self.abort(spec)
            return False
        storages = self._session.env.storages
        renamed: dict[int, int] = {}
        for local, temp in spec.temps.items():
            st = storages.pop(temp, None)
            if st is not None:  # a temporary the run did not produce is just dropped
                storages[binding[local]] = st
            renamed[temp] = binding[local]
        self._session.runner.rename(renamed)
        self.hits += 1
        return True

    def _confirmed(
        self, spec: _Speculation, req: Request, pre: list | None, frame: Frame
    ) -> list[int] | None:
        """The run's binding when `req` is the run `spec` predicted (the commit rule of
        Note: [Speculative runs]), else None."""
        program = spec.program
        if type(req) is not Run or frame.payload_len:
            return None
        # The only uploads a speculation can foresee are empty ones, at its ["up", 0] entries.
        empty = [local for local, b in enumerate(spec.bind) if b == P.EMPTY_UPLOAD]
        try:
            uploads = self._session.check_uploads(req.pieces, frame)
        except GenieError:
            return None
        if any(nbytes or n or not new for _, nbytes, _, n, new in uploads):
            return None
        if req.program.key != program.key:
            return None
        body = req.program.body
        if body is not None and program_key(body) != program.key:
            return None
        binding = req.bind
        if len(binding) != len(spec.bind) or req.rng:
            return None
        # What check_binding would ask, against the speculation it already passed: the ids
        # it was given are the run's; the rest are new, distinct, valid ids (nothing ran in
        # between, and "pre" may not touch the binding).
        fixed, others = spec.fixed
        if [binding[i] for i in fixed] != [spec.bind[i] for i in fixed]:
            return None
        storages = self._session.env.storages
        fresh = [binding[i] for i in others]
        if not all(type(x) is int and 0 <= x <= P._MAX_SID and x not in storages for x in fresh):
            return None
        if len(set(binding)) != len(binding):
            return None
        incoming = {sid for sid, *_ in uploads}
        if incoming != {binding[local] for local in empty} or len(incoming) != len(uploads):
            return None
        # "pre" may release storages the binding does not use, and nothing else.
        released: set[int] = set()
        for op in pre or ():
            if not isinstance(op, list):  # a bind of an eager result
                return None
            released.update(op)
        if not released.isdisjoint(binding):
            return None
        return binding

    def abort(self, spec: _Speculation, *, miss: bool = True) -> None:
        """Undo `spec`: the session as it was before the speculative run."""
        storages = self._session.env.storages
        for sid, st, data in reversed(spec.saved):
            if st is None:
                storages.pop(sid, None)
            else:
                if st.nbytes() != data.numel():  # an op resized it in place
                    st.resize_(data.numel())
                byte_view(st).copy_(data)
                storages[sid] = st
        for temp in spec.temps.values():
            storages.pop(temp, None)
        self._session.runner.restore_handed(spec.program.key, spec.handed)
        if miss:
            self.misses += 1
