"""The data plane's pieces that need no peer: the memory-registration LRU through genie._C
(hits, eviction order, age expiry, invalidation when a tensor's storage is freed), what the
build says about DPDK and CUDA, and the DPDK transport's TCP fallback and configuration errors.
The C++ side of the LRU has its own tests (csrc/dataplane/tests, run by ctest)."""

from __future__ import annotations

import gc
import logging
import threading
import time

import pytest
import torch

import genie
from genie import _C
from genie.errors import TransportError, UnsupportedOperationError
from genie.runtime import transports


def cache(capacity: int = 500, max_age: float = 300.0) -> _C.RegistrationCache:
    return _C.RegistrationCache("null", capacity=capacity, max_age=max_age)


def test_registration_defaults_and_hits():
    c = _C.RegistrationCache()
    assert (c.capacity, c.max_age, c.backend) == (500, 300.0, "null")
    buf = torch.empty(1 << 16, dtype=torch.uint8)
    for _ in range(3):
        c.acquire(buf.data_ptr(), buf.nbytes)
    c.acquire(buf.data_ptr(), 4096)  # the same address with another length is another entry
    s = c.stats()
    assert (s["misses"], s["hits"], s["entries"]) == (2, 2, 2)
    assert s["registered_bytes"] == buf.nbytes + 4096


def test_registration_evicts_least_recently_used_first():
    c = cache(capacity=3)
    bufs = [torch.empty(4096, dtype=torch.uint8) for _ in range(5)]
    key = [(b.data_ptr(), b.nbytes) for b in bufs]
    for i in (0, 1, 2, 0, 3):  # 1 is the least recently used when 3 arrives
        c.acquire(*key[i])
    assert c.keys() == [key[3], key[0], key[2]]
    c.acquire(*key[4])
    assert c.keys() == [key[4], key[3], key[0]]
    assert c.stats()["evictions"] == 2


def test_registration_expires_by_age():
    c = cache(max_age=0.05)
    a, b = torch.empty(4096), torch.empty(4096)
    c.acquire(a.data_ptr(), a.nbytes)
    time.sleep(0.1)
    c.acquire(b.data_ptr(), b.nbytes)  # a is older than max_age: swept
    assert not c.contains(a.data_ptr(), a.nbytes)
    c.acquire(b.data_ptr(), b.nbytes, pin=True)
    time.sleep(0.1)
    assert c.expire() == 0  # pinned (a transfer in flight) entries never expire
    assert c.contains(b.data_ptr(), b.nbytes)
    c.unpin(b.data_ptr(), b.nbytes)  # the transfer ended: now it is just old
    assert not c.contains(b.data_ptr(), b.nbytes)
    assert c.stats()["expirations"] == 2
    c.max_age = 300.0
    assert c.max_age == 300.0


def test_registration_is_dropped_when_the_storage_is_freed():
    c = cache()
    t = torch.randn(1 << 14)
    view = t[100:200]  # a view registers (and is keyed by) its whole storage
    info = c.register_tensor(view)
    addr, n = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
    assert (info["address"], info["nbytes"], info["invalidated_on_free"]) == (addr, n, True)
    c.register_tensor(t)
    assert c.stats()["hits"] == 1
    del t, view
    gc.collect()
    assert not c.contains(addr, n)
    assert c.stats()["invalidations"] == 1
    # Memory reused at that address is registered afresh, never a stale hit.
    again = torch.randn(1 << 14)
    c.register_tensor(again)
    assert c.stats()["misses"] == 2


def test_one_storage_in_two_caches_is_dropped_from_both():
    c1, c2 = cache(), cache()
    t = torch.empty(1 << 12)
    c1.register_tensor(t)
    c2.register_tensor(t)
    del t
    gc.collect()
    assert c1.stats()["entries"] == c2.stats()["entries"] == 0


def heap_client(heap_bytes: int, slot_bytes: int = 1 << 16):
    """An agent client with no agent behind it: enough to allocate from its arena's heap."""
    import os
    import socket

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    theirs.close()
    fd = os.memfd_create("genie-test-arena")
    try:
        os.ftruncate(fd, 4 * slot_bytes + heap_bytes)
        return _C._DataplaneAgentClient(ours.detach(), fd, 4 * slot_bytes, slot_bytes, heap_bytes)
    finally:
        os.close(fd)


def test_arena_heap_blocks_are_storages_that_return_when_they_die():
    """A heap block is a uint8 CPU tensor; freeing the last reference to its storage gives
    the block back (a freed neighbour merges, so the whole heap fits again), a full heap
    answers None instead of failing, and a tensor stays readable after its client is gone."""
    mb = 1 << 20
    c = heap_client(8 * mb)
    a, b, d = c.alloc(2 * mb), c.alloc(2 * mb), c.alloc(3 * mb)
    assert a.dtype == torch.uint8 and a.device.type == "cpu" and a.numel() == 2 * mb
    assert c.alloc(2 * mb) is None  # 7 of 8 MB taken: no room
    view = b[10:20]
    del b
    assert c.counters()["heap_used"] == 7 * mb  # the view keeps b's storage alive
    del view
    assert c.counters()["heap_used"] == 5 * mb
    del a
    e = c.alloc(4 * mb)  # a's and b's blocks merged
    assert e is not None and c.counters()["heap_used"] == 7 * mb
    d.fill_(7)
    del c
    gc.collect()
    assert bool((d == 7).all())  # the mapping lives as long as a storage from it
    del e
    d.untyped_storage().resize_(4 * mb)  # a resize moves the bytes to torch's memory
    assert bool((d == 7).all())


def test_unknown_backends_and_unavailable_ones_say_why():
    with pytest.raises(genie.errors.GenieError, match="unknown registration backend"):
        _C.RegistrationCache("rdma")
    backends = _C._registration_backends()
    assert backends["null"] == ""
    assert "agent" in backends["dpdk"] and "agent" in backends["gpudev"]
    if not torch.cuda.is_available():
        assert backends["cuda-host"]  # built without CUDA, or no CUDA device: the reason
        with pytest.raises(UnsupportedOperationError, match="(?i)cuda"):
            _C.RegistrationCache("cuda-host")


def _page_locked(t: torch.Tensor) -> bool:
    """Whether the CUDA driver sees t's memory as page-locked host memory. (Tensor.is_pinned()
    means "allocated by torch's pinned allocator" in torch 2.11, so it stays False for memory
    registered with cudaHostRegister: seen on an H200.)"""
    import ctypes

    path = next(line.split()[-1] for line in open("/proc/self/maps") if "libcudart.so" in line)
    rt = ctypes.CDLL(path)

    class Attributes(ctypes.Structure):
        # cudaPointerAttributes, with room to spare: newer CUDA releases append reserved words,
        # and a struct shorter than the runtime's lets it write past the end of this one.
        _fields_ = [
            ("type", ctypes.c_int),
            ("device", ctypes.c_int),
            ("device_pointer", ctypes.c_void_p),
            ("host_pointer", ctypes.c_void_p),
            ("reserved", ctypes.c_long * 32),
        ]

    a = Attributes()
    err = rt.cudaPointerGetAttributes(ctypes.byref(a), ctypes.c_void_p(t.data_ptr()))
    rt.cudaGetLastError()
    return err == 0 and a.type == 1  # cudaMemoryTypeHost


@pytest.mark.gpu
def test_cuda_host_registration_pins_the_tensor():
    c = _C.RegistrationCache("cuda-host")
    t = torch.randn(1 << 20)
    torch.cuda.init()
    assert not _page_locked(t)
    assert c.register_tensor(t)["owned"], _C._dataplane_build_info()["cuda_runtime"]
    assert _page_locked(t)
    assert torch.equal(t.to("cuda", non_blocking=True).cpu(), t)
    c.clear()
    assert not _page_locked(t)


def test_the_build_reports_dpdk_and_cuda():
    info = _C._dataplane_build_info()
    assert set(info) >= {"dpdk", "cuda", "dpdk_version", "dpdk_reason"}
    if _C._dpdk_available():
        assert info["dpdk"] and _C._dpdk_unavailable_reason() == ""
        assert "dpdk" in transports.available()
    else:
        assert _C._dpdk_unavailable_reason()
        assert "dpdk" not in transports.available()


def test_a_missing_agent_makes_dpdk_unavailable_with_a_reason(monkeypatch):
    if not _C._dataplane_build_info()["dpdk"]:
        pytest.skip("built without DPDK")
    monkeypatch.setenv("GENIE_DPDK_AGENT", "/nonexistent/genie-dpdk-agent")
    assert not _C._dpdk_available()
    assert "/nonexistent/genie-dpdk-agent" in _C._dpdk_unavailable_reason()
    with pytest.raises(UnsupportedOperationError, match="dpdk transport is unavailable"):
        transports.listen("127.0.0.1", 0, kind="dpdk")


def test_bad_dpdk_options_are_refused(monkeypatch):
    from genie.runtime.transports.dpdk import DpdkConfig

    monkeypatch.setenv("GENIE_DPDK_OPTIONS", "chunk_bytes")
    with pytest.raises(UnsupportedOperationError, match="key=value"):
        DpdkConfig.from_env()
    monkeypatch.setenv("GENIE_DPDK_OPTIONS", "chunk_bytes=8000 loss_rate=0.1")
    monkeypatch.setenv("GENIE_DPDK_ARENA", "32MiB")
    cfg = DpdkConfig.from_env()
    assert cfg.options == {"chunk_bytes": "8000", "loss_rate": "0.1"}
    assert cfg.arena_bytes == 32 << 20


def _pair(monkeypatch, server_env: dict[str, str]):
    """A listener and a connector in this process (the agents are processes of their own).
    As a real server does, the listener reads its next frame right after AUTH_OK (the set-up
    happens in there); that first frame comes back from the returned `first_frame()`."""
    from genie.runtime.protocol import AUTH_OK

    monkeypatch.setenv("GENIE_DPDK_MIN_PAYLOAD", "0")
    monkeypatch.setenv("GENIE_DPDK_CONNECT_TIMEOUT", "10")
    for k, v in server_env.items():
        monkeypatch.setenv(k, v)
    listener = transports.listen("127.0.0.1", 0, kind="dpdk")
    for k in server_env:
        monkeypatch.delenv(k)
    box = {}

    def serve():
        t = listener.accept(timeout=30)
        box["server"] = t
        t.send_frame(1, AUTH_OK, b"")
        box["frame"] = t.recv_frame(64)

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    client = transports.connect(f"127.0.0.1:{listener.address[1]}", kind="dpdk")
    client.recv_frame(64)  # AUTH_OK: the data plane is set up in here
    listener.close()

    def first_frame():
        th.join(30)
        return box["frame"]

    return box["server"], client, first_frame


@pytest.mark.dpdk
def test_payloads_fall_back_to_tcp_when_an_agent_cannot_start(monkeypatch, caplog):
    """A server whose agent fails (here: an impossible EAL option) answers the set-up with the
    reason; both sides log it and carry payloads over TCP instead."""
    caplog.set_level(logging.WARNING, logger="genie.runtime.transports.dpdk_setup")
    server, client, first_frame = _pair(monkeypatch, {"GENIE_DPDK_OPTIONS": "eal_memory_mb=1"})
    try:
        x = torch.arange(1 << 18, dtype=torch.int32)
        client.send_frame(1, 5, b"h", [memoryview(x.numpy())])
        frame = first_frame()
        y = torch.empty_like(x)
        server.recv_payload([memoryview(y.numpy())])
        assert frame.payload_len == x.nbytes and torch.equal(x, y)
        assert client.data_plane == server.data_plane == "tcp"
        assert "eal_memory_mb" in caplog.text and "payloads go over TCP" in caplog.text
    finally:
        client.close()
        server.close()


def send_async(t, header: bytes, tensors: list[torch.Tensor]) -> threading.Thread:
    """A data-plane send returns once the receiver has the payload, so send from a thread."""
    th = threading.Thread(
        target=t.send_frame, args=(1, 5, header, [memoryview(x.numpy()) for x in tensors])
    )
    th.start()
    return th


@pytest.mark.dpdk
def test_in_process_pair_moves_payloads_on_the_data_plane(monkeypatch):
    """The same transport in one process (each side's agent is its own process): gathered
    buffers on one side, scattered into differently cut buffers on the other, and a skipped
    payload keeps the stream in step."""
    server, client, first_frame = _pair(monkeypatch, {})
    try:
        assert client.data_plane == "up"
        parts = [torch.randn(n) for n in (1000, 300_000, 7)]
        sending = send_async(client, b"h", parts)
        frame = first_frame()
        flat = torch.cat(parts)
        out = torch.empty_like(flat)
        server.recv_payload([memoryview(out[:5].numpy()), memoryview(out[5:250_000].numpy())])
        server.recv_payload([memoryview(out[250_000:].numpy())])
        sending.join(30)
        assert frame.payload_len == flat.nbytes and torch.equal(out, flat)
        assert server.data_plane == "up"
        sending = send_async(client, b"skip me", [flat])
        server.recv_frame(64)
        server.skip_payload(flat.nbytes)
        sending.join(30)
        sending = send_async(client, b"next", [parts[1]])
        assert server.recv_frame(64).header == b"next"
        got = torch.empty_like(parts[1])
        server.recv_payload([memoryview(got.numpy())])
        sending.join(30)
        assert torch.equal(got, parts[1])
        assert server.ping() > 0
        stats = client.data_plane_stats()
        assert stats["messages_sent"] == 3 and stats["chunks_retransmitted"] == 0
    finally:
        client.close()
        server.close()
    with pytest.raises(TransportError, match="closed"):
        client.send_frame(1, 5, b"late")


@pytest.mark.dpdk
@pytest.mark.parametrize(
    "port, arena_in_eal, ring, eal_arena",
    [
        ("memif", "", 1, 1),
        ("memif", "0", 1, 0),
        ("memif:zero-copy=no", "", 0, 0),
    ],
)
def test_client_memif_ring_is_zero_copy_unless_turned_off(
    monkeypatch, port, arena_in_eal, ring, eal_arena
):
    """By default the client's memif ring is zero-copy (Note: [memif zero copy] in
    csrc/dataplane/port.cpp) and its agent's arena lives in the EAL memory that ring shares
    (Note: [Arena in EAL memory] in eal.h): chunks leave without a copy on its side. With
    GENIE_DPDK_ARENA_IN_EAL=0 each chunk the client sends is staged into a ring mbuf
    (`bytes_staged`); `memif:zero-copy=no` keeps both ends of the ring in copy mode. Either
    way payloads both ways arrive intact, torch memory and arena blocks alike."""
    monkeypatch.setenv("GENIE_DPDK_PORT", port)
    monkeypatch.setenv("GENIE_DPDK_ARENA_IN_EAL", arena_in_eal)
    server, client, first_frame = _pair(monkeypatch, {})
    try:
        x = torch.randint(0, 255, (9_000_001,), dtype=torch.uint8)
        sending = send_async(client, b"up", [x])
        first_frame()
        assert client.data_plane == server.data_plane == "up"
        y = torch.empty_like(x)
        server.recv_payload([memoryview(y.numpy())])
        sending.join(30)
        sending = send_async(server, b"down", [y])
        assert client.recv_frame(64).header == b"down"
        z = client.host_buffer(x.nbytes)
        client.recv_payload([memoryview(z.numpy())])
        sending.join(30)
        assert torch.equal(y, x) and torch.equal(z, x)
        sending = send_async(client, b"up again", [z])
        server.recv_frame(64)
        server.recv_payload([memoryview(y.zero_().numpy())])
        sending.join(30)
        assert torch.equal(y, x)
        stats = client.data_plane_stats()
        assert stats["zero_copy_ring"] == ring and stats["arena_in_eal"] == eal_arena
        assert stats["bytes_staged"] == (2 * x.nbytes if ring and not eal_arena else 0)
        assert stats["chunks_retransmitted"] == 0
        assert server.data_plane_stats()["bytes_staged"] == 0
        assert client.stats.bytes_copied == x.nbytes  # x out; z and its echo are the arena
    finally:
        client.close()
        server.close()


@pytest.mark.dpdk
def test_memif_between_two_hosts_falls_back_to_tcp(monkeypatch, caplog):
    """memif joins processes of one host; peers on two hosts carry payloads over TCP."""
    from genie.runtime.transports import dpdk_setup

    main = threading.main_thread()
    monkeypatch.setattr(
        dpdk_setup, "host_id", lambda: "host-a" if threading.current_thread() is main else "host-b"
    )
    caplog.set_level(logging.WARNING, logger="genie.runtime.transports.dpdk_setup")
    server, client, first_frame = _pair(monkeypatch, {})
    try:
        x = torch.arange(1 << 18, dtype=torch.int32)
        client.send_frame(1, 5, b"h", [memoryview(x.numpy())])
        first_frame()
        y = torch.empty_like(x)
        server.recv_payload([memoryview(y.numpy())])
        assert torch.equal(x, y)
        assert client.data_plane == server.data_plane == "tcp"
        assert client.agent_pid is None and server.agent_pid is None
        assert "memif connects processes on one host" in caplog.text
    finally:
        client.close()
        server.close()
