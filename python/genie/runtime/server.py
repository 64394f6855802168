"""``genie serve``: the server that runs remote_accelerator programs on this host's device.

One session per client connection, each on its own thread with its own resident storages
(weights uploaded once, KV caches, activations), all sharing one cache of validated programs.
Requests are described in Note: [Wire format] (genie/runtime/protocol.py). A bad request gets
an error reply and the session goes on; a request that breaks framing closes that connection
only; every other session keeps being served.

Run ``python -m genie.runtime.server --help`` (the same options as ``genie serve``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import re
import secrets
import signal
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from genie.errors import ExecutionError, GenieError, ProtocolError, RemoteError, TransportError
from genie.runtime import protocol as P
from genie.runtime.program import (
    Program,
    ProgramCache,
    check_binding,
    execute,
    next_patch,
    patch_key,
    program_key,
)
from genie.runtime.program.graphs import GraphRunner
from genie.runtime.replay import Environment, byte_view
from genie.runtime.transports import Listener, Transport, default_spin_us, listen
from genie.runtime.transports.base import Frame

logger = logging.getLogger(__name__)

__all__ = ["Server", "ServerConfig", "Session", "add_serve_arguments", "serve_main"]


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 7070
    device: str = "cpu"
    token: bytes = b""
    limits: P.Limits = field(default_factory=P.Limits)
    cuda_graphs: bool = True
    transport: str = "tcp"
    # Note: [Connection hygiene]
    handshake_timeout: float = 5.0  # seconds a new connection has to prove the token
    max_unauthenticated: int = 32  # connections still in their handshake; the oldest goes
    idle_timeout: float | None = 1800.0  # seconds a session may sit silent; None = forever
    max_sessions: int = 256  # authenticated sessions
    spin_us: int | None = None  # poll for the next request before blocking; None: default_spin_us()
    # check the likely next program instance ahead (Note: [Preparing the next instance]);
    # None: on CUDA servers only
    prepare_next: bool | None = None


class Session:
    """One client's state on the server."""

    def __init__(self, server: Server, transport: Transport, number: int):
        self.server = server
        self.transport = transport
        self.number = number
        self.limits = server.config.limits
        self.env = Environment(server.device)
        self.pending: dict[int, torch.Tensor] = {}
        self._next_pending = 0
        self.runner = GraphRunner(server.device, enabled=server.config.cuda_graphs)
        self.speculation: _Speculation | None = None  # Note: [Speculative runs]
        self.spec_started = 0
        self.spec_declined = 0
        self.spec_hits = 0
        self.spec_misses = 0
        # (key, bind, [(input id, storage)], plan): the speculation checked last
        self._spec_valid: tuple | None = None
        self._last_patch: dict[bytes, list] = {}  # base key -> the last patch of it named
        self.requests = 0
        self.errors = 0
        self.busy_seconds = 0.0  # handling requests, replies not included
        self.timings: dict[str, list] = {}  # what -> [count, seconds]: where a session's time goes
        self._kind = "?"
        # Note: [Graceful shutdown] The server closes a session only while it is idle, and
        # only once it has been idle for a moment: a materialization is a run request then a
        # fetch request, and the fetch must not find the connection gone.
        self.busy = False
        self.closing = False
        self.last_active = time.monotonic()
        self.state_lock = threading.Lock()
        self.authenticated = False
        self.opened = time.monotonic()
        self._handlers = {
            "hello": self._hello,
            "upload": self._upload,
            "run": self._run,
            "eager": self._run,
            "fetch": self._fetch,
            "release": self._release,
            "stats": self._stats,
            "spec": self._spec,
            "bye": self._bye,
        }

    # -- lifecycle ------------------------------------------------------------------------
    def serve(self) -> None:
        t = self.transport
        try:
            t.set_timeout(self.server.config.handshake_timeout)
            if not P.server_handshake(t, self.server.config.token):
                logger.warning("genie: refused %s: authentication failed", t.peer)
                return
            self.authenticated = True
            t.set_timeout(self.server.config.idle_timeout)
            spin = self.server.config.spin_us
            t.spin_us = default_spin_us() if spin is None else spin
            logger.info("genie: session %d opened for %s", self.number, t.peer)
            self.last_active = time.monotonic()
            while True:
                try:
                    frame = t.recv_frame(self.limits.max_header)
                except ProtocolError as e:
                    reply, _, _ = self._fatal("protocol", str(e).removeprefix("genie: "))
                    self._send(reply, [])
                    return
                with self.state_lock:
                    if self.closing:
                        return
                    self.busy = True
                started = time.perf_counter()
                try:
                    self._kind = "?"
                    reply, buffers, close = self.handle_frame(frame)
                    elapsed = time.perf_counter() - started
                    self.busy_seconds += elapsed
                    self._time(self._kind, elapsed)
                    self._send(reply, buffers)
                finally:
                    self.last_active = time.monotonic()
                    self.busy = False
                if close:
                    return
        except TransportError as e:
            logger.info("genie: session %d (%s) ended: %s", self.number, t.peer, e)
        except Exception:  # noqa: BLE001 - one session's bug must not take the server down
            logger.exception("genie: session %d (%s) failed", self.number, t.peer)
        finally:
            self.close()

    def _send(self, reply: dict, buffers: list[memoryview]) -> None:
        self.transport.send_frame(P.PROTOCOL_VERSION, P.REPLY, P.pack(reply), buffers)

    def close(self) -> None:
        """Free everything this session holds."""
        self.speculation = None  # its temporaries and snapshots go with the storages
        self.env.storages.clear()
        self.pending.clear()
        self.runner.clear()
        self.transport.close()
        if self.server.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- dispatch -------------------------------------------------------------------------
    def handle_frame(self, frame: Frame) -> tuple[dict, list[memoryview], bool]:
        """Answer one request frame: (reply, payload buffers, close the connection after)."""
        self.requests += 1
        if frame.version != P.PROTOCOL_VERSION or frame.kind != P.REQUEST:
            return self._fatal(
                "protocol", f"expected a protocol {P.PROTOCOL_VERSION} request frame"
            )
        if frame.payload_len > self.limits.max_message:
            return self._fatal(
                "protocol",
                f"a {frame.payload_len}-byte payload exceeds the server's limit of {self.limits.max_message} bytes",
            )
        try:
            with self.server.device_context(self):
                spec, self.speculation = self.speculation, None
                try:
                    req = P.get_map(P.unpack(frame.header, self.limits), "request")
                except Exception:
                    if spec is not None:
                        self._spec_abort(spec)
                    raise
                # Resolve a pending speculation before "pre" (Note: [Speculative runs]).
                hit = spec is not None and self._spec_resolve(spec, req, frame)
                kind = req.get("t")
                self._kind = "commit" if hit else str(kind)[:16]
                handler = self._handlers.get(kind) if type(kind) is str else None
                P.need(handler is not None, f"unknown request type {str(kind)[:40]!r}")
                if kind not in ("upload", "run", "eager"):
                    P.need(frame.payload_len == 0, "this request carries no payload")
                self._apply_pre(req.get("pre"))
                if hit:
                    reply, buffers = {"ok": True, "spec": "hit"}, []
                else:
                    reply, buffers = handler(req, frame)
                close = kind == "bye"
        except TransportError:
            raise
        except Exception as e:  # noqa: BLE001 - answered, logged, and the session goes on
            self.errors += 1
            reply, buffers, close = self._error_reply(e), [], False
            if self.transport.payload_remaining:  # keep the stream in step: drop the payload
                self.transport.skip_payload(self.transport.payload_remaining)
        if self.transport.payload_remaining:
            # A handler that did not consume the payload it was sent: the stream is out of step.
            return self._fatal("protocol", "the request's payload did not match its header")
        return reply, buffers, close

    def _fatal(self, kind: str, message: str) -> tuple[dict, list, bool]:
        self.errors += 1
        logger.warning(
            "genie: session %d (%s): %s; closing", self.number, self.transport.peer, message
        )
        reply = P.error_reply(kind, f"genie: {message}; the server closed this connection")
        reply["fatal"] = True
        return reply, [], True

    def _error_reply(self, e: Exception) -> dict:
        msg = str(e) if str(e).startswith("genie") else f"genie: {type(e).__name__}: {e}"
        # torch's C++ errors carry a backtrace with the server's library addresses: the
        # client gets the message, not the server's memory layout.
        msg = msg.split("\nException raised from ", 1)[0]
        if isinstance(e, ProtocolError):
            kind = "protocol"
        elif isinstance(e, ExecutionError):
            kind = "execution"
        elif isinstance(e, _UnknownProgram):
            kind = "unknown_program"
        elif isinstance(e, (MemoryError, torch.OutOfMemoryError)):
            kind = "oom"
        elif isinstance(e, GenieError):
            kind = "remote"
        else:
            kind = "internal"
            logger.exception("genie: session %d: internal error", self.number)
        if kind != "unknown_program":
            logger.info("genie: session %d: %s error: %s", self.number, kind, msg[:300])
        self._after_failure(msg, kind == "oom")
        return P.error_reply(kind, msg)

    def _after_failure(self, msg: str, oom: bool) -> None:
        """What a failed request means for the device: a corrupted CUDA context stops the
        server; an out-of-memory error returns the cached blocks."""
        if "device-side assert" in msg or "illegal memory access" in msg:
            self.server.fatal(f"the CUDA context is corrupted ({msg[:200]})")
        if self.server.device.type == "cuda" and ("out of memory" in msg or oom):
            torch.cuda.empty_cache()

    def _apply_pre(self, pre: Any) -> None:
        if pre is None:
            return
        for op in P.get_list(pre, "pre", self.limits.max_list):
            P.need(type(op) is list and len(op) >= 2, "a deferred operation must be a list")
            if op[0] == "release":
                self.env.release(P.get_sids(op[1], "release ids", self.limits.max_list))
            elif op[0] == "bind" and len(op) == 3:
                pid = P.get_int(op[1], 0, P._MAX_SID, "pending result")
                meta = P.decode_ref(op[2], self.limits)
                value = self.pending.pop(pid, None)
                P.need(value is not None, f"no pending result {pid} to bind")
                self.env.bind(meta, value)
            else:
                raise ProtocolError(
                    f"genie: invalid request: unknown deferred operation {str(op[0])[:40]!r}"
                )

    # -- requests -------------------------------------------------------------------------
    def _hello(self, req: dict, frame: Frame) -> tuple[dict, list]:
        dev = self.server.device
        return {
            "ok": True,
            "device": str(dev),
            "device_type": dev.type,
            "device_name": self.server.device_name,
            "protocol": P.PROTOCOL_VERSION,
            "cuda_graphs": self.runner.enabled,
            "session": self.number,
            "server": _version(),
            **self.limits.as_dict(),
        }, []

    def _parse_uploads(self, up: Any, frame: Frame) -> list[tuple[int, int, int, int, bool]]:
        entries = []
        started: dict[int, int] = {}
        total = 0
        for e in P.get_list(up or [], "uploads", self.limits.max_list):
            P.need(type(e) is list and len(e) == 5, "an upload must be [id, nbytes, at, n, new]")
            sid = P.get_sid(e[0])
            nbytes = P.get_int(e[1], 0, self.limits.max_storage, "upload storage size")
            at = P.get_int(e[2], 0, nbytes, "upload offset")
            n = P.get_int(e[3], 0, nbytes - at, "upload length")
            new = P.get_bool(e[4], "upload new")
            if new:
                started[sid] = nbytes
            else:  # a later piece of a storage this request or an earlier one started
                st = self.env.storages.get(sid)
                size = started.get(sid, st.nbytes() if st is not None else -1)
                P.need(size == nbytes, f"upload continues storage {sid}, which is not resident")
            entries.append((sid, nbytes, at, n, new))
            total += n
        P.need(
            total == frame.payload_len,
            f"uploads announce {total} bytes, the frame carries {frame.payload_len}",
        )
        self._check_memory(sum(e[1] for e in entries if e[4]))
        return entries

    def _check_memory(self, extra: int) -> None:
        limit = self.limits.memory_limit
        if limit and self.env.nbytes() + extra > limit:
            raise RemoteError(
                f"genie: this session would hold {self.env.nbytes() + extra} bytes, over the server's "
                f"limit of {limit} bytes per session (genie serve --memory-limit)"
            )

    def _receive_uploads(self, entries: list[tuple[int, int, int, int, bool]]) -> None:
        dev = self.server.device
        for sid, nbytes, at, n, new in entries:
            if new:
                # Note: [No uninitialized bytes] (program.py): an upload that does not cover
                # its storage in one piece leaves the rest zero, never reused memory.
                make = torch.empty if at == 0 and n == nbytes else torch.zeros
                st = self.transport.payload_storage(nbytes, dev, zeroed=make is torch.zeros)
                self.env.storages[sid] = st
            else:
                st = self.env.storages[sid]
            if n:
                dst = torch.empty(0, dtype=torch.uint8, device=dev).set_(st, at, (n,), (1,))
                self.transport.recv_payload_into(dst)  # Note: [Payload memory] (transports/base.py)

    def _upload(self, req: dict, frame: Frame) -> tuple[dict, list]:
        self._receive_uploads(self._parse_uploads(req.get("up"), frame))
        return {"ok": True}, []

    def _run(self, req: dict, frame: Frame) -> tuple[dict, list]:
        eager = req["t"] == "eager"
        uploads = self._parse_uploads(req.get("up"), frame)
        key = P.get_bytes(req.get("key"), "program key", 16)
        body = req.get("prog")
        cache = self.server.programs
        if body is not None:
            program = cache.add(P.get_bytes(body, "program", self.limits.max_header), self.limits)
            P.need(program.key == key, "the program key does not match the program")
        else:
            program = self._lookup(req, key)
            if program is None:
                raise _UnknownProgram("genie: unknown program; send it again with its body")
        P.need(not eager or len(program.steps) == 1, "an eager request runs exactly one node")
        # Everything is checked before the payload is read; what follows changes state.
        incoming = {sid: nbytes for sid, nbytes, *_ in uploads}
        states = check_binding(program, req.get("bind"), req.get("rng"), self.env, incoming)
        self._check_memory(program.fresh_bytes + sum(e[1] for e in uploads if e[4]))
        self._receive_uploads(uploads)
        binding = req["bind"]
        storages = self.env.storages
        created = [binding[local] for local in program.produced if binding[local] not in storages]
        if eager:
            self.pending.clear()
            results = execute(program, binding, states, self.env, keep_last=True)
            reply = {"ok": True, "res": [self._describe(r) for r in results]}
        else:
            self.runner.run(program, binding, states, self.env)
            reply = {"ok": True}
        if self._over_limit():
            self.env.release(created)
            self.pending.clear()
            raise MemoryError(
                f"genie: the run left this session holding {self._held_bytes()} bytes, over the "
                f"server's limit of {self.limits.memory_limit} bytes per session (genie serve "
                "--memory-limit); what it created was released"
            )
        return reply, []

    # Note: [Real memory accounting]
    # Validation counts what a program declares; kernels allocate what they allocate. So
    # after each run the session's real holding is measured: every distinct storage it holds
    # (ids that share one count it once) and its pending eager results. A run that ends over
    # the limit loses what it created and gets an "oom" error reply. (A kernel's temporary
    # workspace during a run is not counted: it is freed before the reply.)
    def _held_bytes(self) -> int:
        held: dict[int, int] = {}
        for st in self.env.storages.values():
            held[st.data_ptr()] = st.nbytes()
        for v in self.pending.values():
            st = v.untyped_storage()
            held[st.data_ptr()] = st.nbytes()
        held.pop(0, None)  # empty storages
        return sum(held.values())

    def _over_limit(self) -> bool:
        limit = self.limits.memory_limit
        return bool(limit) and self._held_bytes() > limit

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
    def _lookup(self, req: dict, key: bytes) -> Program | None:
        """The cached program `key` names, or the one `req` describes as a patch of a cached
        base: an instance (Note: [Program instances]) when `key` is the patch's key, else a
        patched program whose bytes hash to `key` (Note: [Program patches])."""
        cache = self.server.programs
        program = cache.get(key)
        if req.get("base") is None:
            return program
        base = cache.get(P.get_bytes(req["base"], "base program key", 16))
        if base is None:
            return program
        patch = P.get_list(req.get("patch"), "patch", self.limits.max_list)
        if program is not None:
            if program.meta.pop("prepared", False):
                self.server.prepared_hits += 1
            self._prepare_next(base, patch)
            return program
        if key == patch_key(base.key, patch):
            program = cache.instance(base, patch, key, self.limits)
            self._prepare_next(base, patch)
            return program
        program = cache.patched(base, patch, self.limits)
        return program if program.key == key else None  # packed differently: the body follows

    def _prepare_next(self, base: Program, patch: list) -> None:
        before = self._last_patch.pop(base.key, None)
        self._last_patch[base.key] = patch
        while len(self._last_patch) > 4:
            del self._last_patch[next(iter(self._last_patch))]
        if before is not None:
            self.server.prepare(base, before, patch)

    def _describe(self, v: Any) -> dict:
        if isinstance(v, torch.Tensor):
            pid = self._next_pending
            self._next_pending += 1
            self.pending[pid] = v
            return {
                "p": pid,
                "dtype": P.dtype_name(v.dtype),
                "shape": list(v.shape),
                "stride": list(v.stride()),
            }
        if isinstance(v, (list, tuple)) and any(isinstance(x, torch.Tensor) for x in v):
            return {"l": [self._describe(x) for x in v]}
        return {"v": v}

    def _fetch(self, req: dict, frame: Frame) -> tuple[dict, list]:
        meta = P.decode_ref(req.get("ref"), self.limits)
        st = self.env.storages.get(meta.storage)
        if st is None:
            raise RemoteError(f"genie: storage {meta.storage} is not resident in this session")
        need = P.extent(meta.shape, meta.stride, meta.offset, P.itemsize(meta.dtype))
        P.need(need <= st.nbytes(), f"the view reads {need} bytes of a {st.nbytes()}-byte storage")
        value = self.env.view(meta).contiguous()
        if value.device.type != "cpu":
            value = value.cpu()
        # Dense, but a size-1 dimension may keep any stride: address the elements directly.
        flat = (
            value.as_strided((value.numel(),), (1,)).view(torch.uint8)
            if value.numel()
            else torch.empty(0, dtype=torch.uint8)
        )
        return {"ok": True, "n": flat.numel()}, [memoryview(flat.numpy())]

    def _release(self, req: dict, frame: Frame) -> tuple[dict, list]:
        self.env.release(P.get_sids(req.get("ids"), "release ids", self.limits.max_list))
        return {"ok": True}, []

    def _stats(self, req: dict, frame: Frame) -> tuple[dict, list]:
        return {"ok": True, "session": self.stats(), "server": self.server.stats()}, []

    def _bye(self, req: dict, frame: Frame) -> tuple[dict, list]:
        return {"ok": True}, []

    # -- speculative runs -----------------------------------------------------------------
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
    # The session holds at most one speculation; the very next request resolves it.
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
    def _spec(self, req: dict, frame: Frame) -> tuple[dict, list]:
        key = P.get_bytes(req.get("key"), "program key", 16)
        P.need(len(key) == 16, "a program key has 16 bytes")
        bind = P.get_list(req.get("bind"), "binding", self.limits.max_list)
        program = self._lookup(req, key)
        # The same speculation as the last one (a serving loop's next forward) whose inputs
        # are still the very storages it checked: nothing to check again.
        valid = self._spec_valid
        storages = self.env.storages
        if (
            program is not None
            and valid is not None
            and valid[0] == key
            and valid[1] == bind
            and all(storages.get(sid) is st for sid, st in valid[2])
        ):
            return self._spec_start(program, bind, valid[3])
        ids = [b for b in bind if type(b) is int]
        if len(ids) < len(bind):  # the others may only be None or an empty upload
            for b in bind:
                if type(b) is not int and b is not None and b != P.EMPTY_UPLOAD:
                    P.get_sid(b)
        P.get_sids(ids, "binding", self.limits.max_list)
        if program is None:
            return self._spec_decline("unknown program")
        P.need(
            len(bind) == program.nlocals,
            f"binding has {len(bind)} ids for {program.nlocals} storages",
        )
        if program.random_steps:
            return self._spec_decline("the program has random steps")
        unbound = [local for local in program.inputs if bind[local] is None]
        if unbound:
            return self._spec_decline(
                f"local {unbound[0]} is an input of the program but has no id"
            )
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
            check_binding(program, probe, None, self.env, incoming)
        except GenieError as e:
            return self._spec_decline(str(e).removeprefix("genie: "))
        temps: dict[int, int] = {}
        binding = []
        for local, b in enumerate(bind):
            if type(b) is not int:
                b = temps[local] = -1 - len(temps)
            binding.append(b)
        written = [bind[local] for local in program.produced if type(bind[local]) is int]
        plan = (binding, temps, written)
        self._spec_valid = (
            key,
            list(bind),
            [(b, storages[b]) for b in (bind[local] for local in program.inputs) if type(b) is int],
            plan,
        )
        return self._spec_start(program, bind, plan)

    def _spec_start(self, program: Program, bind: list, plan: tuple) -> tuple[dict, list]:
        """Run a checked speculation (Note: [Speculative runs]); `plan` is the binding with
        temporaries, the temporaries by local, and the ids the run may write."""
        binding, temps, written = plan
        storages = self.env.storages
        for local, temp in temps.items():
            if bind[local] is not None:  # an empty upload: an empty storage stands in
                storages[temp] = torch.empty(
                    0, dtype=torch.uint8, device=self.server.device
                ).untyped_storage()
        snapshot = sum(storages[sid].nbytes() for sid in written if sid in storages)
        try:
            self._check_memory(program.fresh_bytes + snapshot)
        except RemoteError:
            for temp in temps.values():
                storages.pop(temp, None)
            return self._spec_decline("over the session's memory limit")
        spec = _Speculation(program, bind, temps, [], self.runner.handed(program.key))
        try:
            for sid in written:
                st = storages.get(sid)
                spec.saved.append((sid, st, None if st is None else byte_view(st).clone()))
            started = time.perf_counter()
            self.runner.run(program, binding, {}, self.env)
            self._time("spec_launch", time.perf_counter() - started)
            if self._over_limit():  # Note: [Real memory accounting]
                self._spec_abort(spec, miss=False)
                return self._spec_decline("over the session's memory limit")
        except Exception as e:  # noqa: BLE001 - any failure declines; the session is restored
            self._spec_abort(spec, miss=False)
            msg = str(e).removeprefix("genie: ")
            self._after_failure(msg, isinstance(e, (MemoryError, torch.OutOfMemoryError)))
            return self._spec_decline(f"the speculative run failed: {msg}")
        self.speculation = spec
        self.spec_started += 1
        return {"ok": True, "spec": True}, []

    def _time(self, what: str, seconds: float) -> None:
        t = self.timings.get(what)
        if t is None:
            t = self.timings[what] = [0, 0.0]
        t[0] += 1
        t[1] += seconds

    def _spec_decline(self, why: str) -> tuple[dict, list]:
        self.spec_declined += 1
        logger.debug("genie: session %d: speculation declined: %s", self.number, why)
        return {"ok": True, "spec": False, "why": why[:200]}, []

    def _spec_resolve(self, spec: _Speculation, req: dict, frame: Frame) -> bool:
        """Commit `spec` when `req` is the run it predicted, else undo it; True on commit."""
        try:
            binding = self._spec_confirmed(spec, req, frame)
        except Exception:  # noqa: BLE001 - a request that cannot even be compared is a miss
            logger.exception("genie: session %d: comparing a run with a speculation", self.number)
            binding = None
        if binding is None:
            self._spec_abort(spec)
            return False
        storages = self.env.storages
        renamed: dict[int, int] = {}
        for local, temp in spec.temps.items():
            st = storages.pop(temp, None)
            if st is not None:  # a temporary the run did not produce is just dropped
                storages[binding[local]] = st
            renamed[temp] = binding[local]
        self.runner.rename(renamed)
        self.spec_hits += 1
        return True

    def _spec_confirmed(self, spec: _Speculation, req: dict, frame: Frame) -> list[int] | None:
        """The run's binding when `req` is the run `spec` predicted (the commit rule of
        Note: [Speculative runs]), else None."""
        program = spec.program
        if req.get("t") != "run" or frame.payload_len:
            return None
        # The only uploads a speculation can foresee are empty ones, at its ["up", 0] entries.
        empty = [local for local, b in enumerate(spec.bind) if b == P.EMPTY_UPLOAD]
        try:
            uploads = self._parse_uploads(req.get("up"), frame)
        except GenieError:
            return None
        if any(nbytes or n or not new for _, nbytes, _, n, new in uploads):
            return None
        key, body = req.get("key"), req.get("prog")
        if type(key) is not bytes or key != program.key:
            return None
        if body is not None and (type(body) is not bytes or program_key(body) != program.key):
            return None
        binding = req.get("bind")
        if type(binding) is not list or len(binding) != len(spec.bind) or req.get("rng"):
            return None
        # What check_binding would ask, against the speculation it already passed: the ids
        # it was given are the run's; the rest are new, distinct, valid ids (nothing ran in
        # between, and "pre" may not touch the binding).
        fixed, others = spec.fixed
        if [binding[i] for i in fixed] != [spec.bind[i] for i in fixed]:
            return None
        storages = self.env.storages
        fresh = [binding[i] for i in others]
        if not all(type(x) is int and 0 <= x <= P._MAX_SID and x not in storages for x in fresh):
            return None
        if len(set(binding)) != len(binding):
            return None
        incoming = {sid for sid, *_ in uploads}
        if incoming != {binding[local] for local in empty} or len(incoming) != len(uploads):
            return None
        try:
            released = self._pre_releases(req.get("pre"))
        except GenieError:
            return None  # handled as a normal request, which reports what is wrong
        if released is None or not released.isdisjoint(binding):
            return None
        return binding

    def _pre_releases(self, pre: Any) -> set[int] | None:
        """The ids `pre` releases, or None when it does anything else."""
        released: set[int] = set()
        for op in P.get_list(pre or [], "pre", self.limits.max_list):
            if type(op) is not list or len(op) < 2 or op[0] != "release":
                return None
            released.update(P.get_sids(op[1], "release ids", self.limits.max_list))
        return released

    def _spec_abort(self, spec: _Speculation, *, miss: bool = True) -> None:
        """Undo `spec`: the session as it was before the speculative run."""
        storages = self.env.storages
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
        self.runner.restore_handed(spec.program.key, spec.handed)
        if miss:
            self.spec_misses += 1

    def stats(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "resident_count": len(self.env.storages),
            "resident_bytes": _resident_bytes(self.env),
            "pending": len(self.pending),
            "requests": self.requests,
            "errors": self.errors,
            "busy_seconds": self.busy_seconds,
            "spec_started": self.spec_started,
            "spec_declined": self.spec_declined,
            "spec_hits": self.spec_hits,
            "spec_misses": self.spec_misses,
            "timings_ms": {k: [n, round(t * 1e3, 3)] for k, (n, t) in self.timings.items()},
            **self.transport.stats.as_dict(),
            **self.runner.stats(),
        }


class _UnknownProgram(GenieError):
    pass


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


def _resident_bytes(env: Environment) -> int:
    # Another session's thread may be changing its storages: copy them in one step first.
    return sum(st.nbytes() for st in list(env.storages.values()))


def _version() -> str:
    try:
        import genie

        return getattr(genie, "__version__", "unknown")
    except ImportError:
        return "unknown"


# Note: [Connection hygiene]
# A connection is a thread and some memory before it has proved anything. Connections still
# in their handshake have their own small cap (max_unauthenticated) and a short timeout
# (handshake_timeout): when the cap is full, a new connection pushes out the oldest one
# still waiting, so idle unauthenticated sockets cannot lock token holders out (their cap,
# max_sessions, counts authenticated sessions only). Before the token, only the fixed-size
# AUTH frame is read (protocol.server_handshake); after it, a header's buffer grows as its
# bytes arrive (transports.base.recv_growing) and an upload's storage counts against the
# session's memory limit before its bytes are read. An authenticated session silent for
# idle_timeout seconds (genie serve --idle-timeout, default 30 minutes; 0: never) is closed
# and its storages freed.
class Server:
    """Accepts clients and runs one Session per connection."""

    def __init__(self, config: ServerConfig):
        if not config.token:
            raise GenieError("genie: a server needs a token (genie serve --token-file FILE)")
        self.config = config
        self.device = torch.device(config.device)
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise GenieError(
                    f"genie: --device {config.device} asked for, but CUDA is not available here"
                )
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
            self.device_name = torch.cuda.get_device_name(self.device)
        elif self.device.type == "cpu":
            self.device_name = "cpu"
        else:
            raise GenieError(f"genie: a server runs on cpu or cuda, not {config.device}")
        self.programs = ProgramCache()
        # Note: [Preparing the next instance]
        self._helper: ThreadPoolExecutor | None = None
        self.prepared_hits = 0  # requests that found a prepared instance
        prepare = config.prepare_next
        if prepare if prepare is not None else self.device.type == "cuda":
            self._helper = ThreadPoolExecutor(1, thread_name_prefix="genie-prepare")
            # A thread that wants the GIL back from the helper waits at most this long.
            sys.setswitchinterval(min(sys.getswitchinterval(), 0.0005))
        self.stopping = False
        self.exit_code = 0
        self._listener: Listener | None = None
        self._sessions: dict[int, Session] = {}
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._count = 0
        self._accept_thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> tuple[str, int]:
        self._listener = listen(
            self.config.host,
            self.config.port,
            kind=self.config.transport,
            max_message=self.config.limits.max_message,
        )
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name="genie-accept", daemon=True
        )
        self._accept_thread.start()
        return self.address

    def prepare(self, base: Program, before: list, last: list) -> None:
        """Have the helper thread prepare the instance that likely follows the patches
        `before` and `last` of `base` (Note: [Preparing the next instance])."""
        if self._helper is None or self.stopping:
            return

        def job() -> None:
            guess = next_patch(before, last)
            if guess is None:
                return
            try:
                self.programs.prepare(base, guess, self.config.limits, self.device)
            except GenieError as e:  # a guess that does not check: the client will not send it
                logger.debug("genie: no prepared instance: %s", e)
            except Exception:  # noqa: BLE001 - the helper must outlive a bad guess
                logger.exception("genie: preparing the next instance failed")

        with contextlib.suppress(RuntimeError):  # shut down meanwhile
            self._helper.submit(job)

    @property
    def cuda_graphs(self) -> bool:
        return self.config.cuda_graphs and self.device.type == "cuda"

    @property
    def address(self) -> tuple[str, int]:
        assert self._listener is not None, "start() the server first"
        return self._listener.address

    def _accept_loop(self) -> None:
        while not self.stopping:
            try:
                t = self._listener.accept(timeout=0.5)
            except OSError as e:
                if not self.stopping:
                    logger.error("genie: accept failed: %s", e)
                    time.sleep(0.1)
                continue
            if t is None:
                continue
            with self._lock:
                self._threads = [th for th in self._threads if th.is_alive()]
                # Note: [Connection hygiene]
                waiting = [s for s in self._sessions.values() if not s.authenticated]
                if len(waiting) >= self.config.max_unauthenticated:
                    oldest = min(waiting, key=lambda s: s.opened)
                    logger.warning(
                        "genie: %d connections without a token yet; dropping the oldest (%s)",
                        len(waiting),
                        oldest.transport.peer,
                    )
                    oldest.transport.shutdown()
                sessions = len(self._sessions) - len(waiting)
                if sessions >= self.config.max_sessions:
                    logger.warning("genie: refusing %s: %d sessions already", t.peer, sessions)
                    t.close()
                    continue
            th = threading.Thread(target=self.serve_connection, args=(t,), daemon=True)
            with self._lock:
                self._threads.append(th)
            th.start()

    def serve_connection(self, transport: Transport) -> None:
        """Run one session on `transport` in this thread until the client leaves."""
        with self._lock:
            self._count += 1
            session = Session(self, transport, self._count)
            self._sessions[session.number] = session
        try:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            session.serve()
        finally:
            with self._lock:
                self._sessions.pop(session.number, None)

    @contextlib.contextmanager
    def device_context(self, session: Session) -> Iterator[None]:
        """Each session's GPU work goes to its own stream, so sessions overlap and a CUDA
        graph capture in one does not see the others. A reply is sent once the work is
        queued; a fetch waits for it (the copy to the host synchronizes)."""
        if session.runner.stream is not None:
            with torch.cuda.stream(session.runner.stream):
                yield
        else:
            yield

    def wait(self) -> None:
        """Block until shutdown is requested (signals are handled while waiting)."""
        while not self._stop.wait(0.2):
            pass

    def request_shutdown(self) -> None:
        self._stop.set()

    def fatal(self, reason: str) -> None:
        logger.critical("genie: %s; the server stops so that it can be restarted clean", reason)
        self.exit_code = 3
        self.request_shutdown()

    def shutdown(self, grace: float = 30.0, drain_idle: float = 0.5) -> None:
        """Stop accepting, let requests in flight finish, close each session once it has been
        idle for `drain_idle` seconds (Note: [Graceful shutdown]); after `grace`, close all."""
        self.stopping = True
        self._stop.set()
        if self._listener is not None:
            self._listener.close()
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            with self._lock:
                sessions = list(self._sessions.values())
            if not sessions:
                break
            now = time.monotonic()
            for s in sessions:
                with s.state_lock:
                    if not s.closing and not s.busy and now - s.last_active >= drain_idle:
                        s.closing = True
                        s.transport.shutdown()
            time.sleep(0.05)
        with self._lock:
            sessions = list(self._sessions.values())
            threads = list(self._threads)
        for s in sessions:
            s.closing = True
            s.transport.shutdown()
        for th in threads:
            th.join(max(0.1, deadline - time.monotonic()))
        if self._accept_thread is not None:
            self._accept_thread.join(2.0)
        if self._helper is not None:
            self._helper.shutdown(wait=False, cancel_futures=True)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            sessions = list(self._sessions.values())
        return {
            "sessions": len([s for s in sessions if s.authenticated]),
            "busy_sessions": len([s for s in sessions if s.busy]),
            "connections": len(sessions),
            "sessions_total": self._count,
            "resident_bytes": sum(_resident_bytes(s.env) for s in sessions),
            "programs_cached": len(self.programs),
            "program_cache_hits": self.programs.hits,
            "program_cache_misses": self.programs.misses,
            "instances_prepared": self.programs.prepared,
            "prepared_hits": self.prepared_hits,
            "device": str(self.device),
        }


# -- command line -------------------------------------------------------------------------
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kb": 1000,
    "kib": 1 << 10,
    "m": 1 << 20,
    "mb": 10**6,
    "mib": 1 << 20,
    "g": 1 << 30,
    "gb": 10**9,
    "gib": 1 << 30,
    "t": 1 << 40,
    "tb": 10**12,
    "tib": 1 << 40,
}


def parse_size(text: str) -> int:
    """``"8GiB"``, ``"512MB"``, ``"1048576"`` -> bytes."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 8GiB, 512MB, 1048576)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def add_serve_arguments(parser: argparse.ArgumentParser, *, log_level: bool = True) -> None:
    """The options of ``genie serve`` (without ``--log-level`` when the parent parser has it)."""
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)"
    )
    parser.add_argument("--port", type=int, default=7070, help="TCP port (0 picks a free one)")
    parser.add_argument("--device", default="cpu", help="where programs run: cpu, cuda, cuda:1 ...")
    parser.add_argument("--token-file", help="file holding the shared token clients must present")
    parser.add_argument(
        "--token", help="the token itself (visible in ps; prefer --token-file or GENIE_TOKEN)"
    )
    parser.add_argument(
        "--memory-limit",
        type=parse_size,
        default=0,
        help="most bytes one session may keep resident, e.g. 16GiB (default: no limit)",
    )
    parser.add_argument(
        "--max-message",
        type=parse_size,
        default=P.Limits.max_message,
        help="largest payload of one message (default 1GiB; clients split bigger uploads)",
    )
    parser.add_argument(
        "--no-cuda-graphs", action="store_true", help="never replay programs as CUDA graphs"
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="torch intra-op threads (default: torch's choice)"
    )
    parser.add_argument("--transport", default="tcp", help="transport to listen with (tcp)")
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=ServerConfig.idle_timeout,
        help="close sessions silent this many seconds, freeing what they hold (default 1800; "
        "0: never)",
    )
    parser.add_argument(
        "--handshake-timeout",
        type=float,
        default=ServerConfig.handshake_timeout,
        help="seconds a new connection has to present the token (default 5)",
    )
    parser.add_argument(
        "--prepare-next",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="check the likely next step of a decode loop on a helper thread while the "
        "current one runs (default: on for CUDA devices, off on cpu)",
    )
    parser.add_argument(
        "--spin-us",
        type=int,
        default=None,
        help="microseconds a session polls for its next request before it blocks (default: "
        "$GENIE_SPIN_US, else 10000 on hosts with 8 or more cores, 0 on smaller ones)",
    )
    if log_level:
        parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    parser.add_argument(
        "--port-file", help="write the port actually bound here once listening (for scripts)"
    )


def _load_token(args: argparse.Namespace) -> tuple[bytes, bool]:
    if args.token_file:
        with open(args.token_file, "rb") as f:
            token = f.read().strip()
        if not token:
            raise GenieError(f"genie: the token file {args.token_file} is empty")
        return token, False
    if args.token:
        return args.token.encode(), False
    env = os.environ.get("GENIE_TOKEN")
    if env:
        return env.encode(), False
    return secrets.token_urlsafe(24).encode(), True


def serve_main(args: argparse.Namespace) -> int:
    """Entry point of ``genie serve``; returns the process exit code."""
    level = getattr(logging, str(getattr(args, "log_level", "INFO")).upper(), logging.INFO)
    logging.getLogger("genie").setLevel(level)
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    token, generated = _load_token(args)
    config = ServerConfig(
        host=args.host,
        port=args.port,
        device=args.device,
        token=token,
        limits=P.Limits(max_message=args.max_message, memory_limit=args.memory_limit),
        cuda_graphs=not args.no_cuda_graphs,
        transport=args.transport,
        idle_timeout=args.idle_timeout or None,
        handshake_timeout=args.handshake_timeout,
        spin_us=args.spin_us,
        prepare_next=args.prepare_next,
    )
    try:
        server = Server(config)
        host, port = server.start()
    except GenieError as e:
        print(str(e), file=sys.stderr)
        return 2
    # Note: [The server's garbage collector]
    # Importing torch leaves about 170k Python objects that live as long as the process. A
    # full collection scanned them all: 50-75 ms, now and then in the middle of a step (a
    # decode step takes a few ms). Frozen once here, before any client, they are left out of
    # every later collection, which then looks only at what the server made since (a full
    # one after a GPT-2 decode: 6 ms instead of 73 on the CI-sized VM).
    gc.freeze()

    # Installed before the port is announced: a script that reads it may signal at once.
    def on_signal(signum, _frame):
        logger.info("genie: signal %d: shutting down", signum)
        server.request_shutdown()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if args.port_file:
        tmp = args.port_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(str(port))
        os.replace(tmp, args.port_file)
    print(
        f"genie serve: listening on {host}:{port}, device {server.device} ({server.device_name}), "
        f"CUDA graphs {'on' if server.cuda_graphs else 'off'}",
        file=sys.stderr,
        flush=True,
    )
    if generated:
        print(
            f"genie serve: no token given; clients must use GENIE_TOKEN={token.decode()}",
            file=sys.stderr,
            flush=True,
        )

    server.wait()
    server.shutdown()
    logger.info("genie: server stopped")
    return server.exit_code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="genie serve", description="Serve remote_accelerator programs"
    )
    add_serve_arguments(parser)
    return serve_main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
