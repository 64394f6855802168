"""A shared `genie serve` against a hostile tenant that holds the token: it may compute, but it
can neither crash the server nor read another session's bytes. Each test sends what an honest
client never would and checks what a user of the server would notice: an error reply, bytes
that are zero instead of someone else's, memory that stays under the limit, and a server that
still gives a good client eager's answer afterwards."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from remote_fixtures import RawClient, healthy

from genie.runtime import protocol as P
from genie.runtime.loopback import LoopbackServer
from genie.runtime.program import program_key as _key
from genie.runtime.transports.base import pack_prefix

pytest_plugins = ["remote_fixtures"]

F32 = "float32"


def _node(op, args, ins, outs, alias, writes=(), fresh=()):
    return [op, args, ins, outs, alias, list(writes), list(fresh), False]


def _ref(local, shape, nbytes=None, dtype=F32, stride=None, offset=0):
    if stride is None:
        stride, acc = [], 1
        for s in reversed(shape):
            stride.insert(0, acc)
            acc *= s
    size = 4 if dtype == F32 else 1
    n = 1
    for s in shape:
        n *= s
    return [local, dtype, list(shape), stride, offset, n * size if nbytes is None else nbytes]


def _run(c: RawClient, nodes: list, bind: list[int], up=(), payload=b"", t="run") -> dict:
    body = P.pack(nodes)
    header = {"t": t, "key": _key(body), "prog": body, "bind": bind, "rng": [], "up": list(up)}
    return c.request(header, [payload] if payload else [])


def _upload_x(c: RawClient, sid: int = 1) -> torch.Tensor:
    x = torch.arange(1.0, 9.0)
    assert c.request({"t": "upload", "up": [[sid, 32, 0, 32, True]]}, [x.numpy().tobytes()])["ok"]
    return x


def _fetch(c: RawClient, sid: int, shape, dtype=F32) -> dict:
    return c.request({"t": "fetch", "ref": _ref(sid, shape, dtype=dtype)})


def _fill_and_release(server, nbytes: int, byte: int = 0xAB) -> None:
    """Another session writes `byte` everywhere in `nbytes` and lets them go."""
    other = RawClient(server.address, server.token)
    assert other.request(
        {"t": "upload", "up": [[5, nbytes, 0, nbytes, True]]}, [bytes([byte]) * nbytes]
    )["ok"]
    assert other.request({"t": "release", "ids": [5]})["ok"]
    other.close()


# -- Note: [Complete argument lists] ---------------------------------------------------------
def test_a_short_argument_list_is_refused_not_run(server):
    """aten::add.Tensor with only `self`: the C++ runner used to read past its stack (SIGSEGV)."""
    c = RawClient(server.address, server.token)
    _upload_x(c)
    short = _node("aten::add.Tensor", [[1, 0]], [_ref(0, [8])], [_ref(1, [8])], [-1], fresh=[1])
    reply = _run(c, [short], [1, 2])
    assert reply["ok"] is False and reply["kind"] == "protocol", reply
    assert "argument other is missing" in reply["msg"]
    c.close()
    healthy(server)


def test_missing_arguments_with_defaults_are_filled_in(server):
    """alpha has a default (1): leaving it out computes what the schema says."""
    c = RawClient(server.address, server.token)
    x = _upload_x(c)
    add = _node(
        "aten::add.Tensor", [[1, 0], [1, 0]], [_ref(0, [8])], [_ref(1, [8])], [-1], fresh=[1]
    )
    assert _run(c, [add], [1, 2])["ok"] is True
    got = torch.frombuffer(bytearray(_fetch(c, 2, [8])["_payload"]), dtype=torch.float32)
    assert torch.equal(got, x + x)
    c.close()


@pytest.mark.parametrize(
    "args, why",
    [
        ([[0, None], [1, 0]], "None does not fit"),  # None where a Tensor must be
        ([[1, -1], [1, 0]], "tensor index out of range"),  # -1 (None) for a non-optional Tensor
        ([[2, [0]], [1, 0]], "does not take a tensor_list"),  # a list where a Tensor must be
        ([[1, 0], [0, [1, 2]]], "a list is not a tensor"),  # a value list for a Tensor
    ],
)
def test_arguments_of_the_wrong_kind_are_refused(server, args, why):
    c = RawClient(server.address, server.token)
    _upload_x(c)
    node = _node("aten::mul.Tensor", args, [_ref(0, [8])], [_ref(1, [8])], [-1], fresh=[1])
    reply = _run(c, [node], [1, 2])
    assert reply["ok"] is False and reply["kind"] == "protocol", reply
    assert why in reply["msg"], reply["msg"]
    c.close()


def test_an_op_name_with_a_trailing_newline_is_refused(server):
    c = RawClient(server.address, server.token)
    _upload_x(c)
    node = _node("aten::neg.default\n", [[1, 0]], [_ref(0, [8])], [_ref(1, [8])], [-1], fresh=[1])
    reply = _run(c, [node], [1, 2])
    assert (
        reply["ok"] is False and reply["kind"] == "protocol" and "op overload name" in reply["msg"]
    )
    c.close()


# -- Note: [Binding a result on a server] ----------------------------------------------------
def test_an_oversized_declared_output_is_neither_written_nor_read_past_its_end(server):
    """sum() returns f32[] (4 bytes); the program declares f32[16384] and fills it. The fill
    and the fetch get error replies instead of writing and reading 64 KiB of the heap."""
    c = RawClient(server.address, server.token)
    _upload_x(c)
    big = _ref(1, [16384])
    nodes = [
        _node("aten::sum.default", [[1, 0], [0, None]], [_ref(0, [8])], [big], [-1], fresh=[1]),
        _node("aten::fill_.Scalar", [[1, 0], [0, 7.0]], [big], [big], [0], writes=[1]),
    ]
    reply = _run(c, nodes, [1, 2])
    assert reply["ok"] is False and reply["kind"] == "execution", reply
    assert "aten::fill_.Scalar" in reply["msg"]
    fetched = _fetch(c, 2, [16384])
    assert fetched["ok"] is False and "not resident" in fetched["msg"]
    c.close()
    healthy(server)


def test_a_declared_storage_larger_than_the_result_reads_back_zeros(server):
    """The view fits (f32[]) but the declared storage is 64 KiB: the server keeps 64 KiB of
    its own zeros behind the result, never 64 KiB of whatever lay after a 4-byte storage."""
    _fill_and_release(server, 1 << 16)
    c = RawClient(server.address, server.token)
    x = _upload_x(c)
    out = _ref(1, [], nbytes=1 << 16)
    node = _node("aten::sum.default", [[1, 0], [0, None]], [_ref(0, [8])], [out], [-1], fresh=[1])
    assert _run(c, [node], [1, 2])["ok"] is True
    got = torch.frombuffer(bytearray(_fetch(c, 2, [16384])["_payload"]), dtype=torch.float32)
    assert got[0] == x.sum() and not got[1:].any()
    c.close()


# -- Note: [No uninitialized bytes] ----------------------------------------------------------
def test_a_partial_upload_reads_back_zeros_not_another_sessions_bytes(server):
    _fill_and_release(server, 1 << 16)
    c = RawClient(server.address, server.token)
    assert c.request({"t": "upload", "up": [[1, 1 << 16, 0, 16, True]]}, [b"\1" * 16])["ok"]
    got = _fetch(c, 1, [1 << 16], dtype="uint8")["_payload"]
    assert got[:16] == b"\1" * 16 and got[16:] == bytes((1 << 16) - 16)
    # a later piece of the same storage still lands where it says
    assert c.request({"t": "upload", "up": [[1, 1 << 16, 100, 4, False]]}, [b"\2" * 4])["ok"]
    got = _fetch(c, 1, [1 << 16], dtype="uint8")["_payload"]
    assert got[100:104] == b"\2" * 4 and got[104:] == bytes((1 << 16) - 104)
    c.close()


@pytest.mark.parametrize("kind", ["run", "eager"])
def test_empty_reads_back_zeros_not_another_sessions_bytes(server, kind):
    _fill_and_release(server, 1 << 16)
    c = RawClient(server.address, server.token)
    out = _ref(0, [16384])
    args = [
        [0, [16384]],
        [0, torch.float32],
        [0, None],
        [0, torch.device("cpu")],
        [0, None],
        [0, None],
    ]
    node = _node("aten::empty.memory_format", args, [], [out], [-1], fresh=[0])
    reply = _run(c, [node], [1], t=kind)
    assert reply["ok"] is True, reply
    if kind == "eager":
        pre = [["bind", reply["res"][0]["p"], _ref(1, [16384])]]
        assert c.request({"t": "stats", "pre": pre})["ok"]
    got = _fetch(c, 1, [16384])["_payload"]
    assert got == bytes(1 << 16)
    c.close()


# -- Note: [Real memory accounting] ----------------------------------------------------------
def test_the_memory_limit_counts_what_kernels_allocate_not_what_is_declared():
    """An eager run declares its zeros() result as 4 bytes; the kernel makes 4 MiB, held as a
    pending result, over the 1 MiB limit: an oom reply, and nothing is left held."""
    with LoopbackServer(memory_limit="1MiB") as srv:
        c = RawClient(srv.address, srv.token)
        args = [[0, [1 << 20]], [0, None], [0, None], [0, torch.device("cpu")], [0, None]]
        node = _node("aten::zeros.default", args, [], [_ref(0, [])], [-1], fresh=[0])
        reply = _run(c, [node], [1], t="eager")
        assert reply["ok"] is False and reply["kind"] == "oom" and "limit" in reply["msg"], reply
        assert c.request({"t": "stats"})["session"]["resident_bytes"] == 0
        # the same lie in a plain run binds nothing it did not declare
        assert _run(c, [node], [2])["ok"] is True
        assert c.request({"t": "stats"})["session"]["resident_bytes"] <= 4
        c.close()
        healthy(srv)


# -- Note: [Connection hygiene] --------------------------------------------------------------
def test_idle_unauthenticated_connections_do_not_lock_out_token_holders(server):
    idle = []
    try:
        for _ in range(300):
            s = socket.create_connection(("127.0.0.1", server.port))
            idle.append(s)
        healthy(server)
    finally:
        for s in idle:
            s.close()


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) << 10
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_an_announced_header_is_not_allocated_before_its_bytes_arrive(server):
    before = _rss(server.proc.pid)
    clients = []
    for _ in range(4):
        c = RawClient(server.address, server.token)
        c.send_raw(pack_prefix(P.PROTOCOL_VERSION, P.REQUEST, 60 << 20, 0) + b"\x81")
        clients.append(c)
    time.sleep(0.5)
    grown = _rss(server.proc.pid) - before
    for c in clients:
        c.close()
    assert grown < 32 << 20, f"the server grew by {grown >> 20} MiB for 4 empty 60 MiB headers"
    healthy(server)


def test_an_idle_session_is_closed_and_its_memory_freed():
    with LoopbackServer(extra_args=["--idle-timeout", "1"]) as srv:
        c = RawClient(srv.address, srv.token)
        assert c.request({"t": "upload", "up": [[1, 4096, 0, 4096, True]]}, [b"\1" * 4096])["ok"]
        assert c.closed_by_peer(timeout=10.0)
        watcher = RawClient(srv.address, srv.token)
        stats = watcher.request({"t": "stats"})["server"]
        assert stats["resident_bytes"] == 0 and stats["sessions"] == 1
        watcher.close()
        healthy(srv)


# -- fuzz: well-formed programs that lie ------------------------------------------------------
@pytest.mark.slow
def test_lying_programs_never_crash_the_server():
    """>= 10,000 valid-msgpack programs of real ops with inconsistent sizes, argument lists,
    kinds and declarations, run in a child process: it must finish (a crash would end it with a
    signal), every reply must be a well-formed answer, and some must reach the kernels."""
    script = Path(__file__).with_name("lying_programs.py")
    env = {**os.environ, "PYTHONPATH": str(script.parent)}
    proc = subprocess.run(
        [sys.executable, str(script), "10000"], capture_output=True, text=True, timeout=600, env=env
    )
    assert proc.returncode == 0, (proc.returncode, proc.stdout[-2000:], proc.stderr[-4000:])
    counts = dict(line.split("=") for line in proc.stdout.split() if "=" in line)
    assert int(counts["cases"]) >= 10000
    assert int(counts["ok"]) > 0 and int(counts["execution"]) > 0 and int(counts["protocol"]) > 0
    assert int(counts.get("internal", 0)) == 0, proc.stdout
