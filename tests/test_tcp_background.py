"""Frames a native thread writes while the caller goes on (Note: [Background sends] in
csrc/bindings/socket_writer.cpp), as TcpTransport uses them for early uploads."""

from __future__ import annotations

import socket
import time

import pytest
import torch

from genie.errors import TransportError
from genie.runtime import protocol as P
from genie.runtime.transports.tcp import TcpTransport


@pytest.fixture
def pair():
    with socket.create_server(("127.0.0.1", 0)) as listener:
        a = socket.create_connection(listener.getsockname())
        b, _ = listener.accept()
    sender, receiver = TcpTransport(a, "a"), TcpTransport(b, "b")
    yield sender, receiver
    sender.close()
    receiver.close()


def _payload(n: int, seed: int) -> torch.Tensor:
    return torch.randint(
        0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )


def _read(receiver: TcpTransport, n: int) -> tuple[bytes, torch.Tensor]:
    frame = receiver.recv_frame(1 << 10)
    dst = torch.empty(frame.payload_len, dtype=torch.uint8)
    receiver.recv_payload([memoryview(dst.numpy())])
    assert frame.payload_len == n
    return frame.header, dst


def test_a_background_send_returns_before_a_peer_that_is_not_reading_took_the_bytes(pair):
    """64 MiB, far over what the socket buffers hold, with nobody reading yet: the call
    returns at once (a plain send would block until the peer read it), and the bytes arrive
    whole once the peer reads."""
    sender, receiver = pair
    big = _payload(64 << 20, 0)
    t0 = time.monotonic()
    sender.send_frame(
        P.PROTOCOL_VERSION, P.REQUEST, b"big", [memoryview(big.numpy())], background=True
    )
    assert time.monotonic() - t0 < 1.0
    header, got = _read(receiver, big.numel())
    assert header == b"big" and torch.equal(got, big)


def test_frames_arrive_in_call_order_whichever_way_they_went(pair):
    """Background frames, plain frames behind them (with and without payload) and plain
    frames once the writer is idle arrive in the order of the calls, each with its bytes."""
    sender, receiver = pair
    sent = []
    for i, (n, background) in enumerate(
        [(3 << 20, True), (0, False), (1000, False), (5 << 20, True), (0, False), (10, False)]
    ):
        p = _payload(n, i)
        sent.append((f"f{i}".encode(), p))
        views = [memoryview(p.numpy())] if n else []
        sender.send_frame(P.PROTOCOL_VERSION, P.REQUEST, sent[-1][0], views, background=background)
    for header, p in sent:
        got_header, got = _read(receiver, p.numel())
        assert got_header == header and torch.equal(got, p)
    sender.flush_sends()
    sender.send_frame(P.PROTOCOL_VERSION, P.REQUEST, b"after", [])
    assert receiver.recv_frame(1 << 10).header == b"after"


def test_a_background_send_to_a_peer_that_left_fails_the_next_send_and_wakes_the_reader(pair):
    """The writer's failure is the next send's TransportError, and a reader blocked on the
    socket is not left waiting."""
    sender, receiver = pair
    receiver.close()
    big = _payload(32 << 20, 1)
    sender.send_frame(
        P.PROTOCOL_VERSION, P.REQUEST, b"lost", [memoryview(big.numpy())], background=True
    )
    with pytest.raises(TransportError, match="connection to a failed while sending a queued frame"):
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            sender.send_frame(P.PROTOCOL_VERSION, P.REQUEST, b"next", [])
            time.sleep(0.01)
    with pytest.raises(TransportError, match="sending a queued frame had failed"):
        sender.recv_frame(1 << 10)


def test_closing_while_a_background_send_waits_on_a_silent_peer_returns_promptly(pair):
    """close() does not hang behind a frame the peer never reads."""
    sender, _ = pair
    big = _payload(64 << 20, 2)
    sender.set_timeout(None)
    sender.send_frame(
        P.PROTOCOL_VERSION, P.REQUEST, b"stuck", [memoryview(big.numpy())], background=True
    )
    t0 = time.monotonic()
    sender.close()
    assert time.monotonic() - t0 < 5.0


def test_frames_sent_together_arrive_as_frames_with_their_payloads(pair):
    """send_frames: a run and the fetches behind it in one write; behind a background frame
    still in flight they queue behind it, in order."""
    sender, receiver = pair
    p1, p2, p3 = _payload(70_000, 3), _payload(5 << 20, 4), _payload(9, 5)
    frames = [(P.PROTOCOL_VERSION, P.REQUEST, b"run", [memoryview(p1.numpy())])]
    frames += [(P.PROTOCOL_VERSION, P.REQUEST, b"fetch", [])] * 2
    sender.send_frame(
        P.PROTOCOL_VERSION, P.REQUEST, b"bg", [memoryview(p2.numpy())], background=True
    )
    sender.send_frames(frames)
    sender.flush_sends()
    sender.send_frames([(P.PROTOCOL_VERSION, P.REQUEST, b"tail", [memoryview(p3.numpy())])] * 2)
    expected = [
        (b"bg", p2),
        (b"run", p1),
        (b"fetch", None),
        (b"fetch", None),
        (b"tail", p3),
        (b"tail", p3),
    ]
    for header, p in expected:
        got_header, got = _read(receiver, 0 if p is None else p.numel())
        assert got_header == header and (p is None or torch.equal(got, p))
