"""Typed requests (runtime/requests.py): what a client builds is what the server parses, and
a malformed field is refused with a message that names it."""

import pytest
import torch

from genie.errors import ProtocolError
from genie.runtime import protocol as P
from genie.runtime import requests as R

LIMITS = P.Limits()
KEY = bytes(range(16))


def _ref(storage: int = 7) -> list:
    core = {
        "storage": storage,
        "shape": [2, 3],
        "stride": [3, 1],
        "offset": 0,
        "dtype": torch.float32,
        "storage_nbytes": 24,
    }
    return P.encode_ref(core)


def _round_trip(req: R.Request) -> R.Request:
    return R.parse_request(P.unpack(P.pack(req.header()), LIMITS), LIMITS)


@pytest.mark.parametrize(
    "req",
    [
        R.Hello(),
        R.Stats(),
        R.Bye(),
        R.Upload([R.Piece(3, 100, 0, 64, True), R.Piece(3, 100, 64, 36, False)]),
        R.Run(P.ProgramRef(KEY), [1, 2, 3], [], [R.Piece(1, 8, 0, 8, True)]),
        R.Run(P.ProgramRef(KEY, body=b"\x90"), [1], []),
        R.Run(P.ProgramRef(KEY, base=KEY[::-1], patch=[[0, 1]]), [4], []),
        R.Eager(P.ProgramRef(KEY), [5], []),
        R.Spec(P.ProgramRef(KEY), [1, None, P.EMPTY_UPLOAD]),
        R.Release([1, 2, 3]),
        R.PeerOpen("g-1", "send", "127.0.0.1:7070", "gloo"),
        R.PeerSend("g-1", 9, 4),
        R.PeerRecv("g_1", 9, 4096, 4),
        R.PeerClose("g1"),
    ],
    ids=lambda r: r.kind,
)
def test_what_the_client_builds_the_server_parses(req):
    assert _round_trip(req) == req


def test_a_fetch_parses_to_the_view_it_names():
    got = _round_trip(R.Fetch(wire_ref=_ref(11)))
    assert isinstance(got, R.Fetch)
    assert got.ref.storage == 11 and got.ref.shape == (2, 3) and got.ref.dtype == torch.float32


@pytest.mark.parametrize(
    "header, why",
    [
        ({"t": "launch"}, "unknown request type 'launch'"),
        ({"t": 3}, "unknown request type"),
        ({"t": "upload", "up": [[1, 2, 3]]}, "an upload must be [id, nbytes, at, n, new]"),
        ({"t": "upload", "up": [[1, 8, 4, 8, True]]}, "upload length"),
        ({"t": "run", "key": b"short", "bind": []}, "a program key has 16 bytes"),
        ({"t": "run", "key": KEY}, "binding"),
        ({"t": "spec", "key": KEY, "bind": ["x"]}, "storage id"),
        ({"t": "fetch", "ref": "nothing"}, ""),
        ({"t": "release", "ids": [-1]}, "storage id must be an integer"),
        ({"t": "peer_send", "group": "a b", "id": 1, "tag": 0}, "peer group name"),
        ({"t": "peer_recv", "group": "g", "id": 1, "nbytes": 1, "tag": -2}, "tag"),
        ({"t": "peer_open", "group": "g", "peer": 5}, "peer must be host:port"),
    ],
)
def test_a_malformed_request_is_refused_naming_the_field(header, why):
    with pytest.raises(ProtocolError, match="invalid request") as e:
        R.parse_request(header, LIMITS)
    assert why in str(e.value)


def test_deferred_operations_parse_in_order():
    pre = [["release", [4, 5]], R.Bind(2, _ref(6)).wire(), ["release", []]]
    ops = R.parse_pre(pre, LIMITS)
    assert ops[0] == [4, 5] and ops[2] == []
    pid, meta = ops[1]
    assert pid == 2 and meta.storage == 6
    with pytest.raises(ProtocolError, match="unknown deferred operation 'drop'"):
        R.parse_pre([["drop", 1]], LIMITS)
