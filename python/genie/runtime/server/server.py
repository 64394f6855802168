"""The genie server: accepts connections and runs one Session per client, all sharing one
cache of validated programs and one device."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from genie.errors import GenieError
from genie.runtime import protocol as P
from genie.runtime.program import ProgramCache
from genie.runtime.server.resolver import Preparer
from genie.runtime.server.session import Session, resident_bytes
from genie.runtime.transports import Listener, Transport, listen

logger = logging.getLogger(__name__)

__all__ = ["Server", "ServerConfig"]


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
    # seconds a server-to-server group may take to form or a move to finish
    # (Note: [Server-to-server moves])
    peer_timeout: float = 30.0


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
            self.device_memory = int(torch.cuda.get_device_properties(self.device).total_memory)
        elif self.device.type == "cpu":
            self.device_name = "cpu"
            self.device_memory = _host_memory()
        else:
            raise GenieError(f"genie: a server runs on cpu or cuda, not {config.device}")
        self.programs = ProgramCache()
        prepare = config.prepare_next  # Note: [Preparing the next instance]
        self.preparer = Preparer(
            self.programs,
            config.limits,
            self.device,
            enabled=prepare if prepare is not None else self.device.type == "cuda",
        )
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
        queued; a fetch waits for it (the copy to the host synchronizes). A session's own
        thread made the stream its current one when it started (``enter_stream``): nothing
        to switch per request (switching cost tens of microseconds a request)."""
        stream = session.runner.stream
        if stream is None or getattr(_thread_stream, "stream", None) is stream:
            yield
            return
        with torch.cuda.stream(stream):
            yield

    @staticmethod
    def enter_stream(session: Session) -> None:
        """Make `session`'s stream the calling thread's current one (a session's own thread,
        which serves it alone: the current stream is per thread)."""
        stream = session.runner.stream
        if stream is not None:
            torch.cuda.set_stream(stream)
            _thread_stream.stream = stream

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
        self.preparer.shutdown()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            sessions = list(self._sessions.values())
        return {
            "sessions": len([s for s in sessions if s.authenticated]),
            "busy_sessions": len([s for s in sessions if s.busy]),
            "connections": len(sessions),
            "sessions_total": self._count,
            "resident_bytes": sum(resident_bytes(s.env) for s in sessions),
            "programs_cached": len(self.programs),
            "program_cache_hits": self.programs.hits,
            "program_cache_misses": self.programs.misses,
            "instances_prepared": self.programs.prepared,
            "prepared_hits": self.preparer.hits,
            "device": str(self.device),
        }


_thread_stream = threading.local()  # the session stream a session's thread made current


def _host_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0
