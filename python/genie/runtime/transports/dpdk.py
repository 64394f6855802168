"""DPDK transport: control frames over TCP, tensor payloads over a DPDK data plane.

Every frame's prefix and header travel on a TCP connection (the same framing as tcp.py); a
payload of at least ``min_payload`` bytes travels on the data plane instead, flagged in the
prefix's reserved field, so each side knows where the bytes of each frame are. The data plane is
a DPDK endpoint in a helper process, ``genie-dpdk-agent`` (see Note: [Data-plane agent] in
csrc/dataplane/agent_protocol.h): one per connection and side, over a net_memif port between
two processes on one host, or any DPDK port named in the configuration (a vdev, or a PCI NIC).

Note: [Data-plane set-up]
The data plane opens once the client is authenticated, inside the client's ``recv_frame`` that
reads AUTH_OK, with three internal frames the protocol layer never sees:
  client -> SETUP      {"host": host id, "port": port kind}
  server -> SETUP_OK   {"ok", "error", "socket", "host"}   (its agent is up, its port listens)
  client -> SETUP_DONE {"ok", "error"}                     (its agent met the server's)
Only an authenticated peer can make a server start an agent (SETUP before AUTH_OK is handed to
the protocol layer, which refuses it). When either side cannot bring its agent up, or memif
would need two hosts, both sides log why and carry payloads over TCP: TCP is the fallback.
Once the data plane is up, a failure on it (a dead peer, a dead agent) is a TransportError, as
a broken TCP connection is.

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

Note: [Zero copy through the arena]
The agent can only touch memory it maps: the arena, a memfd both processes map (Note: [Arena
heap] in csrc/dataplane/arena.h). Its heap is handed out as torch storages: ``host_buffer``
(fetched results on the client, ``pin_memory()``-style buffers) and ``payload_storage`` (uploads
on a CPU server) give arena memory for payloads of at least ``min_payload`` bytes, so a payload
received into them is written there by the agent and stays there as the tensor's storage, and
one sent from them is read by the agent in place. Any other memory takes one pipelined copy
through the arena's slots, and ``stats.bytes_copied_sending`` / ``bytes_copied_receiving`` say
how many bytes did. A storage keeps its block (and the mapping) alive after the connection
closes; when the heap is full, memory comes from torch and is copied. On a CUDA server an upload
lands in the heap and goes to the GPU from there, the heap registered with CUDA once through
the registration cache (``registrations_hit`` / ``registrations_missed``).

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

import json
import logging
import os
import secrets
import socket
from collections.abc import Sequence

from genie import _C
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
    host_id,
    require_dpdk,
    track_storages,
    unavailable_reason,
)
from genie.runtime.transports.tcp import TcpListener, _tune, parse_address

logger = logging.getLogger(__name__)

__all__ = ["DpdkConfig", "DpdkListener", "DpdkTransport", "available", "unavailable_reason"]

_DEFAULT_MAX_MESSAGE = 1 << 40
_ON_DATA_PLANE = 1  # prefix reserved-field flag: this frame's payload is on the data plane
# Internal frame kinds (Note: [Data-plane set-up]); never returned by recv_frame.
_SETUP, _SETUP_OK, _SETUP_DONE = 0xD0, 0xD1, 0xD2
_INTERNAL = (_SETUP, _SETUP_OK, _SETUP_DONE)
_MAX_INTERNAL_HEADER = 4096


class DpdkTransport(Transport):
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
    def zero_copy(self) -> bool:
        # Buffers from host_buffer / payload_storage travel in place; other memory takes one
        # pipelined copy per side (Note: [Zero copy through the arena]).
        return self._plane == "up" and self._heap_room() > 0

    @property
    def max_message(self) -> int:
        return self._max_message

    @property
    def peer(self) -> str:
        return self._peer

    @property
    def stats(self) -> TransportStats:
        st = self._stats
        out, into = self._copied_base
        if self._agent is not None:
            c = self._agent.client.counters()
            out += int(c["copied_out"])
            into += int(c["copied_in"])
        st.bytes_copied_sending, st.bytes_copied_receiving = out, into
        hits, misses = self._agent_registrations
        if self._cuda_cache is not None:
            cs = self._cuda_cache.stats()
            hits, misses = hits + int(cs["hits"]), misses + int(cs["misses"])
        st.registrations_hit, st.registrations_missed = hits, misses
        return st

    def arena_stats(self) -> dict[str, int]:
        """This side's arena: bytes copied and moved in place, the heap's size and use; {}
        without a data plane."""
        return dict(self._agent.client.counters()) if self._agent is not None else {}

    # -- payload memory (Note: [Payload memory] in base.py) --------------------------------
    def _heap_room(self) -> int:
        return int(self._agent.client.heap_bytes) if self._agent is not None else 0

    def _arena_tensor(self, nbytes: int):
        """A heap block of `nbytes` as a uint8 tensor, or None where the data plane would not
        carry it or the heap has no room."""
        if (
            self._plane not in ("up", "pending")
            or self._agent is None
            or nbytes < max(1, self._config.min_payload)
        ):
            return None
        return self._agent.client.alloc(nbytes)

    def host_buffer(self, nbytes: int):
        t = self._arena_tensor(nbytes)
        return t if t is not None else super().host_buffer(nbytes)

    def host_tensor(self, shape, dtype):
        """``torch.empty(shape, dtype=dtype)`` in this connection's arena where it fits: the
        ``pin_memory()`` of the DPDK path, a tensor that is uploaded without a copy."""
        import torch

        numel = 1
        for s in shape:
            numel *= int(s)
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        return self.host_buffer(nbytes).view(dtype).reshape(tuple(shape))

    def payload_storage(self, nbytes: int, device, *, zeroed: bool = False):
        import torch

        if torch.device(device).type == "cpu":
            t = self._arena_tensor(nbytes)
            if t is not None:
                if zeroed:
                    t.zero_()
                return t.untyped_storage()
        return super().payload_storage(nbytes, device, zeroed=zeroed)

    def recv_payload_into(self, dst) -> None:
        if dst.device.type == "cpu":
            self.recv_payload([memoryview(dst.numpy())])
            return
        staging = self._arena_tensor(dst.numel())
        if staging is None:
            super().recv_payload_into(dst)
            return
        self.recv_payload([memoryview(staging.numpy())])  # in place, into the heap
        self._register_heap_for_devices()
        # Synchronous: the block goes back to the heap when `staging` dies, right after.
        dst.copy_(staging)

    #: the registration cache backend that pins the heap for copies to a device
    heap_registration_backend = "cuda-host"

    def _register_heap_for_devices(self) -> None:
        """The heap is registered with CUDA (pinned, so a copy to the GPU is one DMA from the
        pages the agent wrote) through a registration cache: the first upload misses and pays
        cudaHostRegister for the whole heap, later ones hit; the registration ends before the
        arena is unmapped. Where it cannot be registered the copy still works, from pageable
        memory (slower), and a warning says why once."""
        client = self._agent.client
        if self._cuda_cache is None:
            if self._heap_registration_error is not None:
                return
            try:
                self._cuda_cache = _C.RegistrationCache(
                    self.heap_registration_backend, capacity=4, max_age=1e9
                )
            except GenieError as e:
                self._heap_registration_error = str(e)
                logger.warning("genie: uploads to the device go from unregistered memory: %s", e)
                return
            client.invalidate_on_unmap(self._cuda_cache)
        try:
            self._cuda_cache.acquire(client.heap_address, client.heap_bytes)
        except GenieError as e:
            if self._heap_registration_error is None:
                logger.warning("genie: registering the data-plane heap failed: %s", e)
            self._heap_registration_error = str(e)

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

    def _send_internal(self, kind: int, body: dict) -> None:
        header = json.dumps(body).encode()
        prefix = PREFIX.pack(FRAME_MAGIC, 1, kind, 0, len(header), 0)
        self._send_tcp([memoryview(prefix), memoryview(header)])

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

    # -- data-plane set-up (Note: [Data-plane set-up]) -------------------------------------
    def _setup_as_connector(self) -> None:
        self._plane = "pending"
        self._send_internal(_SETUP, {"v": 1, "host": host_id(), "port": self._config.port})
        _, kind, _, header_len, payload_len = self._read_prefix()
        if kind != _SETUP_OK or header_len > _MAX_INTERNAL_HEADER or payload_len:
            raise ProtocolError(
                f"genie: the server at {self._peer} does not run the DPDK transport (it answered "
                f"frame kind {kind}); start it with `genie serve --transport dpdk`, or connect "
                "with the tcp transport"
            )
        reply = self._parse_internal(self._read_header(header_len))
        if not reply.get("ok"):
            self._fall_back(f"the server could not start its data plane: {reply.get('error')}")
            return
        error = ""
        if self._config.is_memif and reply.get("host") != host_id():
            error = "memif connects processes on one host and the server is on another"
        else:
            try:
                self._agent = Agent(self._config, "client", reply.get("socket"))
                self._agent.wait("ready", self._config.connect_timeout)
                self._agent.ready = True
                self._agent_registrations = self._agent.registrations()
            except GenieError as e:
                error = self._start_error(e)
        self._send_internal(_SETUP_DONE, {"ok": not error, "error": error})
        if error:
            self._fall_back(error)
        else:
            self._plane = "up"
            logger.info("genie: DPDK data plane to %s is up", self._peer)

    def _setup_as_listener(self, request: dict) -> None:
        reply: dict = {"ok": False, "host": host_id()}
        if self._plane != "none":
            reply["error"] = "the data plane was set up already"
        elif self._config.is_memif and request.get("host") != host_id():
            reply["error"] = "memif connects processes on one host and the client is on another"
        else:
            name = f"genie-{os.getpid()}-{secrets.token_hex(6)}"
            try:
                self._agent = Agent(self._config, "server", name)
                self._agent.wait("port_up", self._config.connect_timeout)
                reply.update(ok=True, socket=name)
            except GenieError as e:
                reply["error"] = self._start_error(e)
        self._send_internal(_SETUP_OK, reply)
        if reply["ok"]:
            self._plane = "pending"
        else:
            self._fall_back(reply["error"])

    def _drop_agent(self) -> None:
        c = self._agent.client.counters()
        out, into = self._copied_base
        self._copied_base = (out + int(c["copied_out"]), into + int(c["copied_in"]))
        self._agent.close()
        self._agent = None

    def _start_error(self, e: GenieError) -> str:
        died = self._agent.describe_exit() if self._agent is not None else ""
        if self._agent is not None:
            self._drop_agent()
        return died or str(e).removeprefix("genie: ")

    def _parse_internal(self, header: bytes) -> dict:
        try:
            body = json.loads(header)
        except ValueError:
            raise ProtocolError(
                f"genie: malformed data-plane set-up frame from {self._peer}"
            ) from None
        if not isinstance(body, dict):
            raise ProtocolError(f"genie: malformed data-plane set-up frame from {self._peer}")
        return body

    def _fall_back(self, why: str) -> None:
        self._plane = "tcp"
        if self._agent is not None:
            self._drop_agent()
        logger.warning(
            "genie: no DPDK data plane to %s (%s); payloads go over TCP", self._peer, why
        )

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

    def _on_internal(self, kind: int, body: dict) -> None:
        if kind == _SETUP and self._side == "listener":
            self._setup_as_listener(body)
        elif kind == _SETUP_DONE and self._side == "listener" and self._plane == "pending":
            if body.get("ok"):
                self._plane = "up"
                logger.info("genie: DPDK data plane from %s is up", self._peer)
            else:
                self._fall_back(f"the client could not start its data plane: {body.get('error')}")
        else:
            raise ProtocolError(
                f"genie: unexpected data-plane set-up frame {kind} from {self._peer}"
            )

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
