"""One client's session on a genie server: a dispatcher of typed requests (runtime/requests.py;
Note: [Wire format] in genie/runtime/protocol.py) over the session's resident storages.

A bad request gets an error reply and the session goes on; a request that breaks framing
closes this connection only. Program lookup is the resolver's (resolver.py), speculative runs
are the slot's (speculation.py).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any

import torch

from genie.errors import ExecutionError, GenieError, ProtocolError, RemoteError, TransportError
from genie.runtime import protocol as P
from genie.runtime import requests as R
from genie.runtime.program import check_binding, execute
from genie.runtime.program.graphs import GraphRunner
from genie.runtime.replay import Environment, byte_view, host_bytes
from genie.runtime.server.peers import PeerError, PeerGroups
from genie.runtime.server.resolver import ProgramResolver, UnknownProgram
from genie.runtime.server.speculation import SpeculationSlot
from genie.runtime.transports import Transport, default_spin_us
from genie.runtime.transports.base import Frame

if TYPE_CHECKING:
    from genie.runtime.server.server import Server

logger = logging.getLogger(__name__)

__all__ = ["Session", "resident_bytes"]


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
        self.resolver = ProgramResolver(server.programs, self.limits, server.preparer)
        self.spec = SpeculationSlot(self)  # Note: [Speculative runs]
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
            R.Hello: self._hello,
            R.Upload: self._upload,
            R.Run: self._run,
            R.Eager: self._run,
            R.Fetch: self._fetch,
            R.Release: self._release,
            R.Stats: self._stats,
            R.Spec: self.spec.start,
            R.Bye: self._bye,
            R.PeerOpen: self._peer_open,
            R.PeerSend: self._peer_send,
            R.PeerRecv: self._peer_recv,
            R.PeerClose: self._peer_close,
        }
        self._peers: PeerGroups | None = None  # Note: [Server-to-server moves]

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
            self.server.enter_stream(self)
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
                    self.time(self._kind, elapsed)
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
        self.spec.pending = None  # its temporaries and snapshots go with the storages
        self.env.storages.clear()
        self.pending.clear()
        self.runner.clear()
        if self._peers is not None:
            self._peers.close()
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
                spec = self.spec.take()
                try:
                    raw = P.get_map(P.unpack(frame.header, self.limits), "request")
                    request = R.parse_request(raw, self.limits)
                    pre = R.parse_pre(raw["pre"], self.limits) if "pre" in raw else None
                except Exception:
                    if spec is not None:
                        self.spec.abort(spec)
                    raise
                # Resolve a pending speculation before "pre" (Note: [Speculative runs]).
                hit = spec is not None and self.spec.resolve(spec, request, pre, frame)
                self._kind = "commit" if hit else request.kind
                if not request.payload:
                    P.need(frame.payload_len == 0, "this request carries no payload")
                self._apply_pre(pre or [])
                if hit:
                    reply, buffers = {"ok": True, "spec": "hit"}, []
                else:
                    reply, buffers = self._handlers[type(request)](request, frame)
                if isinstance(request, R.Run) and request.fetch:
                    buffers = self._answer_fetches(request.fetch, reply)
                close = isinstance(request, R.Bye)
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
        elif isinstance(e, UnknownProgram):
            kind = "unknown_program"
        elif isinstance(e, PeerError):
            kind = "peer"
        elif isinstance(e, (MemoryError, torch.OutOfMemoryError)):
            kind = "oom"
        elif isinstance(e, GenieError):
            kind = "remote"
        else:
            kind = "internal"
            logger.exception("genie: session %d: internal error", self.number)
        if kind != "unknown_program":
            logger.info("genie: session %d: %s error: %s", self.number, kind, msg[:300])
        self.after_failure(msg, kind == "oom")
        return P.error_reply(kind, msg)

    def after_failure(self, msg: str, oom: bool) -> None:
        """What a failed request means for the device: a corrupted CUDA context stops the
        server; an out-of-memory error returns the cached blocks."""
        if "device-side assert" in msg or "illegal memory access" in msg:
            self.server.fatal(f"the CUDA context is corrupted ({msg[:200]})")
        if self.server.device.type == "cuda" and ("out of memory" in msg or oom):
            torch.cuda.empty_cache()

    def _apply_pre(self, pre: list) -> None:
        for op in pre:
            if isinstance(op, list):  # storage ids to release
                self.env.release(op)
            else:
                pid, meta = op
                value = self.pending.pop(pid, None)
                P.need(value is not None, f"no pending result {pid} to bind")
                self.env.bind(meta, value)

    # -- requests -------------------------------------------------------------------------
    def _hello(self, req: R.Hello, frame: Frame) -> tuple[dict, list]:
        dev = self.server.device
        return {
            "ok": True,
            "device": str(dev),
            "device_type": dev.type,
            "device_name": self.server.device_name,
            "device_memory": self.server.device_memory,
            "device_cores": os.cpu_count() or 1,
            "protocol": P.PROTOCOL_VERSION,
            "cuda_graphs": self.runner.enabled,
            "session": self.number,
            "server": _version(),
            **self.limits.as_dict(),
        }, []

    def check_uploads(self, pieces: list[R.Piece], frame: Frame) -> list[R.Piece]:
        """`pieces`, once each continues a storage that is resident (or started in this
        request), the frame carries their bytes, and the session's limit holds them."""
        started: dict[int, int] = {}
        total = 0
        for sid, nbytes, _, n, new in pieces:
            if new:
                started[sid] = nbytes
            else:  # a later piece of a storage this request or an earlier one started
                st = self.env.storages.get(sid)
                size = started.get(sid, st.nbytes() if st is not None else -1)
                P.need(size == nbytes, f"upload continues storage {sid}, which is not resident")
            total += n
        P.need(
            total == frame.payload_len,
            f"uploads announce {total} bytes, the frame carries {frame.payload_len}",
        )
        self.check_memory(sum(p.nbytes for p in pieces if p.new))
        return pieces

    def check_memory(self, extra: int) -> None:
        limit = self.limits.memory_limit
        if limit and self.env.nbytes() + extra > limit:
            raise RemoteError(
                f"genie: this session would hold {self.env.nbytes() + extra} bytes, over the server's "
                f"limit of {limit} bytes per session (genie serve --memory-limit)"
            )

    def _receive_uploads(self, entries: list[R.Piece]) -> None:
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

    def _upload(self, req: R.Upload, frame: Frame) -> tuple[dict, list]:
        self._receive_uploads(self.check_uploads(req.pieces, frame))
        return {"ok": True}, []

    def _run(self, req: R.Run, frame: Frame) -> tuple[dict, list]:
        eager = isinstance(req, R.Eager)
        uploads = self.check_uploads(req.pieces, frame)
        program = self.resolver.resolve(req.program)
        if program is None:
            raise UnknownProgram("genie: unknown program; send it again with its body")
        P.need(not eager or len(program.steps) == 1, "an eager request runs exactly one node")
        P.need(not eager or not req.fetch, "an eager request answers its results, not fetches")
        # Everything is checked before the payload is read; what follows changes state.
        incoming = {sid: nbytes for sid, nbytes, *_ in uploads}
        states = check_binding(program, req.bind, req.rng, self.env, incoming)
        self.check_memory(program.fresh_bytes + sum(e[1] for e in uploads if e[4]))
        self._receive_uploads(uploads)
        binding = req.bind
        storages = self.env.storages
        # What the run creates, released again if it ends over the memory limit (no limit:
        # nothing to work out on every run).
        created = []
        if self.limits.memory_limit:
            created = [binding[k] for k in program.produced if binding[k] not in storages]
        if eager:
            self.pending.clear()
            results = execute(program, binding, states, self.env, keep_last=True)
            reply = {"ok": True, "res": [self._describe(r) for r in results]}
        else:
            self.runner.run(program, binding, states, self.env)
            reply = {"ok": True}
        if self.over_limit():
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

    def over_limit(self) -> bool:
        limit = self.limits.memory_limit
        return bool(limit) and self._held_bytes() > limit

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

    def _fetch(self, req: R.Fetch, frame: Frame) -> tuple[dict, list]:
        value = self._value(req.ref)
        return {"ok": True, "n": value.numel() * value.element_size()}, host_bytes([value])

    def _value(self, meta: P.TensorMeta) -> torch.Tensor:
        """The view `meta` names, dense, where its storage lives."""
        st = self.env.storages.get(meta.storage)
        if st is None:
            raise RemoteError(f"genie: storage {meta.storage} is not resident in this session")
        need = P.extent(meta.shape, meta.stride, meta.offset, P.itemsize(meta.dtype))
        P.need(need <= st.nbytes(), f"the view reads {need} bytes of a {st.nbytes()}-byte storage")
        return self.env.view(meta).contiguous()

    # Note: [Outputs in the run's reply]
    # A run that names views in its ``fetch`` is answered with their bytes: the reply's payload
    # is each view's dense bytes, one after another, and its "n" their sizes, -1 for a view
    # that could not be read (a storage the run left unbound: Note: [Binding a result on a
    # server] in program/run.py). The run has happened either way, so a view that cannot be
    # read does not turn the reply into an error. One request then costs the server one
    # dispatch, and on a GPU one wait for all the copies to the host, where a fetch behind the
    # run (Note: [Run then fetch] in remote/client.py) cost one of each per output.
    def _answer_fetches(self, refs: list[P.TensorMeta], reply: dict) -> list[memoryview]:
        values, sizes = [], []
        for meta in refs:
            try:
                v = self._value(meta)
            except (RemoteError, ProtocolError) as e:
                logger.debug("genie: session %d: a fetch with the run: %s", self.number, e)
                sizes.append(-1)
                continue
            values.append(v)
            sizes.append(v.numel() * v.element_size())
        reply["n"] = sizes
        return host_bytes(values)

    def _release(self, req: R.Release, frame: Frame) -> tuple[dict, list]:
        self.env.release(req.ids)
        return {"ok": True}, []

    def _stats(self, req: R.Stats, frame: Frame) -> tuple[dict, list]:
        return {"ok": True, "session": self.stats(), "server": self.server.stats()}, []

    def _bye(self, req: R.Bye, frame: Frame) -> tuple[dict, list]:
        return {"ok": True}, []

    # -- server-to-server moves (Note: [Server-to-server moves] in peers.py) ----------------
    def _peer_open(self, req: R.PeerOpen, frame: Frame) -> tuple[dict, list]:
        if self._peers is None:
            config = self.server.config
            self._peers = PeerGroups(
                config.host, config.token, self.server.device, config.peer_timeout
            )
        return {"ok": True, **self._peers.open(req.group, req.role, req.peer, req.backend)}, []

    def _peer_send(self, req: R.PeerSend, frame: Frame) -> tuple[dict, list]:
        st = self.env.storages.get(req.id)
        if st is None:
            raise RemoteError(f"genie: storage {req.id} is not resident in this session")
        P.need(self._peers is not None, "no peer group is open in this session")
        self._peers.send(req.group, byte_view(st), req.tag)
        return {"ok": True, "n": st.nbytes()}, []

    def _peer_recv(self, req: R.PeerRecv, frame: Frame) -> tuple[dict, list]:
        P.need(self._peers is not None, "no peer group is open in this session")
        self.check_memory(req.nbytes)
        self.env.storages[req.id] = self._peers.recv(
            req.group, req.nbytes, req.tag
        ).untyped_storage()
        return {"ok": True}, []

    def _peer_close(self, req: R.PeerClose, frame: Frame) -> tuple[dict, list]:
        if self._peers is not None:
            self._peers.close(req.group)
        return {"ok": True}, []

    def time(self, what: str, seconds: float) -> None:
        t = self.timings.get(what)
        if t is None:
            t = self.timings[what] = [0, 0.0]
        t[0] += 1
        t[1] += seconds

    def stats(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "resident_count": len(self.env.storages),
            "resident_bytes": resident_bytes(self.env),
            "pending": len(self.pending),
            "requests": self.requests,
            "errors": self.errors,
            "busy_seconds": self.busy_seconds,
            **self.spec.stats(),
            "timings_ms": {k: [n, round(t * 1e3, 3)] for k, (n, t) in self.timings.items()},
            **self.transport.stats.as_dict(),
            **self.runner.stats(),
        }


def resident_bytes(env: Environment) -> int:
    # Another session's thread may be changing its storages: copy them in one step first.
    return sum(st.nbytes() for st in list(env.storages.values()))


def _version() -> str:
    try:
        import genie

        return getattr(genie, "__version__", "unknown")
    except ImportError:
        return "unknown"
