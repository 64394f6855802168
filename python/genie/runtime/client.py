"""The remote executor: runs flushes on a ``genie serve`` server behind the Executor protocol.

    genie.connect("gpuhost:7070", token=...)      # or GENIE_SERVER=gpuhost:7070 GENIE_TOKEN=...
    model = Model().to("remote_accelerator:0")   # weights cross the wire once, at first use
    y = model(x.to("remote_accelerator:0"))
    y.cpu()                                      # only what the host asks for comes back

The recorder calls ``run`` / ``fetch`` / ``release`` / ``run_eager`` / ``bind`` (Note: [Python
executors] in csrc/bindings/module.cpp). Storages stay on the server between flushes, so a
weight or a KV cache is uploaded or built once and referenced by id afterwards. Releases and
binds need no answer: they wait in an outbox and ride on the next request.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from genie import _C
from genie.errors import (
    ExecutionError,
    GenieError,
    ProtocolError,
    RemoteError,
    TransportError,
    UnsupportedOperationError,
)
from genie.runtime import protocol as P
from genie.runtime import transports
from genie.runtime.program import diff_program, encode_program, patch_key

logger = logging.getLogger(__name__)

__all__ = ["RemoteExecutor", "connect", "connect_from_env", "disconnect", "servers_from_topology"]

_REPLY_MAX_HEADER = 64 << 20
_OUTBOX_FLUSH = 4096
_MAX_BASES = 64  # programs kept to patch against (Note: [Program patches])
_MAX_DIGESTS = 256  # programs known by their digest (Note: [Program digests])
_MAX_TEMPLATES = 64  # structures whose next programs go as numbers (Note: [Program templates])
_SPECULATION_WINDOW = 2  # recorded nodes compared before a speculative run is asked for


# Note: [Client speculation]
# A program recorded again (the next forward of a serving loop, the next step of a decode loop
# with a static KV cache) is known by its digest, computed in C++ at flush
# (Note: [Program digests] in csrc/capture/digest.h): the client sends its key and binding and
# never converts its nodes. Better still, the server can start it before the recording ends.
# The recorder fingerprints the first few nodes recorded after each flush (the "window"); the
# client remembers which program the recording that began that way became. When a window
# fingerprints like one seen before, the client predicts that program's binding and sends a
# "spec" request without waiting for its answer; the server runs it while the user's Python records
# the rest (Note: [Speculative runs] in server/speculation.py). The run request at flush then finds its
# work done, or, if the program or its binding turned out different, the server undoes the
# speculative run and runs the real one: correctness never rests on the guess.
# The binding is predicted from the last two runs of the program: an input bound to the same
# storage both times (a weight, a static KV cache) keeps it; an input bound to what a created
# storage of the run before held (this step's token, from last step's argmax) takes what that
# storage's counterpart in the last run holds. Anything else (a fresh upload) means no guess.
# Note: [Run then fetch]
# A value the host asks for (``y.cpu()``, ``.item()``) is a flush followed at once by a fetch.
# The recorder says so (the flush's ``then_fetch``), and when the run goes by key the client
# sends the fetch right behind it without waiting for the run's answer: the server answers
# both in order, and the value waits in ``_prefetched`` for the fetch that follows. That saves
# a round trip per materialization. The run's answer is read first: if it failed, the fetch's
# answer is read and dropped and the run's error is raised exactly as without the fetch. Any
# other request in between makes the prefetched value stale, so it is dropped.
@dataclass
class _Known:
    key: bytes
    enc: Any  # EncodedProgram: the body, for a server that forgot it, and a patch base
    created: list[tuple[int, int]]  # (local, bytes) of storages the program creates
    external: list[int]  # locals the program does not create
    random: bool
    last: list[int] | None = None  # bindings of the last two runs
    before: list[int] | None = None
    empty_last: frozenset[int] = frozenset()  # locals bound to empty uploads in those runs
    empty_before: frozenset[int] = frozenset()

    def predict(self, resident: dict[int, int]) -> list | None:
        b1, b0 = self.last, self.before
        if b1 is None or b0 is None or self.random:
            return None
        made0 = None
        out: list[Any] = [None] * len(b1)
        for s in self.external:
            x = b1[s]
            if x != b0[s]:
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
# (Note: [Program instances] in program.py). Because the integers of a decode step move by the same amount
# every step, the next step's are predicted (last + (last - before)), and that guess goes right
# behind the current step's run and fetch (_spec_behind), so the server starts the next step as
# soon as it has answered, while this process records it (Note: [Client speculation]). The paths come from C++; the
# client checks once per structure that each one names a leaf of its own encoding holding that
# integer, and never uses a structure that fails the check.
@dataclass
class _Template:
    known: _Known  # the base program; bindings of this structure's last runs
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
        if self.last is None or self.before is None:
            return None
        return 2 * self.last - self.before


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


def _make_template(known: _Known, params: np.ndarray, paths: list[list[int]]) -> _Template | None:
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
    return _Template(known=known, params=params, paths=paths, fresh=fresh)


class _RequestFailed(GenieError):
    """A server's error reply, with its kind; raised as the matching genie error."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


_KINDS = {"execution": ExecutionError, "protocol": ProtocolError}


def _storage_span(t: torch.Tensor) -> tuple[int, int]:
    """The bytes [lo, hi) of t's storage that t's view covers."""
    if t.numel() == 0:
        return 0, 0
    isz = t.element_size()
    last = t.storage_offset() + sum((s - 1) * st for s, st in zip(t.shape, t.stride(), strict=True))
    return t.storage_offset() * isz, (last + 1) * isz


def _bytes_of(st: torch.UntypedStorage, lo: int, hi: int) -> memoryview:
    return memoryview(torch.empty(0, dtype=torch.uint8).set_(st, lo, (hi - lo,), (1,)).numpy())


class RemoteExecutor:
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
    ):
        self.address = address
        self._lock = threading.RLock()
        self._broken: str | None = None
        self._resident: dict[int, int] = {}  # storage id -> bytes, mirrored from the server
        self._outbox: list[list] = []
        self._released: list[int] = []
        self._known_programs: set[bytes] = set()
        self._eager: list[tuple[torch.Tensor, int]] = []
        self._bases: dict[tuple, tuple[bytes, list]] = {}  # op sequence -> (key, program) sent last
        self.patches = True  # send programs as patches of similar ones (Note: [Program patches])
        self._known: OrderedDict[bytes, _Known] = OrderedDict()  # digest -> program
        # structure -> its template, or None for one that cannot be (Note: [Program templates])
        self._templates: OrderedDict[bytes, _Template | None] = OrderedDict()
        self.templates = True
        # recording start -> the program (or template) that followed it last time
        self._by_window: OrderedDict[bytes, _Known | _Template] = OrderedDict()
        self._window: bytes | None = None  # how the recording being flushed began
        self._last_enc = None
        self._unread = 0  # replies to spec requests not read yet
        self._ahead = False  # a spec went with the last flush: the next window asks nothing
        self._prefetched: tuple[list, torch.Tensor] | None = None  # Note: [Run then fetch]
        if speculate is None:
            speculate = os.environ.get("GENIE_SPECULATE", "1") not in ("0", "false", "no")
        # Read by the recorder when the executor is installed (Note: [Client speculation]).
        self.speculation_window = _SPECULATION_WINDOW if speculate else 0
        self.counters = {
            "requests": 0, "runs": 0, "programs_sent": 0, "uploads": 0, "upload_bytes": 0,
            "fetches": 0, "fetch_bytes": 0, "eager": 0, "programs_patched": 0,
            "runs_by_digest": 0, "runs_by_template": 0, "spec_sent": 0, "spec_started": 0, "spec_hits": 0,
            "fetched_with_run": 0,
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
        try:
            P.client_handshake(self._t, tok)
            self._t.set_timeout(timeout)
            self._t.spin_us = transports.default_spin_us()
            info = self._request({"t": "hello"})
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
        logger.info(
            "genie: connected to %s (%s, session %s)", address, self.device, info.get("session")
        )

    # -- plumbing -------------------------------------------------------------------------
    def _lost(self, e: Exception) -> TransportError:
        self._broken = (
            f"genie: lost the genie server at {self.address} ({e}). Tensors that lived there are "
            "gone. Check that it is running (start it again with `genie serve --port ...`), then "
            "rerun the program; genie.connect() opens a new session."
        )
        self._t.close()
        return TransportError(self._broken)

    def _check(self) -> None:
        if self._broken is not None:
            raise TransportError(self._broken)

    def _request(
        self,
        header: dict,
        buffers: list[memoryview] | tuple = (),
        receive: Callable[[dict], list[memoryview]] | None = None,
        then_fetch: dict | None = None,
        then_spec: Callable[[], None] | None = None,
    ) -> dict:
        """Send one request and read its reply; with `then_fetch`, a fetch of that ref goes
        right behind it and its value is kept for the next fetch (Note: [Run then fetch]);
        `then_spec` sends a spec behind those, before their replies are read."""
        self._check()
        self._prefetched = None
        self._ahead = False  # this request resolves any speculation the server holds
        self._attach_pre(header)
        body = P.pack(header)
        try:
            self._t.send_frame(P.PROTOCOL_VERSION, P.REQUEST, body, buffers)
            self._outbox, self._released = [], []
            follow = None
            if then_fetch is not None:
                follow = self._fetch_plan(then_fetch)
                self._t.send_frame(P.PROTOCOL_VERSION, P.REQUEST, P.pack(follow[0]), ())
            self._read_spec_replies()  # they precede this request's replies
            if then_spec is not None:
                then_spec()
            reply = self._read_reply(receive)
            if follow is not None:
                freply = self._read_reply(follow[1] if reply.get("ok") is True else None)
                self.counters["requests"] += 1
                if reply.get("ok") is True and freply.get("ok") is True:
                    self._prefetched = (follow[0]["ref"], follow[2]())
        except (TransportError, ProtocolError) as e:
            raise self._lost(e) from None
        self.counters["requests"] += 1
        if reply.get("spec") == "hit":
            self.counters["spec_hits"] += 1
        if reply.get("ok") is not True:
            kind = str(reply.get("kind", "remote"))
            msg = str(reply.get("msg", "the server answered with an error"))
            if reply.get("fatal"):
                self._broken = msg
                self._t.close()
            raise _RequestFailed(kind, msg)
        return reply

    def _read_reply(self, receive: Callable[[dict], list[memoryview]] | None) -> dict:
        frame = self._t.recv_frame(_REPLY_MAX_HEADER)
        if frame.kind != P.REPLY:
            raise ProtocolError(f"genie: unexpected frame kind {frame.kind} from the server")
        reply = P.get_map(P.unpack(frame.header), "reply")
        if reply.get("ok") is True and receive is not None:
            self._t.recv_payload(receive(reply))
        elif frame.payload_len:
            self._t.skip_payload(frame.payload_len)
        return reply

    def _attach_pre(self, header: dict) -> None:
        """Deferred releases and binds ride on the next request; the caller empties the outbox
        once the request is sent."""
        pre = self._outbox
        if self._released:
            pre = [["release", self._released], *pre]
        if pre:
            header["pre"] = pre

    def _read_spec_replies(self) -> None:
        """Read the answers to spec requests sent earlier (they precede every other reply)."""
        while self._unread:
            reply = self._read_reply(None)
            self._unread -= 1
            if reply.get("ok") is not True:
                msg = str(reply.get("msg", "the server refused a speculative run"))
                if reply.get("fatal"):
                    raise ProtocolError(msg)
                logger.warning("genie: a speculative run request failed: %s", msg)
            elif reply.get("spec") is True:
                self.counters["spec_started"] += 1
            else:
                logger.debug("genie: speculative run declined: %s", reply.get("why"))

    @staticmethod
    def _raise(e: _RequestFailed) -> None:
        cls = _KINDS.get(e.kind, RemoteError)
        raise cls(str(e)) from None

    # -- uploads --------------------------------------------------------------------------
    def _upload_parts(self, constants: dict[int, torch.Tensor]):
        """[(entry, view)] covering every constant, pieces no larger than max_message."""
        parts = []
        for sid, t in constants.items():
            if t.device.type != "cpu":
                t = t.cpu()
            lo, hi = _storage_span(t)
            st = t.untyped_storage()
            step = max(self.max_message, 1)
            at = lo
            first = True
            while first or at < hi:
                n = min(step, hi - at)
                view = _bytes_of(st, at, at + n) if n else memoryview(b"")
                parts.append(([int(sid), hi, at, n, first], view))
                at += n
                first = False
        return parts

    def _send_uploads(self, parts) -> None:
        batch, size = [], 0
        for entry, view in parts:
            if batch and size + entry[3] > self.max_message:
                self._upload_batch(batch)
                batch, size = [], 0
            batch.append((entry, view))
            size += entry[3]
        if batch:
            self._upload_batch(batch)

    def _upload_batch(self, batch) -> None:
        try:
            self._request({"t": "upload", "up": [e for e, _ in batch]}, [v for _, v in batch])
        except _RequestFailed as e:
            self._raise(e)
        for entry, _ in batch:
            self._resident[entry[0]] = entry[1]
        self.counters["uploads"] += len(batch)
        self.counters["upload_bytes"] += sum(e[3] for e, _ in batch)

    # -- the Executor protocol ------------------------------------------------------------
    def run(
        self, nodes: list[dict], constants: dict[int, torch.Tensor], targets: list[int]
    ) -> None:
        with self._lock:
            self._check()
            if not nodes:
                self._run_encoded(None, [], [], constants, {})
                return
            enc = encode_program(nodes)
            self._last_enc = enc
            self._run_encoded(enc, enc.binding, enc.rng, constants, enc.fresh)
            self._bases.pop(enc.signature, None)
            self._bases[enc.signature] = (enc.key, enc.nodes)
            if len(self._bases) > _MAX_BASES:
                del self._bases[next(iter(self._bases))]  # the least recently sent

    def _run_encoded(
        self,
        enc,
        binding: list[int],
        rng: list,
        constants: dict,
        fresh: dict,
        then_fetch=None,
        instance: tuple[bytes, list, bytes] | None = None,
        then_spec: Callable[[], None] | None = None,
    ) -> bool:
        """Send a run of `enc` with `binding` (uploads first when they do not fit in it);
        `then_fetch`: Note: [Run then fetch]. `instance` (base key, patch, key) names the program
        as an instance of a template instead (Note: [Program templates]); False then when the
        server has no such base, so that the caller sends the program in full."""
        parts = self._upload_parts(constants) if constants else []
        total = sum(e[3] for e, _ in parts)
        if parts and (enc is None or total > self.max_message):
            self._send_uploads(parts)
            parts = []
        if enc is None:
            return True
        header: dict[str, Any] = {"t": "run", "key": enc.key}
        if instance is not None:
            header["base"], header["patch"], header["key"] = instance
        elif enc.key not in self._known_programs:
            self._describe_program(header, enc)
        header.update(bind=binding, rng=rng, up=[e for e, _ in parts])
        try:
            self._exchange(
                header,
                [v for _, v in parts],
                None if instance else enc,
                then_fetch=then_fetch,
                then_spec=then_spec,
            )
        except _RequestFailed:  # an instance whose base the server no longer has
            return False
        for entry, _ in parts:
            self._resident[entry[0]] = entry[1]
        self.counters["upload_bytes"] += total
        self._resident.update(fresh)
        self.counters["runs"] += 1
        return True

    def run_digest(
        self,
        fingerprint: bytes,
        binding: list[int],
        constants: dict[int, torch.Tensor],
        targets: list[int],
        rng: list[tuple[int, torch.Tensor]],
        nodes: Callable[[], list[dict]],
        then_fetch: dict | None = None,
        template: tuple | None = None,
    ) -> None:
        """A flush by its digest (Note: [Program digests]): a known program goes by key and
        binding; an unknown one is converted (``nodes()``) and sent in full once. `then_fetch`
        is the value the host fetches next, if any (Note: [Run then fetch])."""
        started = time.perf_counter()
        with self._lock:
            self._check()
            try:
                self._run_digest(
                    fingerprint, binding, constants, targets, rng, nodes, then_fetch, template
                )
            finally:
                self.counters["run_seconds"] += time.perf_counter() - started

    def _run_digest(
        self, fingerprint, binding, constants, targets, rng, nodes, then_fetch, template
    ) -> None:
        known = self._known.get(fingerprint)
        structure = params = tpl = None
        if template is not None and self.templates:
            structure, params = template[0], np.frombuffer(template[1], dtype=np.int64)
            tpl = self._templates.get(structure)
            if tpl is not None and len(params) != len(tpl.params):
                tpl = None
        follows: _Known | _Template | None = known
        wire_rng = [[k, state.numpy().tobytes()] for k, state in rng]
        settled = False

        def spec_behind() -> None:
            nonlocal settled
            settled = True
            self._spec_behind(tpl, binding, params, constants, fresh)

        if known is not None:
            self._known.move_to_end(fingerprint)
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
            instance=(tpl.known.key, *tpl.name(params)),
            then_spec=spec_behind,
        ):
            known, follows = tpl.known, tpl
            self.counters["runs_by_template"] += 1
        else:
            if tpl is not None:  # the server forgot the template's base: start it again
                del self._templates[structure]
                tpl, settled = None, False
            self.run(nodes(), constants, targets)
            enc = self._last_enc
            if enc is None or enc.binding != binding:  # the digest and the encoding disagree
                logger.debug("genie: a flush's digest does not match its encoding")
                return
            slot_of = {sid: i for i, sid in enumerate(binding)}
            created = {s for d in enc.nodes for s in d[6]}
            created.update(slot_of[sid] for sid in enc.fresh)
            known = follows = _Known(
                key=enc.key,
                enc=enc,
                created=[(s, enc.fresh.get(binding[s], 0)) for s in sorted(created)],
                external=[s for s in range(len(binding)) if s not in created],
                random=bool(enc.rng),
            )
            self._known[fingerprint] = known
            if len(self._known) > _MAX_DIGESTS:
                self._known.popitem(last=False)
            if structure is not None and structure not in self._templates:
                tpl = _make_template(known, params.copy(), template[2]())
                if tpl is None:
                    logger.debug("genie: a program's integers do not match its encoding")
                self._templates[structure] = tpl
                if len(self._templates) > _MAX_TEMPLATES:
                    self._templates.popitem(last=False)
        if self._window is not None:  # what the recording began with, for next time
            self._by_window[self._window] = follows
            self._by_window.move_to_end(self._window)
            if len(self._by_window) > _MAX_DIGESTS:
                self._by_window.popitem(last=False)
            self._window = None
        if not settled:
            self._settle(tpl, known, binding, params, constants)

    def _settle(self, tpl, known, binding, params, constants) -> None:
        """Remember this flush's integers and binding: what the next one is predicted from."""
        if tpl is not None:
            tpl.before, tpl.last = tpl.last, params
        known.before, known.last = known.last, list(binding)
        empties = {sid for sid, t in constants.items() if _storage_span(t) == (0, 0)}
        known.empty_before = known.empty_last
        known.empty_last = frozenset(i for i, sid in enumerate(binding) if sid in empties)

    def _spec_behind(self, tpl, binding, params, constants, fresh) -> None:
        """Sent right behind an instance's run and fetch, before their replies are read: the
        next step of a decode loop, predicted (Note: [Program templates]), so that the server
        starts it as soon as it has answered the fetch, while this process goes back to the
        user's code to record that step. What the run creates counts as resident for the
        guess; if the run fails, the server declines the guess or the next request undoes it
        (Note: [Speculative runs] in server/speculation.py)."""
        self._settle(tpl, tpl.known, binding, params, constants)
        if self.speculation_window and self._send_spec(tpl, {**self._resident, **fresh}):
            self._ahead = True  # the value fetched with this run was read before it starts

    def speculate(self, window: bytes) -> None:
        """The recorder's first nodes since the last flush fingerprint as `window`: if the
        last window like it was followed by a program, ask the server to start that program
        now (Note: [Client speculation])."""
        self._window = window
        if not self._lock.acquire(blocking=False):
            return  # another thread is talking to the server: no guess this time
        started = time.perf_counter()
        try:
            follows = self._by_window.get(window)
            if follows is None or self._broken is not None or self._ahead:
                return
            # Storages the user dropped since the last flush (last call's outputs) are released
            # with the guess, so that the server need not keep them from being overwritten.
            _C._collect()
            if self._send_spec(follows):
                self._prefetched = None
        finally:
            self._ahead = False
            self.counters["speculate_seconds"] += time.perf_counter() - started
            self._lock.release()

    def _send_spec(self, follows: _Known | _Template, resident: dict | None = None) -> bool:
        """Ask the server to start `follows` (a program, again; or a template's next
        program) with its predicted binding, without waiting; False when there is no guess."""
        header: dict[str, Any] = {"t": "spec"}
        known = follows
        if isinstance(follows, _Template):
            params = follows.predict()
            if params is None:
                return False
            patch, header["key"] = follows.name(params)
            header["base"], header["patch"] = follows.known.key, patch
            known = follows.known
        else:
            header["key"] = known.key
        bind = known.predict(self._resident if resident is None else resident)
        if bind is None or self._unread:
            return False
        header["bind"] = bind
        self._attach_pre(header)
        try:
            self._t.send_frame(P.PROTOCOL_VERSION, P.REQUEST, P.pack(header), [])
        except (TransportError, ProtocolError) as e:
            raise self._lost(e) from None
        self._outbox, self._released = [], []
        self._unread += 1
        self.counters["spec_sent"] += 1
        return True

    def _describe_program(self, header: dict, enc) -> None:
        """Tell the server a program it has not seen: as a patch of a similar one it has
        (Note: [Program patches]) when that is much smaller, else in full."""
        base = self._bases.get(enc.signature)
        if base is not None and self.patches:
            patch = diff_program(base[1], enc.nodes)
            if len(patch) * 24 < len(enc.body) // 2:
                header["base"] = base[0]
                header["patch"] = patch
                return
        header["prog"] = enc.body

    def _exchange(
        self, header: dict, buffers: list, enc, receive=None, then_fetch=None, then_spec=None
    ) -> dict:
        try:
            try:
                reply = self._request(dict(header), buffers, receive, then_fetch, then_spec)
            except _RequestFailed as e:
                if e.kind != "unknown_program" or enc is None:
                    raise
                header.pop("base", None)
                header.pop("patch", None)
                header["prog"] = enc.body
                reply = self._request(dict(header), buffers, receive)
        except _RequestFailed as e:
            if e.kind == "unknown_program" and enc is None:
                raise  # no body to send: the caller decides (Note: [Program templates])
            if e.kind == "execution":
                # The uploads arrived before the program failed: they are resident.
                for entry in header.get("up", ()):
                    self._resident[entry[0]] = entry[1]
            self._raise(e)
        if enc is not None:
            if "prog" in header:
                self.counters["programs_sent"] += 1
            elif "patch" in header:
                self.counters["programs_patched"] += 1
            self._known_programs.add(enc.key)
        return reply

    def fetch(self, ref: dict) -> torch.Tensor:
        started = time.perf_counter()
        try:
            return self._fetch(ref)
        finally:
            self.counters["fetch_seconds"] += time.perf_counter() - started

    def _fetch_plan(self, ref: dict):
        """(fetch request, receive(reply) -> buffers, result() -> the tensor) for `ref`."""
        shape = tuple(ref["shape"])
        dtype = ref["dtype"]
        numel = 1
        for s in shape:
            numel *= s
        expected = numel * P.itemsize(dtype)
        out = self._t.host_buffer(expected)  # Note: [Payload memory] (transports/base.py)

        def receive(reply: dict) -> list[memoryview]:
            if reply.get("n") != expected:
                raise ProtocolError(
                    f"genie: the server sent {reply.get('n')} bytes for a {expected}-byte tensor"
                )
            return [memoryview(out.numpy())]

        def result() -> torch.Tensor:
            self.counters["fetches"] += 1
            self.counters["fetch_bytes"] += expected
            if numel == 0:
                return torch.empty(shape, dtype=dtype)
            return out.view(dtype).reshape(shape)

        return {"t": "fetch", "ref": P.encode_ref(ref)}, receive, result

    def _fetch(self, ref: dict) -> torch.Tensor:
        with self._lock:
            header, receive, result = self._fetch_plan(ref)
            pre, self._prefetched = self._prefetched, None
            if pre is not None and pre[0] == header["ref"]:
                self.counters["fetched_with_run"] += 1
                return pre[1]  # fetched right behind its run (Note: [Run then fetch])
            try:
                self._request(header, (), receive)
            except _RequestFailed as e:
                self._raise(e)
            return result()

    def release(self, ids: list[int]) -> None:
        with self._lock:
            for i in ids:
                self._resident.pop(i, None)
            self._released.extend(ids)
            if len(self._released) > _OUTBOX_FLUSH and self._broken is None:
                try:
                    self._request({"t": "release", "ids": []})
                except (_RequestFailed, TransportError) as e:
                    logger.warning("genie: sending releases failed: %s", e)

    def has(self, storage: int) -> bool:
        return storage in self._resident

    def run_eager(self, node: dict) -> list[Any]:
        with self._lock:
            enc = encode_program([node])
            header = {"t": "eager", "key": enc.key, "bind": enc.binding, "rng": enc.rng}
            if enc.key not in self._known_programs:
                header["prog"] = enc.body
            reply = self._exchange(header, [], enc)
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
            self._outbox.append(["bind", pid, P.encode_ref(ref)])
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
            try:
                reply = self._request({"t": "stats"})
            except _RequestFailed as e:
                self._raise(e)
            return {"session": reply["session"], "server": reply["server"]}

    def close(self) -> None:
        with self._lock:
            if self._broken is None and not self._t.closed:
                try:
                    self._request({"t": "bye"})
                except (GenieError, OSError):
                    pass
            self._broken = self._broken or f"genie: the session with {self.address} was closed"
            self._t.close()

    def __repr__(self) -> str:
        return f"RemoteExecutor({self.address!r}, device={self.device!r})"


# -- selecting the remote executor --------------------------------------------------------
_active: RemoteExecutor | None = None  # the client genie.connect installed, for disconnect()


def _token_from_env() -> bytes | None:
    tok = os.environ.get("GENIE_TOKEN")
    if tok:
        return tok.encode()
    path = os.environ.get("GENIE_TOKEN_FILE")
    if path:
        with open(path, "rb") as f:
            return f.read().strip()
    return None


def connect(
    address: str | None = None,
    token: str | bytes | None = None,
    *,
    timeout: float | None = None,
    transport: str | None = None,
    install: bool = True,
    speculate: bool | None = None,
) -> RemoteExecutor:
    """Open a session with the genie server at `address` (default ``$GENIE_SERVER``) and, with
    `install`, run every following flush there. The token defaults to ``$GENIE_TOKEN`` (or the
    file ``$GENIE_TOKEN_FILE``); `timeout` (seconds one reply may take) to ``$GENIE_TIMEOUT``
    or 600; `transport` to ``$GENIE_TRANSPORT`` or "tcp"; `speculate` (start a program on the
    server before its recording ends when it looks like the last one, Note: [Client
    speculation]) to ``$GENIE_SPECULATE`` or on. Connect before creating remote
    tensors: what the previous executor held is dropped. ``disconnect()`` goes back to local."""
    global _active
    if timeout is None:
        timeout = float(os.environ.get("GENIE_TIMEOUT", "600"))
    transport = transport or os.environ.get("GENIE_TRANSPORT", "tcp")
    address = address or os.environ.get("GENIE_SERVER")
    if not address:
        raise GenieError(
            "genie: no server address; pass one to genie.connect() or set GENIE_SERVER=host:port"
        )
    if token is None:
        token = _token_from_env()
    if token is None:
        raise GenieError(
            f"genie: no token for the server at {address}; pass token= or set GENIE_TOKEN "
            "(the token the server was started with: genie serve --token-file FILE)"
        )
    client = RemoteExecutor(address, token, timeout=timeout, transport=transport, speculate=speculate)
    if install:
        from genie.runtime.executor import install_executor

        install_executor(client, target_device_type=client.device_type)
        previous, _active = _active, client
        if previous is not None:
            previous.close()
    return client


def disconnect() -> None:
    """Close the session genie.connect opened and go back to the local executor."""
    global _active
    from genie.runtime.executor import use_local

    use_local()
    if _active is not None:
        _active.close()
        _active = None


def servers_from_topology(path: str) -> list[dict[str, Any]]:
    """Servers listed in a topology file: JSON ``{"servers": [{"address": "host:port",
    "token": "..." | "token_file": "...", ...}]}`` (or a bare list of such entries)."""
    with open(path) as f:
        data = json.load(f)
    servers = data.get("servers", []) if isinstance(data, dict) else data
    out = []
    for s in servers:
        if isinstance(s, str):
            s = {"address": s}
        if not isinstance(s, dict) or "address" not in s:
            raise GenieError(f'genie: {path}: every server needs an "address": host:port')
        out.append(s)
    return out


def _is_server_process() -> bool:
    if os.environ.get("GENIE_ROLE") == "server":
        return True
    argv = sys.argv
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name.startswith("genie.runtime.server"):
        return True
    return (
        len(argv) > 1 and os.path.basename(argv[0]) in ("genie", "genie.exe") and argv[1] == "serve"
    )


def connect_from_env():
    """What ``import genie`` calls. ``GENIE_SERVER`` names one server: connect to it.
    ``GENIE_TOPOLOGY`` names a topology file: a TOML cluster description
    (genie.NetworkTopology; devices with an ``endpoint`` are servers) or a JSON server list;
    with more than one device every flush is scheduled over them (MultiDeviceExecutor),
    with one server it is a plain connection. Neither set: the local executor stays."""
    if _is_server_process():
        return None
    address = os.environ.get("GENIE_SERVER")
    if address:
        return connect(address)
    path = os.environ.get("GENIE_TOPOLOGY")
    if not path:
        return None
    from genie.runtime.executor import install_executor
    from genie.runtime.multi_device import MultiDeviceExecutor

    if path.endswith(".toml"):
        from genie.scheduler import NetworkTopology

        ex = MultiDeviceExecutor.from_topology(NetworkTopology.from_file(path), token=_token_from_env())
        install_executor(ex, ex.device_type)
        return ex
    servers = servers_from_topology(path)
    if not servers:
        raise GenieError(f"genie: {path} lists no servers")
    if len(servers) == 1:
        s = servers[0]
        token = s.get("token")
        if token is None and s.get("token_file"):
            with open(s["token_file"], "rb") as f:
                token = f.read().strip()
        return connect(s["address"], token)
    ex = MultiDeviceExecutor.from_servers(servers, token=_token_from_env())
    install_executor(ex, ex.device_type)
    return ex
