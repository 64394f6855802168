"""The wire protocol against bad clients: authentication, malformed frames, truncated payloads,
absurd sizes, unknown ops, foreign tensor ids (the fuzzing: test_remote_fuzz.py). Every bad
request gets an error reply or a closed connection, and the server still answers a good client
afterwards."""

from __future__ import annotations

import copy
import socket
import time

import pytest
import torch
from remote_fixtures import (
    ERROR_KINDS,
    RawClient,
    healthy,
    raw_frame,
    run_request,
)

import genie
from genie.errors import GenieError, RemoteError
from genie.runtime import protocol as P
from genie.runtime.loopback import LoopbackServer
from genie.runtime.program import encode_program
from genie.runtime.program import program_key as _key
from genie.runtime.remote import RemoteExecutor, connect

pytest_plugins = ["remote_fixtures"]


# -- authentication -----------------------------------------------------------------------
def test_missing_token_is_refused(server, monkeypatch):
    monkeypatch.delenv("GENIE_TOKEN", raising=False)
    monkeypatch.delenv("GENIE_TOKEN_FILE", raising=False)
    with pytest.raises(GenieError, match="no token"):
        connect(server.address)
    with pytest.raises(RemoteError, match="refused this client.*GENIE_TOKEN"):
        RemoteExecutor(server.address, token=b"")


def test_wrong_token_is_refused(server):
    with pytest.raises(RemoteError, match="authentication failed"):
        RemoteExecutor(server.address, token=server.token + "x")
    healthy(server)


def test_nothing_is_read_before_authentication(server):
    c = RawClient(server.address, None, handshake=False)
    hello = c.t.recv_frame(64)
    assert hello.kind == P.HELLO and len(hello.header) == 32
    c.send({"t": "stats"})  # a request instead of the AUTH frame
    refusal = c.t.recv_frame(1024)
    assert refusal.kind == P.AUTH_FAIL
    assert c.closed_by_peer()
    c.close()


def test_oversized_auth_frame_is_refused(server):
    c = RawClient(server.address, None, handshake=False)
    c.t.recv_frame(64)
    c.send_raw(raw_frame(b"x" * 10, kind=P.AUTH, header_len=1 << 30))
    assert c.t.recv_frame(1024).kind == P.AUTH_FAIL
    assert c.closed_by_peer()
    c.close()


# -- malformed and oversized frames --------------------------------------------------------
def test_bad_magic_closes_the_connection(server):
    c = RawClient(server.address, server.token)
    c.send_raw(b"HTTP" + b"\0" * 16)
    reply = c.reply()
    assert reply["ok"] is False and reply["fatal"] is True and "magic" in reply["msg"]
    assert c.closed_by_peer()
    c.close()
    healthy(server)


@pytest.mark.parametrize(
    "header, why",
    [
        (b"\xc1", "malformed"),  # a byte msgpack never uses
        (b"\x92\x01\x02", "must be a map"),  # a list, not a map
        (P.pack({"t": "launch_missiles"}), "unknown request type"),
        (
            P.pack({"t": "fetch", "ref": [1, "float32", [2**20, 2**20], [1, 1], 0, 8]}),
            "does not fit",
        ),
        (
            P.pack({"t": "fetch", "ref": [1, "float32", [2**40, 2**40], [1, 1], 0, 8]}),
            "out of range",
        ),
        (P.pack({"t": "fetch", "ref": [1, "float128", [1], [1], 0, 8]}), "unknown dtype"),
        (P.pack({"t": "upload", "up": [[1, 1 << 62, 0, 0, True]]}), "upload storage size"),
        (P.pack({"t": "run", "key": b"k" * 16, "bind": []}), "unknown program"),
        (P.pack({"t": "stats", "pre": [["release", "all"]]}), "release ids"),
        (
            P.pack({"t": "stats", "pre": [["bind", 99, [1, "float32", [1], [1], 0, 4]]]}),
            "no pending result",
        ),
    ],
    ids=[
        "not-msgpack",
        "not-a-map",
        "unknown-type",
        "view-outside-storage",
        "absurd-shape",
        "bad-dtype",
        "absurd-upload",
        "unknown-program",
        "bad-release",
        "bad-bind",
    ],
)
def test_malformed_request_gets_an_error_and_the_session_goes_on(server, header, why):
    c = RawClient(server.address, server.token)
    c.send(header)
    reply = c.reply()
    assert reply["ok"] is False and why in reply["msg"], reply
    assert reply["kind"] in ERROR_KINDS
    assert c.request({"t": "hello"})["ok"] is True  # same connection, still served
    c.close()


@pytest.mark.parametrize(
    "frame",
    [
        raw_frame(P.pack({"t": "hello"}), header_len=1 << 31),  # absurd header length
        raw_frame(P.pack({"t": "upload", "up": []}), payload_len=1 << 62),  # absurd payload length
        raw_frame(P.pack({"t": "hello"}), version=99),
        raw_frame(P.pack({"t": "hello"}), kind=P.REPLY),
    ],
    ids=["header-2GiB", "payload-4EiB", "version", "kind"],
)
def test_broken_framing_closes_only_that_connection(server, frame):
    other = RawClient(server.address, server.token)
    c = RawClient(server.address, server.token)
    c.send_raw(frame)
    reply = c.reply()
    assert reply["ok"] is False and reply["fatal"] is True
    assert c.closed_by_peer()
    c.close()
    assert other.request({"t": "hello"})["ok"] is True
    other.close()


def test_payload_not_matching_its_header_is_drained_and_refused(server):
    c = RawClient(server.address, server.token)
    c.send({"t": "upload", "up": [[5, 10, 0, 10, True]]}, [b"x" * 20])
    reply = c.reply()
    assert reply["ok"] is False and "announce 10 bytes" in reply["msg"]
    assert c.request({"t": "stats"})["session"]["resident_count"] == 0
    c.close()


def test_upload_then_release_frees_the_bytes(server):
    c = RawClient(server.address, server.token)
    assert (
        c.request({"t": "upload", "up": [[3, 4096, 0, 4096, True]]}, [b"\1" * 4096])["ok"] is True
    )
    assert c.request({"t": "stats"})["session"]["resident_bytes"] == 4096
    assert c.request({"t": "release", "ids": [3, 999]})["ok"] is True  # unknown ids are ignored
    assert c.request({"t": "stats"})["session"]["resident_bytes"] == 0
    c.close()


def test_truncated_upload_then_disconnect_frees_the_session(server):
    watcher = RawClient(server.address, server.token)
    base = watcher.request({"t": "stats"})["server"]
    c = RawClient(server.address, server.token)
    c.send_raw(
        raw_frame(
            P.pack({"t": "upload", "up": [[1, 1 << 20, 0, 1 << 20, True]]}),
            b"\0" * 1000,
            payload_len=1 << 20,
        )
    )
    c.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        now = watcher.request({"t": "stats"})["server"]
        if (
            now["connections"] == base["connections"]
            and now["resident_bytes"] == base["resident_bytes"]
        ):
            break
        time.sleep(0.05)
    assert now["connections"] == base["connections"]
    assert now["resident_bytes"] == base["resident_bytes"]
    watcher.close()


# -- programs: ops, references, limits -----------------------------------------------------
@pytest.mark.parametrize(
    "op",
    [
        "aten::definitely_not_an_op.default",
        "aten::add.NoSuchOverload",
        "aten::add",
        "os::system.default",
        "torch::load.default",
        "aten::from_file.default",
        "aten::__class__.default",
        "aten::add.Tensor; import os",
        "",
        7,
    ],
)
def test_unknown_or_forbidden_ops_are_refused(server, program, op):
    nodes, constants, _, _ = program
    bad = [dict(n) for n in nodes]
    bad[0] = {**bad[0], "op": op}
    header, payload = run_request(bad, constants, body=P.pack(_raw_program(bad, op)))
    header["key"] = _key(header["prog"])
    c = RawClient(server.address, server.token)
    c.send(header, [payload])
    reply = c.reply()
    assert reply["ok"] is False and reply["kind"] == "protocol", reply
    c.close()


def _raw_program(nodes, op):
    raw = P.unpack(encode_program([dict(n, op="aten::add.Tensor") for n in nodes]).body)
    raw[0][0] = op
    return raw


def test_foreign_tensor_ids_are_refused(server, program):
    nodes, constants, expected, ref = program
    a = RawClient(server.address, server.token)
    header, payload = run_request(nodes, constants)
    assert a.request(header, [payload])["ok"] is True
    got = a.request({"t": "fetch", "ref": P.encode_ref(ref)})
    assert torch.equal(
        torch.frombuffer(bytearray(got["_payload"]), dtype=torch.float32).view(8, 1), expected
    )

    b = RawClient(server.address, server.token)
    reply = b.request({"t": "fetch", "ref": P.encode_ref(ref)})
    assert reply["ok"] is False and "not resident in this session" in reply["msg"]
    header.pop("up")  # run A's program on A's storages without uploading them
    reply = b.request(header)
    assert reply["ok"] is False and "not resident in this session" in reply["msg"]
    assert a.request({"t": "fetch", "ref": P.encode_ref(ref)})["ok"] is True  # A is unaffected
    a.close()
    b.close()


def test_a_run_answers_the_views_it_names_in_its_reply(server, program):
    """Note: [Outputs in the run's reply]: the result's bytes come with the run's reply; a view
    of a storage the session does not hold is answered -1, not as a failed run; a malformed
    view list is refused before anything runs."""
    nodes, constants, expected, ref = program
    c = RawClient(server.address, server.token)
    header, payload = run_request(nodes, constants)
    absent = dict(ref, storage=ref["storage"] + 10**6)
    reply = c.request(dict(header, fetch=[P.encode_ref(ref), P.encode_ref(absent)]), [payload])
    assert reply["ok"] is True and reply["n"] == [32, -1], reply
    assert torch.equal(
        torch.frombuffer(bytearray(reply["_payload"]), dtype=torch.float32).view(8, 1), expected
    )
    again = {k: v for k, v in header.items() if k not in ("up", "prog")}
    reply = c.request(dict(again, fetch=[[1, "float128", [1], [1], 0, 8]]))
    assert reply["ok"] is False and "unknown dtype" in reply["msg"], reply
    reply = c.request(dict(again, fetch="all"))
    assert reply["ok"] is False and "fetch must be a list" in reply["msg"], reply
    assert c.request({"t": "hello"})["ok"] is True
    c.close()


def test_inputs_smaller_than_the_program_reads_are_refused(server, program):
    """The binding check's fast path (every input resident and large enough) must not pass a
    storage that shrank since the last run, nor one arriving too small with the request."""
    nodes, constants, expected, ref = program
    c = RawClient(server.address, server.token)
    header, payload = run_request(nodes, constants)
    assert c.request(header, [payload])["ok"] is True
    sid, nbytes = header["up"][0][0], header["up"][0][1]
    # The program ran on these storages: running it again without uploads passes the check.
    again = {k: v for k, v in header.items() if k not in ("up", "prog")}
    assert c.request(again)["ok"] is True
    # One input's storage replaced by a smaller one: refused, by its id.
    assert c.request({"t": "upload", "up": [[sid, 4, 0, 4, True]]}, [b"\0" * 4])["ok"] is True
    reply = c.request(again)
    assert reply["ok"] is False and f"storage {sid} holds 4 bytes" in reply["msg"], reply
    # Arriving too small with the run itself: refused before anything runs.
    small = dict(again, up=[[sid, 8, 0, 8, True]])
    reply = c.request(small, [b"\0" * 8])
    assert reply["ok"] is False and f"storage {sid} holds 8 bytes" in reply["msg"], reply
    # Arriving at its full size again: the program runs, and its result is eager's.
    assert c.request(header, [payload])["ok"] is True
    got = c.request({"t": "fetch", "ref": P.encode_ref(ref)})
    assert torch.equal(
        torch.frombuffer(bytearray(got["_payload"]), dtype=torch.float32).view(8, 1), expected
    )
    assert nbytes > 8
    c.close()


def test_memory_limit_per_session():
    from genie.runtime.loopback import LoopbackServer

    with LoopbackServer(memory_limit="1MiB") as srv:
        c = RawClient(srv.address, srv.token)
        reply = c.request({"t": "upload", "up": [[1, 2 << 20, 0, 16, True]]}, [b"\0" * 16])
        assert reply["ok"] is False and "limit" in reply["msg"]
        assert (
            c.request({"t": "upload", "up": [[1, 1 << 19, 0, 16, True]]}, [b"\0" * 16])["ok"]
            is True
        )
        c.close()


@pytest.mark.parametrize(
    "value, speculates",
    [("0", False), ("Off", False), ("False", False), ("no", False), ("ON", True), ("", True)],
)
def test_a_switch_in_the_environment_reads_one_way(server, monkeypatch, value, speculates):
    """Every GENIE_* on/off setting reads 1/true/yes/on and 0/false/no/off in any case; "False"
    used to leave speculation on."""
    monkeypatch.setenv("GENIE_SPECULATE", value)
    client = connect(server.address, token=server.token, install=False)
    try:
        assert (client.speculation_hook is not None) is speculates
    finally:
        client.close()


def test_a_switch_that_reads_as_neither_is_refused_by_name(server, monkeypatch):
    monkeypatch.setenv("GENIE_EARLY_UPLOADS", "maybe")
    with pytest.raises(GenieError, match="GENIE_EARLY_UPLOADS='maybe' is not a switch"):
        connect(server.address, token=server.token, install=False)


# -- Note: [Spinning for a reply] -------------------------------------------------------------
def test_a_reader_polls_a_quiet_socket_only_as_long_as_asked():
    from genie import _C

    a, b = socket.socketpair()
    with a, b:
        assert _C._spin_until_readable(a.fileno(), 2000) is False  # nothing came: it gave up
        b.sendall(b"x")
        assert _C._spin_until_readable(a.fileno(), 10_000_000) is True  # at once, not in 10 s
        b.close()
        a.recv(1)
        assert _C._spin_until_readable(a.fileno(), 10_000_000) is True  # a hang-up ends it too


def test_spin_setting_comes_from_the_environment(monkeypatch):
    from genie.runtime.transports import default_spin_us

    monkeypatch.setenv("GENIE_SPIN_US", "250")
    assert default_spin_us() == 250
    monkeypatch.setenv("GENIE_SPIN_US", "soon")
    with pytest.raises(GenieError, match="GENIE_SPIN_US must be a whole number"):
        default_spin_us()


@torch.no_grad()
def test_spinning_client_and_server_give_eager_results(monkeypatch):
    monkeypatch.setenv("GENIE_SPIN_US", "3000")  # both sides poll before they block
    with LoopbackServer(threads=torch.get_num_threads()) as srv:
        client = connect(srv.address, token=srv.token)
        try:
            assert client._t.spin_us == 3000
            model = torch.nn.Sequential(
                torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)
            )
            x = torch.randn(4, 8)
            rmodel = copy.deepcopy(model).to("remote_accelerator:0")
            for _ in range(4):
                assert torch.equal(rmodel(x.to("remote_accelerator:0")).cpu(), model(x))
        finally:
            genie.configure(local_device="cpu")
            client.close()


def test_an_eager_op_returning_one_tensor_list_comes_back_as_one_list(remote):
    """histogramdd runs at capture (its bins depend on data) and returns Tensor[] edges: the
    server answers one list, not one result per tensor, and the values are eager's."""
    x = torch.randn(20, 2)
    ref = torch.histogramdd(x, bins=[3, 4])
    out = torch.histogramdd(x.to("remote_accelerator:0"), bins=[3, 4])
    assert torch.equal(out.hist.cpu(), ref.hist)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(out.bin_edges, ref.bin_edges, strict=True))


# -- Note: [Staged device uploads] ------------------------------------------------------------
def test_a_payload_received_in_pieces_arrives_whole_and_the_stream_stays_in_step():
    """A device-bound payload is read off the socket piece by piece, each piece copied on as
    it arrives; the bytes land where they belong and the next frame reads normally."""
    from genie.runtime.transports.base import recv_staged
    from genie.runtime.transports.tcp import TcpTransport

    payload = torch.randint(0, 256, (10_007,), dtype=torch.uint8)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        a = socket.create_connection(listener.getsockname())
        b, _ = listener.accept()
    sender, receiver = TcpTransport(a, "a"), TcpTransport(b, "b")
    try:
        sender.send_frame(P.PROTOCOL_VERSION, P.REQUEST, b"first", [memoryview(payload.numpy())])
        sender.send_frame(P.PROTOCOL_VERSION, P.REQUEST, b"second", [])
        frame = receiver.recv_frame(1 << 10)
        dst = torch.zeros(10_007, dtype=torch.uint8)
        recv_staged(receiver.recv_payload, dst, pin=False, piece=1000)
        assert torch.equal(dst, payload)
        assert frame.header == b"first" and receiver.payload_remaining == 0
        assert receiver.recv_frame(1 << 10).header == b"second"
    finally:
        sender.close()
        receiver.close()
