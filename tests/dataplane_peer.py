"""One peer of the DPDK transport tests (tests/test_dataplane_transfer.py runs two of these as
fresh processes). Not a test module: ``python tests/dataplane_peer.py ROLE ...``.

  server PORT_FILE SIZES   listen, accept one client, then per size: receive a frame, answer
                           with the SHA-256 of its payload and the payload itself
  client PORT SIZES        connect, send a seeded random tensor per size, check the digest and
                           the echo
  hold PORT_FILE           accept one client, then receive frames until the connection breaks
  stream PORT SIZE         connect and send SIZE-byte frames until the connection breaks
  arena-server PORT_FILE SIZES
                           as server, but each payload lands in a buffer from the transport's
                           arena (host_buffer), is kept, and is echoed from where it landed
  arena-client PORT SIZES MEMORY
                           as client; MEMORY "arena" sends from and receives into host_buffer
                           tensors, "torch" from and into torch.empty ones; keeps every echo,
                           checks them after all, frees them, and reads one after closing
  device-server PORT_FILE N
                           accept one client, receive N frames with recv_payload_into a tensor
                           on a device other than the CPU ("meta": the CUDA path's steps on a
                           CPU-only machine, the heap registered through the "null" backend)
  inproc-client PORT SIZES with GENIE_DPDK_IN_PROCESS=1: sends one torch tensor per distinct size
                           (a repeated size resends the same tensor), receives each echo into
                           torch memory, then frees the sent tensors

Each prints one JSON line per event on stdout; a TransportError is printed as
{"error": ..., "kind": "TransportError", "seconds": time since the last event} and exits 3.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time

import torch

from genie.errors import GenieError
from genie.runtime.protocol import AUTH_OK, REPLY, REQUEST
from genie.runtime.transports.dpdk import DpdkListener, DpdkTransport

_last = time.monotonic()


def say(**kw) -> None:
    global _last
    print(json.dumps(kw), flush=True)
    _last = time.monotonic()


def tensor(nbytes: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g)


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(memoryview(t.numpy())).hexdigest()


def accept(port_file: str) -> DpdkTransport:
    listener = DpdkListener("127.0.0.1", 0)
    with open(port_file + ".tmp", "w") as f:
        f.write(str(listener.address[1]))
    os.replace(port_file + ".tmp", port_file)
    t = listener.accept(timeout=60)
    listener.close()
    assert t is not None, "no client"
    t.send_frame(1, AUTH_OK, b"")  # the data plane opens once the client is authenticated
    return t


def serve(port_file: str, sizes: list[int]) -> None:
    t = accept(port_file)
    for n in sizes:
        frame = t.recv_frame(1024)
        buf = torch.empty(frame.payload_len, dtype=torch.uint8)
        t.recv_payload([memoryview(buf.numpy())])
        say(event="received", bytes=n, sha256=digest(buf), plane=t.data_plane)
        t.send_frame(1, REPLY, digest(buf).encode(), [memoryview(buf.numpy())])
    say(event="stats", stats=t.data_plane_stats())
    t.recv_frame(64)  # the client's goodbye, so that nobody closes under a transfer
    t.close()


def client(port: int, sizes: list[int]) -> None:
    t = DpdkTransport.connect(("127.0.0.1", port), timeout=30)
    t.recv_frame(64)  # AUTH_OK: the data plane is set up inside this call
    for i, n in enumerate(sizes):
        x = tensor(n, seed=i)
        t.send_frame(1, REQUEST, b"x", [memoryview(x.numpy())])
        frame = t.recv_frame(1024)
        y = torch.empty(frame.payload_len, dtype=torch.uint8)
        t.recv_payload([memoryview(y.numpy())])
        say(
            event="echo",
            bytes=n,
            sha256=digest(x),
            server_sha256=frame.header.decode(),
            echo_equal=bool(torch.equal(x, y)),
            plane=t.data_plane,
        )
    say(event="stats", stats=t.data_plane_stats())
    t.send_frame(1, REQUEST, b"bye")
    t.close()


def hold(port_file: str) -> None:
    t = accept(port_file)
    first = True
    while True:
        frame = t.recv_frame(1024)  # the first one sets the data plane up
        if first:
            say(event="accepted", plane=t.data_plane, agent=t.agent_pid)
            first = False
        buf = torch.empty(frame.payload_len, dtype=torch.uint8)
        t.recv_payload([memoryview(buf.numpy())])
        say(event="received", bytes=frame.payload_len)


def stream(port: int, n: int) -> None:
    t = DpdkTransport.connect(("127.0.0.1", port), timeout=30)
    t.recv_frame(64)
    say(event="connected", plane=t.data_plane, agent=t.agent_pid)
    x = tensor(n, seed=1)
    while True:
        t.send_frame(1, REQUEST, b"x", [memoryview(x.numpy())])
        say(event="sent", bytes=n)


def arena_serve(port_file: str, sizes: list[int]) -> None:
    t = accept(port_file)
    kept = []
    for n in sizes:
        t.recv_frame(1024)
        buf = t.host_buffer(n)
        t.recv_payload([memoryview(buf.numpy())])
        kept.append((buf, digest(buf)))
        say(event="received", bytes=n, sha256=kept[-1][1], plane=t.data_plane)
        t.send_frame(1, REPLY, kept[-1][1].encode(), [memoryview(buf.numpy())])
    say(
        event="arena",
        stats=t.stats.as_dict(),
        arena=t.arena_stats(),
        kept_intact=all(digest(b) == d for b, d in kept),
    )
    t.recv_frame(64)
    t.close()


def arena_client(port: int, sizes: list[int], memory: str) -> None:
    t = DpdkTransport.connect(("127.0.0.1", port), timeout=30)
    t.recv_frame(64)
    alloc = t.host_buffer if memory == "arena" else (lambda n: torch.empty(n, dtype=torch.uint8))
    kept = []
    for i, n in enumerate(sizes):
        x = alloc(n)
        x.copy_(tensor(n, seed=i))
        t.send_frame(1, REQUEST, b"x", [memoryview(x.numpy())])
        frame = t.recv_frame(1024)
        y = alloc(frame.payload_len)
        t.recv_payload([memoryview(y.numpy())])
        kept.append((x, y))
        say(
            event="echo",
            bytes=n,
            sha256=digest(x),
            server_sha256=frame.header.decode(),
            echo_equal=bool(torch.equal(x, y)),
            plane=t.data_plane,
        )
    del x, y  # only `kept` holds them
    # Every echo was received while the earlier ones were still held: none was overwritten.
    intact = all(torch.equal(y, tensor(x.numel(), seed=i)) for i, (x, y) in enumerate(kept))
    held = t.arena_stats()["heap_used"]
    last = kept[-1][1]
    kept.clear()
    freed = t.arena_stats()["heap_used"]
    say(event="arena", stats=t.stats.as_dict(), arena=t.arena_stats(), kept_intact=intact,
        heap_used_held=held, heap_used_freed=freed)  # fmt: skip
    t.send_frame(1, REQUEST, b"bye")
    t.close()
    # The storage outlives the connection that delivered it.
    say(event="closed", last_equal=bool(torch.equal(last, tensor(sizes[-1], seed=len(sizes) - 1))))


def device_serve(port_file: str, n: int) -> None:
    t = accept(port_file)
    t.heap_registration_backend = "null"
    for _ in range(n):
        frame = t.recv_frame(1024)
        dst = torch.empty(frame.payload_len, dtype=torch.uint8, device="meta")
        t.recv_payload_into(dst)
    say(event="device", stats=t.stats.as_dict(), arena=t.arena_stats(), frames=n)
    t.close()


def inproc_client(port: int, sizes: list[int]) -> None:
    t = DpdkTransport.connect(("127.0.0.1", port), timeout=30)
    t.recv_frame(64)
    sent: dict[int, torch.Tensor] = {}
    for n in sizes:
        x = sent.setdefault(n, tensor(n, seed=n))
        t.send_frame(1, REQUEST, b"x", [memoryview(x.numpy())])
        frame = t.recv_frame(1024)
        y = torch.empty(frame.payload_len, dtype=torch.uint8)
        t.recv_payload([memoryview(y.numpy())])
        say(event="echo", bytes=n, echo_equal=bool(torch.equal(x, y)), plane=t.data_plane)
    held = t.data_plane_stats()["registered_bytes"]
    del x
    sent.clear()  # freeing the storages drops their registrations
    say(
        event="inproc",
        in_process=t.in_process,
        agent_pid=t.agent_pid,
        stats=t.stats.as_dict(),
        registered_bytes_held=held,
        registered_bytes_freed=t.data_plane_stats()["registered_bytes"],
    )
    t.send_frame(1, REQUEST, b"bye")
    t.close()


def main(argv: list[str]) -> int:
    role = argv[0]
    try:
        if role == "server":
            serve(argv[1], [int(s) for s in argv[2].split(",")])
        elif role == "client":
            client(int(argv[1]), [int(s) for s in argv[2].split(",")])
        elif role == "hold":
            hold(argv[1])
        elif role == "stream":
            stream(int(argv[1]), int(argv[2]))
        elif role == "arena-server":
            arena_serve(argv[1], [int(s) for s in argv[2].split(",")])
        elif role == "device-server":
            device_serve(argv[1], int(argv[2]))
        elif role == "inproc-client":
            inproc_client(int(argv[1]), [int(s) for s in argv[2].split(",")])
        elif role == "arena-client":
            arena_client(int(argv[1]), [int(s) for s in argv[2].split(",")], argv[3])
        else:
            raise SystemExit(f"unknown role {role}")
    except GenieError as e:
        say(error=str(e), kind=type(e).__name__, seconds=time.monotonic() - _last)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
