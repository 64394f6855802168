"""The remote executor: runs flushes on a ``genie serve`` server behind the Executor protocol.

    genie.connect("gpuhost:7070", token=...)      # or GENIE_SERVER=gpuhost:7070 GENIE_TOKEN=...
    model = Model().to("remote_accelerator:0")   # weights cross the wire once, at first use
    y = model(x.to("remote_accelerator:0"))
    y.cpu()                                      # only what the host asks for comes back

The recorder calls ``run`` / ``fetch`` / ``release`` / ``run_eager`` / ``bind`` (Note: [Python
executors] in csrc/bindings/python_executor.cpp), and the copy kernel ``upload_early`` when ``.to()``
records a CPU value (Note: [Early uploads] in early.py). Storages stay on the server between
flushes, so a weight or a KV cache is uploaded or built once and referenced by id afterwards.
Releases and binds need no answer: they wait in an outbox and ride on the next request.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from genie.envflags import env_flag
from genie.errors import GenieError, TransportError, UnsupportedOperationError
from genie.runtime import protocol as P
from genie.runtime import requests as R
from genie.runtime import transports
from genie.runtime.program import encode_program
from genie.runtime.remote.channel import Channel, FetchPlan, RequestFailed, raise_error
from genie.runtime.remote.early import EarlyUploads
from genie.runtime.remote.namer import Known, ProgramNamer, Sources, Template
from genie.runtime.remote.speculating import SpeculatingClient, SpeculationHook
from genie.runtime.remote.speculator import Speculator
from genie.runtime.remote.uploads import send_in_frames, upload_parts

logger = logging.getLogger(__name__)

__all__ = ["RemoteExecutor"]

_OUTBOX_FLUSH = 4096


# Note: [Run then fetch]
# A value the host asks for (``y.cpu()``, ``.item()``) is a flush followed at once by a fetch.
# The recorder says so (the flush's ``then_fetch``), and when the run goes by key the run asks
# for the value itself: the server's reply to the run carries its bytes (Note: [Outputs in the
# run's reply] in server/session.py), and the value waits in ``_prefetched`` for the fetch
# that follows. That saves a round trip per materialization. If the run failed, its error is
# raised exactly as without the fetch. Any other request in between makes the prefetched value
# stale, so it is dropped. A program run by its owner (torch.compile's ``run_program``) asks
# for all its outputs with the run the same way (``Channel.request``'s ``fetches``).


class RemoteExecutor(SpeculatingClient):
    """A client session with one genie server; install it with ``genie.connect``."""

    def __init__(
        self,
        address: str,
        token: str | bytes,
        *,
        timeout: float | None = 600.0,
        connect_timeout: float = 10.0,
        transport: str = "tcp",
        speculate: bool | None = None,
        early_uploads: bool | None = None,
    ):
        self.address = address
        self.closed = False  # close() was called (a lost session is broken, not closed)
        self._lock = threading.RLock()
        self._resident: dict[int, int] = {}  # storage id -> bytes, mirrored from the server
        self._eager: list[tuple[torch.Tensor, int]] = []
        self.namer = ProgramNamer()  # how each flush is named (Note: [Program refs])
        self._last_enc = None
        self._made_last: list[int] = []  # storages the last flush created, in order
        self._prefetched: tuple[list, torch.Tensor] | None = None  # Note: [Run then fetch]
        # Settings first: a bad one is refused before a connection is opened.
        if speculate is None:
            speculate = env_flag("GENIE_SPECULATE", True)
        if early_uploads is None:
            early_uploads = env_flag("GENIE_EARLY_UPLOADS", True)
        self.speculator = Speculator(speculate)  # Note: [Client speculation]
        # What install_executor gives the recorder (Note: [Speculation hook]).
        self.speculation_hook = SpeculationHook(self) if speculate else None
        self.counters = {
            "requests": 0, "runs": 0, "programs_sent": 0, "uploads": 0, "upload_bytes": 0,
            "fetches": 0, "fetch_bytes": 0, "eager": 0, "programs_patched": 0,
            "runs_by_digest": 0, "runs_by_template": 0, "spec_sent": 0, "spec_at_upload": 0, "spec_started": 0, "spec_hits": 0,
            "fetched_with_run": 0, "uploads_early": 0, "flushes": 0,
            "run_seconds": 0.0, "fetch_seconds": 0.0, "speculate_seconds": 0.0,
        }  # fmt: skip
        tok = token.encode() if isinstance(token, str) else bytes(token)
        try:
            self._t = transports.connect(address, kind=transport, timeout=connect_timeout)
        except TransportError as e:
            raise TransportError(
                f"{e}. Is `genie serve` running there? Start it on the GPU host with "
                "`genie serve --host 0.0.0.0 --port PORT --token-file FILE` and check the address."
            ) from None
        self.channel = Channel(self._t, address, self.counters)
        # Note: [Early uploads] (early.py); max_message comes with the server's hello
        self.early = EarlyUploads(
            self.channel, self._lock, 0, self.counters, self._resident.__setitem__, early_uploads
        )
        try:
            P.client_handshake(self._t, tok)
            self._t.set_timeout(timeout)
            self._t.spin_us = transports.default_spin_us()
            info = self._request(R.Hello())[0]
        except TransportError as e:
            self._t.close()
            raise TransportError(
                f"genie: could not open a session with the genie server at {address}: {e}. "
                "Check that `genie serve` runs there and that the port is reachable."
            ) from None
        except GenieError:
            self._t.close()
            raise
        self.info = info
        self.device = str(info["device"])
        self.device_type = str(info["device_type"])
        self.max_message = int(info["max_message"])
        self.name = f"remote:{address}/{self.device}"
        self.early.max_message = self.max_message
        logger.info(
            "genie: connected to %s (%s, session %s)", address, self.device, info.get("session")
        )

    # -- plumbing -------------------------------------------------------------------------
    @property
    def _broken(self) -> str | None:
        return self.channel.broken

    def _request(
        self,
        req: R.Request,
        buffers: list[memoryview] | tuple = (),
        receive: Callable[[dict], list[memoryview]] | None = None,
        fetches: list[FetchPlan] | tuple = (),
        then_spec: Callable[[], None] | None = None,
    ) -> tuple[dict, list[torch.Tensor | None]]:
        """One request through the channel; any request resolves the speculation the server
        holds and makes a prefetched value stale (Note: [Run then fetch])."""
        self.early.send_queued()  # uploads begun earlier go first (Note: [Early uploads])
        self._prefetched = None
        self.speculator.ahead = False
        return self.channel.request(req, buffers, receive, fetches, then_spec)

    def _ask(self, req: R.Request) -> dict:
        """A request whose error reply is raised as genie's."""
        try:
            return self._request(req)[0]
        except RequestFailed as e:
            raise_error(e)

    # -- uploads (Note: [Large uploads]) ----------------------------------------------------
    def _send_uploads(self, parts) -> None:
        send_in_frames(
            parts, self.max_message, self._upload_batch, self._resident.__contains__, self.release
        )

    def _upload_batch(self, batch) -> None:
        try:
            self._request(R.Upload(R.pieces_of(batch)), [v for _, v in batch])
        except RequestFailed as e:
            raise_error(e)
        for entry, _ in batch:
            if entry[2] + entry[3] == entry[1]:  # the storage's last piece: it is whole
                self._resident[entry[0]] = entry[1]
        self.counters["uploads"] += len(batch)
        self.counters["upload_bytes"] += sum(e[3] for e, _ in batch)

    # -- the Executor protocol ------------------------------------------------------------
    def run(
        self, nodes: list[dict], constants: dict[int, torch.Tensor], targets: list[int]
    ) -> None:
        with self._lock:
            self.channel.check()
            constants, early = self.early.take(constants)
            if not nodes:
                self._run_encoded(None, [], [], constants, {})
                return
            enc = encode_program(nodes)
            self._last_enc = enc
            self.early.check(enc.binding)
            try:
                self._run_encoded(enc, enc.binding, enc.rng, constants, enc.fresh)
            except GenieError:
                self.early.raise_failed(early)  # the missing input's cause, if that was it
                raise
            self.namer.sent_in_full(enc)

    def _run_encoded(
        self,
        enc,
        binding: list[int],
        rng: list,
        constants: dict,
        fresh: dict,
        then_fetch=None,
        instance: P.ProgramRef | None = None,
        then_spec: Callable[[], None] | None = None,
    ) -> bool:
        """Send a run of `enc` with `binding` (uploads first when they do not fit in it);
        `then_fetch`: Note: [Run then fetch]. `instance` names the program as an instance of a
        template instead (Note: [Program templates]); False then when the server has no such
        base, so that the caller sends the program in full."""
        parts = upload_parts(constants, self.max_message) if constants else []
        total = sum(e[3] for e, _ in parts)
        if parts and (enc is None or total > self.max_message or len(parts) > len(constants)):
            self._send_uploads(parts)  # large ones on their own (Note: [Large uploads])
            parts = []
        if enc is None:
            return True
        ref = instance if instance is not None else self.namer.ref(enc)
        req = R.Run(ref, binding, rng, R.pieces_of(parts))
        fetches = [self.channel.fetch_plan(then_fetch)] if then_fetch is not None else []
        try:
            _, values = self._exchange(
                req, [v for _, v in parts], None if instance else enc, fetches, then_spec
            )
        except RequestFailed:  # an instance whose base the server no longer has
            return False
        if fetches and values[0] is not None:
            self._prefetched = (fetches[0].request.wire_ref, values[0])
        for entry, _ in parts:
            self._resident[entry[0]] = entry[1]
        self.counters["upload_bytes"] += total
        self._resident.update(fresh)
        self.counters["runs"] += 1
        return True

    def run_digest(self, flush) -> None:
        """A flush by its digest (a ``genie._C._FlushDigest``, Note: [Flush digests in Python]
        in csrc/bindings/python_executor.cpp): a known program goes by key and binding; an unknown one
        is converted (``flush.nodes()``) and sent in full once; ``flush.then_fetch`` is the
        value the host fetches next, if any (Note: [Run then fetch])."""
        started = time.perf_counter()
        with self._lock:
            self.channel.check()
            self.counters["flushes"] += 1
            try:
                binding = flush.binding
                constants, early = self.early.take(flush.constants)  # Note: [Early uploads]
                self.early.check(binding)
                try:
                    self._run_digest(
                        flush.fingerprint,
                        binding,
                        constants,
                        flush.targets,
                        flush.rng,
                        flush.nodes,
                        flush.then_fetch,
                        (flush.structure, flush.params, flush.paths),
                        Sources(list(self.early.arrivals), self._made_last),
                    )
                except GenieError:
                    self.early.raise_failed(early)  # the missing input's cause, if that was it
                    raise
            finally:
                self.counters["run_seconds"] += time.perf_counter() - started

    def _run_digest(
        self, fingerprint, binding, constants, targets, rng, nodes, then_fetch, template, sources
    ) -> None:
        namer = self.namer
        known = namer.by_digest(fingerprint)
        structure, params, tpl = namer.template(template)
        follows: Known | Template | None = known
        wire_rng = [[k, state.numpy().tobytes()] for k, state in rng]
        settled = False

        def guess_behind() -> None:
            nonlocal settled
            settled = True
            self._guess_behind(tpl, binding, params, constants, fresh, sources)

        if known is not None:
            enc = known.enc
            fresh = {binding[s]: n for s, n in known.created if n}
            self._run_encoded(enc, binding, wire_rng, constants, fresh, then_fetch)
            self.counters["runs_by_digest"] += 1
        elif tpl is not None and self._run_encoded(
            tpl.known.enc,
            binding,
            wire_rng,
            constants,
            fresh := tpl.created(binding, params),
            then_fetch,
            instance=namer.instance(tpl, params),
            then_spec=guess_behind,
        ):
            known, follows = tpl.known, tpl
            self.counters["runs_by_template"] += 1
        else:
            if tpl is not None:  # the server forgot the template's base: start it again
                namer.forget_template(structure)
                tpl, settled = None, False
            self.run(nodes(), constants, targets)
            enc = self._last_enc
            if enc is None or enc.binding != binding:  # the digest and the encoding disagree
                logger.debug("genie: a flush's digest does not match its encoding")
                return
            paths = template[2] if template is not None else None
            known = follows = namer.learn(fingerprint, enc, binding, structure, params, paths)
        self.speculator.ran(follows)
        if not settled:
            namer.settle(tpl, known, binding, params, constants, sources)
        self._made_last = [binding[s] for s, n in known.created if n]

    def _exchange(
        self, req: R.Run, buffers: list, enc, fetches=(), then_spec=None
    ) -> tuple[dict, list[torch.Tensor | None]]:
        """A request that names a program: sent once more with the body when the server does
        not know the key (it forgot the program, or never had it); the server's error raised
        as genie's, except an unknown program when there is no body to send (`enc` None)."""
        try:
            try:
                got = self._request(req, buffers, None, fetches, then_spec)
            except RequestFailed as e:
                if e.kind != "unknown_program" or enc is None:
                    raise
                req = dataclasses.replace(req, program=P.ProgramRef(req.program.key, enc.body))
                got = self._request(req, buffers, None, fetches)
        except RequestFailed as e:
            if e.kind == "unknown_program" and enc is None:
                raise  # no body to send: the caller decides (Note: [Program templates])
            if e.kind == "execution":
                # The uploads arrived before the program failed: they are resident.
                for piece in req.pieces:
                    self._resident[piece.sid] = piece.nbytes
            raise_error(e)
        if enc is not None:
            if req.program.body is not None:
                self.counters["programs_sent"] += 1
            elif req.program.patch is not None:
                self.counters["programs_patched"] += 1
            self.namer.checked(enc.key)
        return got

    def fetch(self, ref: dict) -> torch.Tensor:
        started = time.perf_counter()
        try:
            with self._lock:
                plan = self.channel.fetch_plan(ref)
                pre, self._prefetched = self._prefetched, None
                if pre is not None and pre[0] == plan.request.wire_ref:
                    self.counters["fetched_with_run"] += 1
                    return pre[1]  # fetched right behind its run (Note: [Run then fetch])
                try:
                    self._request(plan.request, (), plan.receive)
                except RequestFailed as e:
                    raise_error(e)
                return plan.result()
        finally:
            self.counters["fetch_seconds"] += time.perf_counter() - started

    def release(self, ids: list[int]) -> None:
        with self._lock:
            self.early.release(ids)
            for i in ids:
                self._resident.pop(i, None)
            self.channel.released.extend(ids)
            if len(self.channel.released) > _OUTBOX_FLUSH and self._broken is None:
                try:
                    self._request(R.Release())
                except (RequestFailed, TransportError) as e:
                    logger.warning("genie: sending releases failed: %s", e)

    def has(self, storage: int) -> bool:
        return storage in self._resident

    def run_eager(self, node: dict) -> list[Any]:
        with self._lock:
            enc = encode_program([node])
            body = enc.body if enc.key not in self.namer.sent else None  # never a patch
            req = R.Eager(P.ProgramRef(enc.key, body), enc.binding, enc.rng)
            reply, _ = self._exchange(req, [], enc)
            self._eager = []
            self.counters["eager"] += 1
            return [self._result(r) for r in reply["res"]]

    def _result(self, r: dict) -> Any:
        if "p" in r:
            t = torch.empty_strided(
                r["shape"], r["stride"], dtype=P.get_dtype(r["dtype"]), device="meta"
            )
            self._eager.append((t, int(r["p"])))
            return t
        if "l" in r:
            return [self._result(x) for x in r["l"]]
        return r.get("v")

    def bind(self, ref: dict, value: torch.Tensor) -> None:
        with self._lock:
            pid = next((p for t, p in self._eager if t is value), None)
            if pid is None:
                pid = next((p for t, p in self._eager if t._cdata == value._cdata), None)
            if pid is None:
                raise UnsupportedOperationError(
                    "genie: the remote executor can only bind results of its own run_eager"
                )
            self.channel.outbox.append(["bind", pid, P.encode_ref(ref)])
            self._resident[int(ref["storage"])] = int(ref["storage_nbytes"])

    def resident_count(self) -> int:
        return len(self._resident)

    def resident_bytes(self) -> int:
        return sum(self._resident.values())

    # -- extras ---------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """This client's counters and the transport's byte counts (no request is made)."""
        return {
            **self.counters,
            **self._t.stats.as_dict(),
            "resident_count": len(self._resident),
            "resident_bytes": self.resident_bytes(),
        }

    def server_stats(self) -> dict[str, Any]:
        """The server's view: this session's and the whole server's counters."""
        with self._lock:
            reply = self._ask(R.Stats())
            return {"session": reply["session"], "server": reply["server"]}

    def close(self) -> None:
        self.early.close()
        with self._lock:
            if self._broken is None and not self._t.closed:
                # Ours first: the server ends its data plane when it answers "bye".
                self._t.close_data_plane()
                try:
                    self._request(R.Bye())
                except (GenieError, OSError):
                    pass
            self.channel.broken = (
                self._broken or f"genie: the session with {self.address} was closed"
            )
            self._t.close()
            self.closed = True  # by its owner (connect.active() forgets it)

    def __repr__(self) -> str:
        return f"RemoteExecutor({self.address!r}, device={self.device!r})"

    # -- moves between servers (Note: [Server-to-server moves] in server/peers.py) ---------
    def peer_request(self, req: R.PeerOpen | R.PeerSend | R.PeerRecv | R.PeerClose) -> dict:
        """One request of a move between servers; the server's error is raised as genie's."""
        with self._lock:
            reply = self._ask(req)
            if isinstance(req, R.PeerRecv):
                self._resident[req.id] = req.nbytes
            return reply

    # -- programs run by their owner (torch.compile) ----------------------------------------
    def run_program(
        self,
        enc,
        binding: list[int],
        constants: dict[int, torch.Tensor],
        refs: list[dict],
        rng: list | None = None,
    ) -> list[torch.Tensor | None]:
        """Run the encoded program `enc` with `binding` (storage ids chosen by the caller, not
        the recorder), upload `constants` (storage id -> tensor) with the run, and fetch each
        of `refs` (core ref dicts) in the same exchange: the run's reply carries them (Note:
        [Run then fetch]). The body goes once; afterwards the 16-byte key. `rng`: [step,
        generator state bytes] for each random step, as ``encode_program`` gives them. Returns the fetched values, in order; None for a ref
        the run left without a storage (a kernel result of another shape than declared is not
        bound: Note: [Binding a result on a server]). Used by genie.compile (Note: [Compiled
        programs] in compile/__init__.py)."""
        started = time.perf_counter()
        with self._lock:
            self.channel.check()
            try:
                return self._run_program(enc, binding, constants, refs, rng or [])
            finally:
                self.counters["run_seconds"] += time.perf_counter() - started

    def _run_program(self, enc, binding, constants, refs, rng) -> list[torch.Tensor | None]:
        parts = upload_parts(constants, self.max_message) if constants else []
        if sum(e[3] for e, _ in parts) > self.max_message:
            self._send_uploads(parts)
            parts = []
        req = R.Run(self.namer.ref(enc), binding, rng, R.pieces_of(parts))
        fetches = [self.channel.fetch_plan(r) for r in refs]
        _, values = self._exchange(req, [v for _, v in parts], enc, fetches)
        self.counters["runs"] += 1
        self.counters["upload_bytes"] += sum(e[3] for e, _ in parts)
        for entry, _ in parts:
            self._resident[entry[0]] = entry[1]
        return values
