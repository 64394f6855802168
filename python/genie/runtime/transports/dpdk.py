"""DPDK transport: control frames over TCP, tensor payloads over a DPDK data plane.

Every frame's prefix and header travel on a TCP connection (the same framing as tcp.py); a
payload of at least ``min_payload`` bytes travels on the data plane instead, flagged in the
prefix's reserved field, so each side knows where the bytes of each frame are. The data plane is
a DPDK endpoint in a helper process, ``genie-dpdk-agent`` (see Note: [Data-plane agent] in
csrc/dataplane/agent_protocol.h): one per connection and side, over a net_memif port between
two processes on one host, or any DPDK port named in the configuration (a vdev, or a PCI NIC).

The files: this one frames and moves payloads; dpdk_setup.py brings the data plane up after
authentication (Note: [Data-plane set-up]); dpdk_memory.py hands out the arena memory that
travels without a copy (Note: [Zero copy through the arena]); dpdk_agent.py starts the agent.

Note: [Rendezvous sends]
A data-plane ``send_frame`` returns once the peer has taken the payload (the receiver grants
room before any byte moves; Note: [Grants and acknowledgements] in csrc/dataplane/endpoint.h),
where TCP returns once the kernel buffered it. The request/reply protocol reads every payload
it is sent before it answers, so nothing waits on this; a peer that refuses a payload and
closes makes the sender's call fail with TransportError, as with TCP.

Real NICs: ``GENIE_DPDK_PORT=pci:0000:17:00.0`` on each side (the device bound to vfio-pci;
EAL is then allowed that device only), usually with ``GENIE_DPDK_OPTIONS="eal_no_huge=0"`` for
hugepage memory; peers learn each other's MAC address from their hello. One agent owns a NIC
port, so a second connection on the same port falls back to TCP (with a warning saying why).

In-process mode (opt-in, ``GENIE_DPDK_IN_PROCESS=1``; Note: [In-process endpoint] in
csrc/dataplane/agent_protocol.h): the endpoint runs on a thread of this process instead of in
``genie-dpdk-agent``, so it reads and writes every tensor where it is, registering user memory
on first send (``registrations_missed``) and hitting on later sends (``registrations_hit``).
It trades the agent's crash isolation for zero copy of any memory: a fault in the PMD or the
EAL then takes this process down, EAL is initialised once per process (the first connection's
options win), and a process that forked after that cannot use DPDK. Meant for a real NIC.

Configuration: ``DpdkConfig`` fields, each also read from the environment (``GENIE_DPDK_PORT``,
``GENIE_DPDK_ARENA``, ``GENIE_DPDK_HEAP``, ``GENIE_DPDK_IN_PROCESS``, ``GENIE_DPDK_SLOT``, ``GENIE_DPDK_MIN_PAYLOAD``, ``GENIE_DPDK_PEER_TIMEOUT``,
``GENIE_DPDK_CONNECT_TIMEOUT``, ``GENIE_DPDK_OPTIONS`` = extra ``key=value`` agent options
separated by spaces, e.g. ``"chunk_bytes=8000 eal_pci=0000:17:00.0"``).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence

from genie.errors import GenieError, ProtocolError, TransportError
from genie.runtime.protocol import AUTH_OK
from genie.runtime.transports.base import (
    FRAME_MAGIC,
    PREFIX,
    Frame,
    Transport,
    TransportStats,
    recv_growing,
)
from genie.runtime.transports.dpdk_agent import (
    Agent,
    DpdkConfig,
    available,
    require_dpdk,
    track_storages,
    unavailable_reason,
)
from genie.runtime.transports.dpdk_memory import ArenaPayloads
from genie.runtime.transports.dpdk_setup import _INTERNAL, _MAX_INTERNAL_HEADER, DataPlaneSetup
from genie.runtime.transports.tcp import TcpListener, _tune, parse_address

logger = logging.getLogger(__name__)

__all__ = ["DpdkConfig", "DpdkListener", "DpdkTransport", "available", "unavailable_reason"]

_DEFAULT_MAX_MESSAGE = 1 << 40
_ON_DATA_PLANE = 1  # prefix reserved-field flag: this frame's payload is on the data plane


class DpdkTransport(DataPlaneSetup, ArenaPayloads, Transport):
    name = "dpdk"

    def __init__(
        self,
        sock: socket.socket,
        peer: str,
        *,
        side: str,
        config: DpdkConfig | None = None,
        max_message: int = _DEFAULT_MAX_MESSAGE,
    ):
        _tune(sock)
        self._sock = sock
        self._peer = peer
        self._side = side  # "listener" or "connector"
        self._config = config or DpdkConfig.from_env()
        self._max_message = max_message
        self._stats = TransportStats()
        self._closed = False
        self._timeout: float | None = None
        self._agent: Agent | None = None
        # "none" (not tried), "pending" (listener: waiting for SETUP_DONE), "up", "tcp" (fallback)
        self._plane = "none"
        self._authenticated = False  # listener: AUTH_OK went out
        self._out_msg = 0
        self._in_msg = 0
        self._remaining = 0
        self._in_on_plane = False
        self._in_total = 0
        self._in_offset = 0
        # Counters of agents that are gone (Note: [Zero copy through the arena])
        self._copied_base = (0, 0)
        self._agent_registrations = (0, 0)
        self._cuda_cache = None  # RegistrationCache("cuda-host") for the heap, on first use
        self._heap_registration_error: str | None = None

    @classmethod
    def connect(
        cls, address: str | tuple[str, int], *, timeout: float | None = 10.0, **kw
    ) -> DpdkTransport:
        require_dpdk()
        host, port = parse_address(address) if isinstance(address, str) else address
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as e:
            raise TransportError(f"genie: cannot connect to {host}:{port}: {e}") from e
        sock.settimeout(None)
        return cls(sock, f"{host}:{port}", side="connector", **kw)

    # -- capabilities ---------------------------------------------------------------------

    @property
    def max_message(self) -> int:
        return self._max_message

    @property
    def peer(self) -> str:
        return self._peer

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def data_plane(self) -> str:
        """'up' when payloads travel on DPDK, 'tcp' after a fallback, else 'none'/'pending'."""
        return self._plane

    @property
    def agent_pid(self) -> int | None:
        """The process id of this side's data-plane agent, if one runs (None in process)."""
        if self._agent is None or self._agent.proc is None:
            return None
        return self._agent.proc.pid

    @property
    def in_process(self) -> bool:
        """Whether this side's endpoint runs on a thread of this process (Note: [In-process
        endpoint]) rather than in genie-dpdk-agent."""
        return self._agent is not None and self._agent.in_process

    def data_plane_stats(self) -> dict[str, int]:
        """The agent's counters (chunks, retransmits, ...); {} without a data plane."""
        if self._agent is None:
            return {}
        try:
            return dict(self._agent.client.stats(2.0))
        except GenieError:
            return {}

    def ping(self, payload: int = 64) -> float:
        """One round trip between the two agents over the data plane, in microseconds."""
        self._require_plane()
        return float(self._agent.client.ping(payload, 5.0))

    # -- errors ---------------------------------------------------------------------------
    def _fail(self, what: str, e: BaseException | None = None) -> TransportError:
        if isinstance(e, TimeoutError):
            msg = f"genie: timed out {what} {self._peer}"
        elif e is None:
            msg = f"genie: {self._peer} closed the connection while {what}"
        else:
            msg = f"genie: connection to {self._peer} failed while {what}: {e}"
        return TransportError(msg)

    def _plane_failed(self, what: str, e: GenieError) -> TransportError:
        detail = str(e).removeprefix("genie: ")
        if self._agent is not None and "data-plane agent" in detail:
            detail = self._agent.describe_exit(wait=1.0) or detail
        return TransportError(
            f"genie: the DPDK data plane to {self._peer} failed while {what}: {detail}"
        )

    def _check_open(self) -> None:
        if self._closed:
            raise TransportError(f"genie: the connection to {self._peer} is closed")

    def _require_plane(self) -> None:
        if self._plane != "up" or self._agent is None:
            raise TransportError(f"genie: no DPDK data plane to {self._peer} ({self._plane})")

    # -- TCP framing ----------------------------------------------------------------------
    def _send_tcp(self, parts: list[memoryview], what: str = "sending to") -> None:
        try:
            i = 0
            while i < len(parts):
                sent = self._sock.sendmsg(parts[i : i + 256])
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
        except OSError as e:
            raise self._fail(what, e) from e

    def _recv_tcp(self, view: memoryview, what: str) -> None:
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

    def _read_prefix(self) -> tuple[int, int, int, int, int]:
        """(version, kind, flags, header_len, payload_len)"""
        buf = bytearray(PREFIX.size)
        self._recv_tcp(memoryview(buf), "waiting for a message from")
        magic, version, kind, flags, header_len, payload_len = PREFIX.unpack(bytes(buf))
        if magic != FRAME_MAGIC:
            raise ProtocolError(f"genie: bad frame magic {magic!r} from {self._peer}")
        return version, kind, flags, header_len, payload_len

    def _read_header(self, n: int, what: str = "reading a message header from") -> bytes:
        return recv_growing(self._recv_tcp, n, what)

    # -- sending --------------------------------------------------------------------------
    def send_frame(
        self, version: int, kind: int, header: bytes, buffers: Sequence[memoryview] = ()
    ) -> int:
        self._check_open()
        views = [memoryview(b).cast("B") for b in buffers]
        views = [v for v in views if v.nbytes]
        payload = sum(v.nbytes for v in views)
        if payload > self._max_message:
            raise TransportError(
                f"genie: a {payload}-byte payload exceeds this connection's limit of "
                f"{self._max_message} bytes"
            )
        on_plane = self._plane == "up" and payload >= max(1, self._config.min_payload)
        flags = _ON_DATA_PLANE if on_plane else 0
        prefix = PREFIX.pack(FRAME_MAGIC, version, kind, flags, len(header), payload)
        parts = [memoryview(prefix), memoryview(header)]
        if not on_plane:
            parts.extend(views)
        self._send_tcp(parts)
        if on_plane:
            self._wait_plane_ready()
            self._out_msg += 1
            if self._agent.in_process:
                track_storages(views)
            try:
                self._agent.client.send(self._out_msg, views, self._timeout)
            except GenieError as e:
                raise self._plane_failed("sending to", e) from None
            if self._agent.in_process:  # user memory was registered (or hit) on the way
                self._agent_registrations = self._agent.registrations()
        total = len(prefix) + len(header) + payload
        self._stats.bytes_sent += total
        self._stats.frames_sent += 1
        if kind == AUTH_OK and self._side == "listener":
            self._authenticated = True
        return total

    # -- receiving ------------------------------------------------------------------------
    def recv_frame(self, max_header: int) -> Frame:
        self._check_open()
        if self._remaining:
            raise ProtocolError("genie: a frame was read before the previous payload was consumed")
        while True:
            version, kind, flags, header_len, payload_len = self._read_prefix()
            if kind in _INTERNAL and (self._side == "connector" or self._authenticated):
                if header_len > _MAX_INTERNAL_HEADER or payload_len:
                    raise ProtocolError(
                        f"genie: oversized data-plane set-up frame from {self._peer}"
                    )
                body = self._parse_internal(self._read_header(header_len))
                self._on_internal(kind, body)
                continue
            if header_len > max_header:
                raise ProtocolError(
                    f"genie: a {header_len}-byte header from {self._peer} exceeds the limit of "
                    f"{max_header} bytes"
                )
            header = self._read_header(header_len)
            self._remaining = payload_len
            self._in_on_plane = bool(flags & _ON_DATA_PLANE) and payload_len > 0
            if self._in_on_plane:
                if self._plane not in ("up", "pending") or self._agent is None:
                    raise ProtocolError(
                        f"genie: {self._peer} sent a payload on a data plane that is not up"
                    )
                self._in_msg += 1
                self._in_total = payload_len
                self._in_offset = 0
            self._stats.frames_received += 1
            frame = Frame(version=version, kind=kind, header=header, payload_len=payload_len)
            if kind == AUTH_OK and self._side == "connector" and self._plane == "none":
                self._setup_as_connector()
            return frame

    def recv_payload(self, buffers: Sequence[memoryview]) -> None:
        self._check_open()
        views = [memoryview(b).cast("B") for b in buffers]
        total = sum(v.nbytes for v in views)
        if total > self._remaining:
            raise ProtocolError(
                f"genie: {total} payload bytes expected but the frame carries {self._remaining}"
            )
        if self._in_on_plane:
            views = [v for v in views if v.nbytes]
            if views:
                self._plane_recv(views, total)
        else:
            for v in views:
                if v.nbytes:
                    self._recv_tcp(v, "reading a payload from")
        self._remaining -= total

    def _plane_recv(self, views: list[memoryview] | None, nbytes: int) -> None:
        self._wait_plane_ready()
        try:
            if views is None:
                self._agent.client.skip(
                    self._in_msg, self._in_total, self._in_offset, nbytes, self._timeout
                )
            else:
                self._agent.client.recv(
                    self._in_msg, self._in_total, self._in_offset, views, self._timeout
                )
        except GenieError as e:
            raise self._plane_failed("reading a payload from", e) from None
        self._in_offset += nbytes
        self._stats.bytes_received += nbytes

    def _wait_plane_ready(self) -> None:
        # The listener's agent meets the client's in the background; the first transfer waits.
        if self._agent is not None and not self._agent.ready:
            try:
                self._agent.wait("ready", self._config.connect_timeout)
            except GenieError as e:
                raise self._plane_failed("opening the data plane to", e) from None
            self._agent.ready = True
            self._agent_registrations = self._agent.registrations()

    def skip_payload(self, nbytes: int) -> None:
        self._check_open()
        nbytes = min(nbytes, self._remaining)
        if not nbytes:
            return
        if self._in_on_plane:
            self._plane_recv(None, nbytes)
        else:
            scratch = memoryview(bytearray(min(nbytes, 1 << 20)))
            left = nbytes
            while left:
                k = min(left, scratch.nbytes)
                self._recv_tcp(scratch[:k], "reading a payload from")
                left -= k
        self._remaining -= nbytes

    @property
    def payload_remaining(self) -> int:
        return self._remaining

    # -- lifecycle ------------------------------------------------------------------------
    def set_timeout(self, seconds: float | None) -> None:
        if not self._closed:
            self._timeout = seconds
            self._sock.settimeout(seconds)

    def shutdown(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close_data_plane(self) -> None:
        """This side's endpoint stops while the peer's is still up: a memif endpoint whose
        peer's memory vanishes under it can fault (FIELD-NOTES), which in process would take
        this process down. Frames after this go on TCP."""
        if self._agent is not None:
            self._drop_agent()
        if self._plane in ("up", "pending"):
            self._plane = "tcp"

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.close_data_plane()  # before the socket: the peer ends its side only after ours
        try:
            self._sock.close()
        except OSError:
            pass


class DpdkListener(TcpListener):
    """A TCP listener whose accepted connections bring up the data plane."""

    name = "dpdk"

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        backlog: int = 64,
        max_message: int = _DEFAULT_MAX_MESSAGE,
        config: DpdkConfig | None = None,
    ):
        require_dpdk()
        self._config = config or DpdkConfig.from_env()
        super().__init__(host, port, backlog=backlog, max_message=max_message)

    def _transport(self, sock: socket.socket, peer: str) -> DpdkTransport:
        return DpdkTransport(
            sock, peer, side="listener", config=self._config, max_message=self._max_message
        )
