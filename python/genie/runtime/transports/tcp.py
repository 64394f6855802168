"""TCP transport: length-prefixed frames over one stream socket.

Payload buffers are handed to ``sendmsg`` as they are (no concatenation) and received with
``recv_into`` straight into the buffers the protocol layer preallocated, so the only copies are
the kernel's. TCP is always available; it is not zero-copy in the DPDK sense.
"""

from __future__ import annotations

import collections
import logging
import socket
from collections.abc import Sequence

from genie import _C
from genie.errors import ProtocolError, TransportError
from genie.runtime.transports.base import (
    FRAME_MAGIC,
    PREFIX,
    Frame,
    Listener,
    Transport,
    TransportStats,
    pack_prefix,
    recv_growing,
    unpack_prefix,
)

logger = logging.getLogger(__name__)

__all__ = ["TcpListener", "TcpTransport", "parse_address"]

_IOV_BATCH = 256  # well under IOV_MAX (1024 on Linux)
_SOCKET_BUFFER = 4 << 20
_DEFAULT_MAX_MESSAGE = 1 << 40


def parse_address(address: str, default_port: int = 7070) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6) -> (host, port)."""
    address = address.strip()
    if address.startswith("tcp://"):
        address = address[len("tcp://") :]
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        port = rest.lstrip(":")
    elif address.count(":") == 1:
        host, port = address.split(":")
    else:
        host, port = address, ""
    if not host:
        raise ValueError(f"genie: no host in server address {address!r} (expected host:port)")
    try:
        return host, int(port) if port else default_port
    except ValueError:
        raise ValueError(
            f"genie: bad port in server address {address!r} (expected host:port)"
        ) from None


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    # A peer whose host vanished (no FIN, no RST) is noticed within about a minute, even by
    # a side blocked in recv for a long request.
    for name, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, _SOCKET_BUFFER)
        except OSError:  # capped by the kernel; the default is fine
            pass


class TcpTransport(Transport):
    name = "tcp"
    staged_piece = 1 << 20  # a stream reads in any parts (Note: [Staged device uploads])
    background_sends = True  # send_frame(background=True): Note: [Background sends]

    def __init__(self, sock: socket.socket, peer: str, *, max_message: int = _DEFAULT_MAX_MESSAGE):
        _tune(sock)
        self._sock = sock
        self._peer = peer
        self._max_message = max_message
        self._stats = TransportStats()
        self._remaining = 0  # payload bytes of the current frame not yet received
        self._closed = False
        self._prefix_buf = bytearray(PREFIX.size)
        # Note: [Background sends] (csrc/bindings/socket_writer.cpp): made on the first
        # background send; `_held` keeps each queued frame's buffers until it is written.
        self._writer: _C.SocketWriter | None = None
        self._held: collections.deque[tuple[int, list[memoryview]]] = collections.deque()

    @classmethod
    def connect(
        cls, address: str | tuple[str, int], *, timeout: float | None = 10.0, **kw
    ) -> TcpTransport:
        host, port = parse_address(address) if isinstance(address, str) else address
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as e:
            raise TransportError(f"genie: cannot connect to {host}:{port}: {e}") from e
        return cls(sock, f"{host}:{port}", **kw)

    # -- capabilities ---------------------------------------------------------------------
    @property
    def zero_copy(self) -> bool:
        return False

    @property
    def max_message(self) -> int:
        return self._max_message

    @property
    def peer(self) -> str:
        return self._peer

    @property
    def stats(self) -> TransportStats:
        return self._stats

    @property
    def closed(self) -> bool:
        return self._closed

    # -- errors ---------------------------------------------------------------------------
    def _fail(self, what: str, e: BaseException | None = None) -> TransportError:
        if isinstance(e, TimeoutError):
            msg = f"genie: timed out {what} {self._peer}"
        elif e is None:
            msg = f"genie: {self._peer} closed the connection while {what}"
        else:
            msg = f"genie: connection to {self._peer} failed while {what}: {e}"
        if self._writer is not None and self._writer.error() and not what.startswith("sending"):
            msg += f" (sending a queued frame had failed: {self._writer.error()})"
        return TransportError(msg)

    def _check_open(self) -> None:
        if self._closed:
            raise TransportError(f"genie: the connection to {self._peer} is closed")

    # -- sending --------------------------------------------------------------------------
    def send_frame(
        self,
        version: int,
        kind: int,
        header: bytes,
        buffers: Sequence[memoryview] = (),
        *,
        background: bool = False,
    ) -> int:
        """With `background`, the frame is queued for a native writer thread and the call
        returns at once: `buffers` must stay unchanged until it is written (Note: [Background
        sends]). Frames go out in the order of the calls either way; a frame sent without
        `background` behind queued ones is queued too, and its call returns once it is written
        (at once when it has no payload)."""
        return self._send([(version, kind, header, buffers)], background)

    def send_frames(self, frames: Sequence[tuple[int, int, bytes, Sequence[memoryview]]]) -> int:
        """One sendmsg for all of `frames` (behind queued background frames: each queued)."""
        return self._send(frames, False)

    def _send(self, frames: Sequence[tuple], background: bool) -> int:
        self._check_open()
        built = [self._frame(*f) for f in frames]
        total = sum(len(head) + sum(v.nbytes for v in views) for head, views in built)
        if background or self._writing():
            for head, views in built:
                job = self._queue(head, views)
                if views and not background:
                    self._wait_written(job)
        else:
            self._send_now([p for head, views in built for p in (memoryview(head), *views)])
        self._stats.bytes_sent += total
        self._stats.frames_sent += len(built)
        return total

    def _frame(
        self, version: int, kind: int, header: bytes, buffers: Sequence[memoryview]
    ) -> tuple[bytes, list[memoryview]]:
        """A frame's prefix and header, and its non-empty payload buffers."""
        views = [memoryview(b).cast("B") for b in buffers]
        views = [v for v in views if v.nbytes]
        payload = sum(v.nbytes for v in views)
        if payload > self._max_message:
            raise TransportError(
                f"genie: a {payload}-byte payload exceeds this connection's limit of "
                f"{self._max_message} bytes"
            )
        return pack_prefix(version, kind, len(header), payload) + bytes(header), views

    def _send_now(self, parts: list[memoryview]) -> None:
        try:
            self._sendmsg_all(parts)
        except OSError as e:
            raise self._fail("sending to", e) from e

    # Note: [Background sends] in csrc/bindings/socket_writer.cpp.
    def _writing(self) -> bool:
        """Whether frames queued for the writer are still unwritten (a failed one raises)."""
        w = self._writer
        if w is None:
            return False
        done = w.done()
        while self._held and self._held[0][0] <= done:
            self._held.popleft()
        if w.error():
            raise self._fail("sending a queued frame", OSError(w.error()))
        return done < w.submitted()

    def _queue(self, head: bytes, views: list[memoryview]) -> int:
        if self._writer is None:
            self._writer = _C.SocketWriter(self._sock.fileno())
        timeout = self._sock.gettimeout()
        job = self._writer.submit(head, views, -1 if timeout is None else int(timeout * 1000))
        if views:
            self._held.append((job, views))
        return job

    def _wait_written(self, job: int) -> None:
        """Wait until frame `job` is written (the GIL released)."""
        w = self._writer
        while not w.wait(job, 100):
            pass
        if w.done() < job:
            raise self._fail(
                "sending a queued frame", OSError(w.error() or "the connection was closed")
            )
        self._writing()  # lets the buffers written so far go

    def flush_sends(self) -> None:
        """Wait until every queued frame is written."""
        if self._writer is not None and self._writing():
            self._wait_written(self._writer.submitted())

    def _sendmsg_all(self, parts: list[memoryview]) -> None:
        i = 0
        while i < len(parts):
            batch = parts[i : i + _IOV_BATCH]
            sent = self._sock.sendmsg(batch)
            # Advance past what went out; a partial send leaves a tail of one buffer.
            while sent > 0:
                n = parts[i].nbytes
                if sent >= n:
                    sent -= n
                    i += 1
                else:
                    parts[i] = parts[i][sent:]
                    sent = 0
            while i < len(parts) and parts[i].nbytes == 0:
                i += 1

    # -- receiving ------------------------------------------------------------------------
    def _recv_into(self, view: memoryview, what: str) -> None:
        got, n = 0, view.nbytes
        while got < n:
            try:
                k = self._sock.recv_into(view[got:], n - got)
            except OSError as e:
                raise self._fail(what, e) from e
            if k == 0:
                raise self._fail(what)
            got += k
        self._stats.bytes_received += n

    def recv_frame(self, max_header: int) -> Frame:
        self._check_open()
        if self._remaining:
            raise ProtocolError("genie: a frame was read before the previous payload was consumed")
        buf = memoryview(self._prefix_buf)
        if self.spin_us:
            _C._spin_until_readable(self._sock.fileno(), self.spin_us)
        self._recv_into(buf, "waiting for a message from")
        magic, version, kind, header_len, payload_len = unpack_prefix(bytes(buf))
        if magic != FRAME_MAGIC:
            raise ProtocolError(f"genie: bad frame magic {magic!r} from {self._peer}")
        if header_len > max_header:
            raise ProtocolError(
                f"genie: a {header_len}-byte header from {self._peer} exceeds the limit of {max_header} bytes"
            )
        header = recv_growing(self._recv_into, header_len, "reading a message header from")
        self._remaining = payload_len
        self._stats.frames_received += 1
        return Frame(version=version, kind=kind, header=header, payload_len=payload_len)

    def recv_payload(self, buffers: Sequence[memoryview]) -> None:
        self._check_open()
        views = [memoryview(b).cast("B") for b in buffers]
        total = sum(v.nbytes for v in views)
        if total > self._remaining:
            raise ProtocolError(
                f"genie: {total} payload bytes expected but the frame carries {self._remaining}"
            )
        for v in views:
            if v.nbytes:
                self._recv_into(v, "reading a payload from")
        self._remaining -= total

    def skip_payload(self, nbytes: int) -> None:
        self._check_open()
        nbytes = min(nbytes, self._remaining)
        scratch = memoryview(bytearray(min(nbytes, 1 << 20) or 1))
        left = nbytes
        while left:
            k = min(left, scratch.nbytes)
            self._recv_into(scratch[:k], "reading a payload from")
            left -= k
        self._remaining -= nbytes

    @property
    def payload_remaining(self) -> int:
        return self._remaining

    # -- lifecycle ------------------------------------------------------------------------
    def set_timeout(self, seconds: float | None) -> None:
        if not self._closed:
            self._sock.settimeout(seconds)

    def shutdown(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._writer is not None:
            if self._writer.done() < self._writer.submitted():
                self.shutdown()  # a writer blocked on a peer that stopped reading wakes up
            self._writer.close()  # before the descriptor can be reused
            self._held.clear()
        try:
            self._sock.close()
        except OSError:
            pass


class TcpListener(Listener):
    name = "tcp"

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        backlog: int = 64,
        max_message: int = _DEFAULT_MAX_MESSAGE,
    ):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._sock.bind((host, port))
        except OSError as e:
            self._sock.close()
            raise TransportError(f"genie: cannot listen on {host}:{port}: {e}") from e
        self._sock.listen(backlog)
        self._max_message = max_message
        self._closed = False

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._sock.getsockname()[:2]
        return host, port

    def accept(self, timeout: float | None = None) -> TcpTransport | None:
        if self._closed:
            return None
        self._sock.settimeout(timeout)
        try:
            sock, addr = self._sock.accept()
        except TimeoutError:
            return None
        except OSError:
            if self._closed:
                return None
            raise
        sock.settimeout(None)
        return self._transport(sock, f"{addr[0]}:{addr[1]}")

    def _transport(self, sock: socket.socket, peer: str) -> TcpTransport:
        """The transport for an accepted connection (subclasses add their data plane)."""
        return TcpTransport(sock, peer, max_message=self._max_message)

    def close(self) -> None:
        self._closed = True
        try:
            self._sock.close()
        except OSError:
            pass
