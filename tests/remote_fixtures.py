"""Shared fixtures and helpers of the remote-execution tests (test_remote_*.py).

Test modules load it with ``pytest_plugins = ["remote_fixtures"]`` (pytest puts this
directory on sys.path for its test modules) and import the helpers they call. Plain asserts
here (PYTEST_DONT_REWRITE: the test modules import this before pytest could rewrite it).
"""

from __future__ import annotations

import io
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

import genie
from genie.errors import TransportError
from genie.runtime import protocol as P
from genie.runtime.loopback import LoopbackServer
from genie.runtime.remote import connect
from genie.runtime.transports.base import Frame, Transport, TransportStats, pack_prefix
from genie.runtime.transports.tcp import TcpTransport

DEVICE = "remote_accelerator:0"


@pytest.fixture(scope="module")
def server():
    """A `genie serve` subprocess on 127.0.0.1 with the same thread count as this process,
    so that CPU kernels reduce in the same order as eager here."""
    srv = LoopbackServer(threads=torch.get_num_threads())
    yield srv
    srv.close()


# What an error reply may say; "internal" would mean an input reached code that did not expect it.
ERROR_KINDS = {"protocol", "execution", "remote", "oom", "unknown_program", "peer"}


@pytest.fixture(scope="module")
def program():
    """small_program(), recorded once per module."""
    return small_program()


@pytest.fixture
def remote(server):
    """This process's flushes run on `server` for the test; the local executor comes back after."""
    client = connect(server.address, token=server.token)
    try:
        yield client
    finally:
        genie.configure(local_device="cpu")
        client.close()


def healthy(server) -> None:
    """The server still runs a program for a well-behaved client and gets eager's answer."""
    assert server.alive(), server.log()[-2000:]
    client = connect(server.address, token=server.token)
    try:
        x = torch.randn(5, 7)
        y = (x.to("remote_accelerator:0") * 3).softmax(-1).cpu()
        assert torch.equal(y, (x * 3).softmax(-1))
    finally:
        genie.configure(local_device="cpu")
        client.close()


class RawClient:
    """Speaks the wire protocol by hand, to send what a well-behaved client never would."""

    def __init__(
        self,
        address: str,
        token: str | bytes | None,
        *,
        handshake: bool = True,
        timeout: float = 20.0,
    ):
        self.t = TcpTransport.connect(address, timeout=timeout)
        self.t.set_timeout(timeout)
        if handshake:
            P.client_handshake(self.t, token.encode() if isinstance(token, str) else token)

    def send(
        self,
        header: dict | bytes,
        buffers=(),
        *,
        kind: int = P.REQUEST,
        version: int = P.PROTOCOL_VERSION,
    ) -> None:
        body = header if isinstance(header, bytes) else P.pack(header)
        self.t.send_frame(version, kind, body, [memoryview(b) for b in buffers])

    def send_raw(self, data: bytes) -> None:
        self.t._sock.sendall(data)

    def reply(self) -> dict:
        frame = self.t.recv_frame(64 << 20)
        reply = P.unpack(frame.header)
        if frame.payload_len:
            buf = bytearray(frame.payload_len)
            self.t.recv_payload([memoryview(buf)])
            reply["_payload"] = bytes(buf)
        return reply

    def request(self, header: dict | bytes, buffers=()) -> dict:
        self.send(header, buffers)
        return self.reply()

    def closed_by_peer(self, timeout: float = 10.0) -> bool:
        """True when the server closed the connection (EOF or reset) within `timeout`."""
        self.t.set_timeout(timeout)
        try:
            while True:
                self.reply()
        except TransportError as e:
            return "timed out" not in str(e)
        except Exception:  # noqa: BLE001 - a protocol error on the way to EOF
            return self.closed_by_peer(timeout)

    def close(self) -> None:
        self.t.close()


class BytesTransport(Transport):
    """A transport whose payload comes from bytes in memory: drives a server Session in
    process, without sockets (the fuzz tests)."""

    name = "bytes"

    def __init__(self, payload: bytes = b""):
        self._payload = io.BytesIO(payload)
        self._remaining = 0
        self._stats = TransportStats()
        self._closed = False

    def start_frame(self, payload_len: int) -> None:
        self._remaining = payload_len

    zero_copy = False
    max_message = 1 << 40
    peer = "in-process"

    @property
    def stats(self) -> TransportStats:
        return self._stats

    @property
    def payload_remaining(self) -> int:
        return self._remaining

    def send_frame(self, version, kind, header, buffers=()) -> int:
        return 0

    def recv_frame(self, max_header: int) -> Frame:
        raise TransportError("genie: in-process transport has no frames")

    def recv_payload(self, buffers) -> None:
        for b in buffers:
            v = memoryview(b).cast("B")
            data = self._payload.read(v.nbytes)
            if len(data) < v.nbytes:
                raise TransportError(
                    "genie: in-process peer closed the connection while reading a payload"
                )
            v[:] = data
            self._remaining -= v.nbytes

    def skip_payload(self, nbytes: int) -> None:
        self._payload.read(nbytes)
        self._remaining -= nbytes

    def set_timeout(self, seconds) -> None:
        pass

    def shutdown(self) -> None:
        pass

    def close(self) -> None:
        self._closed = True

    @property
    def closed(self) -> bool:
        return self._closed


def raw_frame(
    header: bytes,
    payload: bytes = b"",
    *,
    kind: int = P.REQUEST,
    version: int = P.PROTOCOL_VERSION,
    header_len: int | None = None,
    payload_len: int | None = None,
) -> bytes:
    """Bytes of one frame, with the lengths in the prefix overridable (to lie)."""
    hl = len(header) if header_len is None else header_len
    pl = len(payload) if payload_len is None else payload_len
    return pack_prefix(version, kind, hl, pl) + header + payload


def run_client_script(code: str, env: dict, timeout: float = 120.0) -> subprocess.CompletedProcess:
    """Run `code` in a fresh Python (a second client process)."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def small_program():
    """A small recorded program (matmul, relu, a view chain, cat, sum, scalar ops) as the
    recorder hands it to an executor: (core node dicts, constants, eager result, result ref).
    Its ops allocate only what their inputs' shapes imply, so fuzzed variants cannot ask the
    server for unbounded memory through an argument."""
    genie.configure(local_device="cpu")
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4, 8, generator=gen)
    b = torch.randn(8, 6, generator=gen)
    expected = (
        torch.cat([(a @ b).relu(), a[:, :6].t().contiguous().t()], 0).sum(1, keepdim=True) * 2 + 1
    )
    ra, rb = a.to(DEVICE), b.to(DEVICE)
    y = (
        torch.cat([(ra @ rb).relu(), ra[:, :6].t().contiguous().t()], 0).sum(1, keepdim=True) * 2
        + 1
    )
    nodes = genie._C._pending_nodes()
    constants = genie._C._pending_constants()
    ref = dict(nodes[-1]["outputs"][0])
    assert torch.equal(y.cpu(), expected)
    return nodes, constants, expected, ref


def run_request(nodes, constants, *, body: bytes | None = None) -> tuple[dict, bytes]:
    """A complete, valid "run" request for `nodes` (uploading `constants`) and its payload."""
    from genie.runtime.program import encode_program
    from genie.runtime.remote.namer import storage_span as _storage_span

    enc = encode_program(nodes)
    up, payload = [], b""
    for sid, t in constants.items():
        lo, hi = _storage_span(t)
        data = torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage(), lo, (hi - lo,), (1,))
        up.append([int(sid), hi, lo, hi - lo, True])
        payload += data.numpy().tobytes()
    header = {
        "t": "run",
        "key": enc.key,
        "prog": enc.body if body is None else body,
        "bind": enc.binding,
        "rng": [],
        "up": up,
    }
    return header, payload
