"""The transport interface: how frames travel between a genie client and a genie server.

A frame is a small fixed prefix, a header (bytes the protocol layer encodes) and a payload made
of raw buffers (tensor bytes). The receiving side reads the prefix and the header first, decides
from the header where the payload goes, then receives the payload straight into those buffers
(see Note: [Payloads land in place] in genie/runtime/protocol.py). TCP implements this today;
a DPDK transport implements the same interface with zero-copy external buffers.

Lifecycle: a client ``connect``s (or a server's ``Listener.accept`` hands out a connected
transport), frames are sent and received, ``close`` ends it; after ``close`` every call raises
``TransportError``. Failures of the peer (EOF, reset, timeout) raise ``TransportError``.
"""

from __future__ import annotations

import os
import struct
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from genie.errors import GenieError

__all__ = [
    "FRAME_MAGIC",
    "PREFIX",
    "Frame",
    "Listener",
    "Transport",
    "TransportStats",
    "pack_prefix",
    "recv_growing",
    "recv_staged",
    "unpack_prefix",
]

FRAME_MAGIC = b"GNIE"
# magic, protocol version, frame kind, reserved, header length, payload length
PREFIX = struct.Struct("!4sBBHIQ")


_FIRST_CHUNK = 1 << 20


def recv_growing(recv_into, n: int, what: str) -> bytes:
    """`n` bytes read with `recv_into(view, what)` into a buffer that grows as they arrive
    (doubling from 1 MiB), so a peer that announces a large header and sends nothing holds
    no more memory than it has sent."""
    buf = bytearray(min(n, _FIRST_CHUNK))
    got = 0
    while True:
        with memoryview(buf) as view:
            recv_into(view[got:], what)
        got = len(buf)
        if got == n:
            return bytes(buf)
        buf.extend(bytes(min(n - got, got)))


@dataclass
class Frame:
    """What ``recv_frame`` read: the prefix fields and the header. The payload, if any, is
    still in flight; receive it with ``recv_payload`` or drop it with ``skip_payload``."""

    version: int
    kind: int
    header: bytes
    payload_len: int


@dataclass
class TransportStats:
    """Bytes that crossed this transport, counted at the transport (prefixes included), and
    what it cost to move them.

    ``bytes_copied_sending`` / ``bytes_copied_receiving``: payload bytes genie copied in user
    space between tensor memory and the transport's own buffers (the DPDK agent's arena slots,
    Note: [In place or copied] in csrc/dataplane/agent_client.cpp); 0 where a payload went from
    or into its tensor in place. Copies the kernel (a TCP socket) or a DPDK driver makes into
    its own rings are not genie's and are not counted. ``registrations_hit`` /
    ``registrations_missed``: lookups of this transport's memory registrations (Note:
    [Registration cache]); a miss is a registration paid for."""

    bytes_sent: int = 0
    bytes_received: int = 0
    frames_sent: int = 0
    frames_received: int = 0
    bytes_copied_sending: int = 0
    bytes_copied_receiving: int = 0
    registrations_hit: int = 0
    registrations_missed: int = 0

    @property
    def bytes_copied(self) -> int:
        return self.bytes_copied_sending + self.bytes_copied_receiving

    def as_dict(self) -> dict[str, int]:
        return {
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "frames_sent": self.frames_sent,
            "frames_received": self.frames_received,
            "bytes_copied": self.bytes_copied,
            "bytes_copied_sending": self.bytes_copied_sending,
            "bytes_copied_receiving": self.bytes_copied_receiving,
            "registrations_hit": self.registrations_hit,
            "registrations_missed": self.registrations_missed,
        }


def pack_prefix(version: int, kind: int, header_len: int, payload_len: int) -> bytes:
    return PREFIX.pack(FRAME_MAGIC, version, kind, 0, header_len, payload_len)


def unpack_prefix(data: bytes) -> tuple[bytes, int, int, int, int]:
    """(magic, version, kind, header_len, payload_len)"""
    magic, version, kind, _reserved, header_len, payload_len = PREFIX.unpack(data)
    return magic, version, kind, header_len, payload_len


def default_spin_us() -> int:
    """Microseconds a reader polls for the next frame before it blocks (Note: [Spinning for a
    reply] in csrc/bindings/module.cpp): ``$GENIE_SPIN_US``, else 10 ms on hosts with 8 or
    more cores and 0 on smaller ones, where a polling thread would take a core from the work
    it waits for."""
    text = os.environ.get("GENIE_SPIN_US")
    if text is not None:
        try:
            return max(0, int(text))
        except ValueError:
            raise GenieError(
                f"genie: GENIE_SPIN_US must be a whole number of microseconds, not {text!r}"
            ) from None
    return 10_000 if (os.cpu_count() or 1) >= 8 else 0


# Note: [Staged device uploads]
# A payload for a GPU tensor arrives in host memory first: page-locked memory from torch's
# caching host allocator, so the copy to the device is one DMA that does not wait on the host.
# A large payload is read off the socket in pieces, and each piece's copy to the device is
# queued (non_blocking) as soon as it has arrived, so the device copies piece k while the
# socket delivers piece k + 1 instead of starting only after the last byte. The allocator
# keeps the staging block until the copies queued from it are done.
def recv_staged(recv: Callable, dst, *, pin: bool, piece: int = 0) -> None:
    """Receive ``dst.numel()`` payload bytes with `recv` (a transport's recv_payload) into
    `dst` through one staging buffer (page-locked with `pin`), in pieces of `piece` bytes
    (0: whole), each copied on as soon as it has arrived."""
    import torch

    n = dst.numel()
    staging = torch.empty(n, dtype=torch.uint8, pin_memory=pin)
    view = memoryview(staging.numpy())
    step = piece if piece > 0 else max(n, 1)
    at = 0
    while at < n:
        k = min(step, n - at)
        recv([view[at : at + k]])
        dst[at : at + k].copy_(staging[at : at + k], non_blocking=pin)
        at += k


class Transport(ABC):
    """One connected, ordered, reliable channel carrying frames."""

    #: short name ("tcp", "dpdk")
    name: str = "abstract"
    #: how long recv_frame polls before it blocks, in microseconds (0: it blocks at once)
    spin_us: int = 0
    #: whether send_frame takes ``background=True`` (queue the frame and return; TCP's Note:
    #: [Background sends])
    background_sends: bool = False

    @property
    @abstractmethod
    def zero_copy(self) -> bool:
        """Whether payload buffers are sent from (and received into) their own memory with no
        intermediate copy in user space."""

    @property
    @abstractmethod
    def max_message(self) -> int:
        """The largest payload one frame may carry on this transport."""

    @property
    @abstractmethod
    def peer(self) -> str:
        """The other side, as ``host:port`` or the transport's own notation."""

    @property
    @abstractmethod
    def stats(self) -> TransportStats: ...

    @abstractmethod
    def send_frame(
        self, version: int, kind: int, header: bytes, buffers: Sequence[memoryview] = ()
    ) -> int:
        """Send one frame; returns the bytes it took on the wire."""

    def send_frames(self, frames: Sequence[tuple[int, int, bytes, Sequence[memoryview]]]) -> int:
        """Send `frames` (version, kind, header, buffers) back to back, as one write where the
        transport can (a run and the fetches behind it); returns the bytes they took."""
        return sum(self.send_frame(*f) for f in frames)

    @abstractmethod
    def recv_frame(self, max_header: int) -> Frame:
        """Read the next frame's prefix and header. A header longer than `max_header` or a
        bad magic raises ``ProtocolError`` without reading further."""

    @abstractmethod
    def recv_payload(self, buffers: Sequence[memoryview]) -> None:
        """Fill `buffers` in order from the payload of the frame just read; their lengths
        must add up to what is left of it."""

    @property
    @abstractmethod
    def payload_remaining(self) -> int:
        """Payload bytes of the frame just read that nobody has received yet."""

    @abstractmethod
    def skip_payload(self, nbytes: int) -> None:
        """Read and drop `nbytes` of payload (a refused request keeps the stream in step)."""

    # Note: [Payload memory]
    # Where a payload's bytes live decides whether they are copied. A transport whose data plane
    # can send from and receive into memory of its own (the DPDK arena) hands that memory out
    # here; everything else gets ordinary memory and the transport copies as it must. Callers
    # use these instead of torch.empty for buffers that travel, and lose nothing on TCP.
    def host_buffer(self, nbytes: int):
        """A 1-D uint8 CPU tensor of `nbytes` to receive a payload into or to send from, in the
        memory this transport moves without copying where it has such memory (it may outlive
        the transport). Its bytes are undefined until written."""
        import torch

        return torch.empty(nbytes, dtype=torch.uint8)

    def payload_storage(self, nbytes: int, device, *, zeroed: bool = False):
        """A ``torch.UntypedStorage`` of `nbytes` on `device` for a payload about to arrive
        (``recv_payload_into`` a view of it); zero-filled when `zeroed`, else undefined until
        the payload covers it."""
        import torch

        make = torch.zeros if zeroed else torch.empty
        return make(nbytes, dtype=torch.uint8, device=device).untyped_storage()

    def recv_payload_into(self, dst) -> None:
        """Receive the next ``dst.numel()`` payload bytes into `dst`, a contiguous uint8 tensor
        on any device: in place on the CPU; through pinned host memory to a GPU, a large one
        in pieces (Note: [Staged device uploads])."""
        if dst.device.type == "cpu":
            self.recv_payload([memoryview(dst.numpy())])
            return
        recv_staged(self.recv_payload, dst, pin=True, piece=self.staged_piece)

    #: bytes per piece of a payload received for a device (Note: [Staged device uploads]);
    #: 0 receives it whole, for a transport whose payloads cannot be read in parts
    staged_piece = 0

    @abstractmethod
    def set_timeout(self, seconds: float | None) -> None: ...

    @abstractmethod
    def shutdown(self) -> None:
        """Wake a thread blocked in ``recv_frame`` (it gets ``TransportError``); used for
        graceful server shutdown. ``close`` must still be called."""

    @abstractmethod
    def close(self) -> None: ...

    def close_data_plane(self) -> None:
        """Stop a separate data plane, if the transport has one, before the session ends;
        later frames carry no payload. Nothing to do for a transport without one."""
        return None

    @property
    @abstractmethod
    def closed(self) -> bool: ...

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Listener(ABC):
    """The server side: hands out one connected Transport per client."""

    name: str = "abstract"

    @property
    @abstractmethod
    def address(self) -> tuple[str, int]:
        """Where clients connect (the real port when 0 was asked for)."""

    @abstractmethod
    def accept(self, timeout: float | None = None) -> Transport | None:
        """The next client, or None when `timeout` passed or the listener was closed."""

    @abstractmethod
    def close(self) -> None: ...
