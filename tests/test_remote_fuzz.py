"""The wire protocol fuzzed: random bytes, random and mutated requests fed to a server in
process (the bulk), then over a real socket. Every bad request gets an error reply or a closed
connection, the mutated programs do reach the executor, and the server still answers a good
client afterwards. Hand-written bad clients: test_remote_protocol.py."""

from __future__ import annotations

import collections
import contextlib
import copy
import random
import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from remote_fixtures import (
    ERROR_KINDS,
    BytesTransport,
    RawClient,
    healthy,
    run_request,
)

from genie.errors import TransportError
from genie.runtime import protocol as P
from genie.runtime.program import program_key as _key
from genie.runtime.server import Server, ServerConfig, Session
from genie.runtime.transports.base import Frame

pytest_plugins = ["remote_fixtures"]


# -- fuzzing, in process (the bulk) ----------------------------------------------------------
_FUZZ_LIMITS = P.Limits(
    max_header=1 << 20, max_message=16 << 20, max_storage=16 << 20, memory_limit=64 << 20
)


@pytest.fixture(scope="module")
def inproc():
    return Server(ServerConfig(token=b"fuzz", limits=_FUZZ_LIMITS))


def _handle(
    srv: Server,
    header: bytes,
    payload: bytes = b"",
    *,
    version=P.PROTOCOL_VERSION,
    kind=P.REQUEST,
    payload_len: int | None = None,
):
    """Feed one request frame to a fresh session; (reply, close) or None when the session
    ends because the payload was short (what a real server does on EOF)."""
    pl = len(payload) if payload_len is None else payload_len
    t = BytesTransport(payload)
    t.start_frame(pl)
    session = Session(srv, t, 0)
    try:
        reply, buffers, close = session.handle_frame(Frame(version, kind, header, pl))
    except TransportError:
        return None
    finally:
        session.close()
    P.pack(reply)  # whatever the server answers must itself be encodable
    assert reply["ok"] is True or reply["kind"] in ERROR_KINDS, reply
    return reply, close


def _fuzz_settings(n: int):
    return settings(max_examples=n, deadline=None, database=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))  # fmt: skip


# Note: [Fuzz cases per example]
# Hypothesis spends about a millisecond generating one example, far more than the server
# spends refusing it, so each example below feeds several cases: byte strings hypothesis
# generates directly, or requests built by a seeded generator from a hypothesis-drawn seed
# (reproducible from the falsifying example). 4000 + 4000 + 4000 cases in all.
_CASES = 8


@_fuzz_settings(500)
@given(st.lists(st.binary(max_size=300), min_size=_CASES, max_size=_CASES), st.integers(0, 4096))
def test_fuzz_random_bytes_as_request(inproc, headers, payload_len):
    for header in headers:
        out = _handle(inproc, header, b"\0" * min(payload_len, 64), payload_len=payload_len)
        if out is not None:
            assert out[0]["ok"] is False


_NASTY = [
    -1, 0, 1, 2, 3, 7, 2**31, 2**40, 2**62, 2**63 - 1, -(2**63), 2**64 - 1, 0.5, float("nan"),
    float("inf"), None, True, False, "", "float32", "int64", "bool", "aten::add.Tensor",
    "aten::from_file.default", "aten::nope.default", "aten::mm.default", "aten::view.default",
    "release", "bind", b"", b"\0" * 16, [], [[]], [1, 2], [-1], {}, {"t": "run"},
]  # fmt: skip
_TYPES = ["hello", "upload", "run", "eager", "fetch", "stats", "bye", "nope", 1, None]
_KEYS = ["pre", "up", "key", "prog", "bind", "rng", "ref", "fetch", "base", "patch", "t", "zz"]


def _random_value(r, depth: int = 0):
    k = r.random()
    if depth < 3 and k < 0.3:
        return [_random_value(r, depth + 1) for _ in range(r.randint(0, 6))]
    if depth < 3 and k < 0.35:
        return {r.choice(_KEYS): _random_value(r, depth + 1) for _ in range(r.randint(0, 3))}
    if k < 0.45:
        return r.getrandbits(64) - (1 << 63)
    if k < 0.5:
        return r.randbytes(r.randint(0, 24))
    return r.choice(_NASTY)


def _random_request(r) -> dict:
    req = {"t": r.choice(_TYPES)}
    for key in r.sample(_KEYS, r.randint(0, 5)):
        req[key] = _random_value(r)
    if r.random() < 0.3:
        req["key"] = r.randbytes(16)
    return req


@_fuzz_settings(500)
@given(st.integers(0, 2**64 - 1))
def test_fuzz_structured_requests(inproc, seed):
    r = random.Random(seed)
    for _ in range(_CASES):
        _handle(inproc, P.pack(_random_request(r)), r.randbytes(r.choice([0, 0, 8, 64])))


def _mutate(r, tree):
    """1-3 random edits (replace, delete, duplicate, append) somewhere in a nested list."""
    tree = copy.deepcopy(tree)
    for _ in range(r.randint(1, 3)):
        parent, idx, node = None, None, tree
        while isinstance(node, list) and node and r.random() < 0.8:
            parent, idx = node, r.randrange(len(node))
            node = node[idx]
        if parent is None:
            continue
        action = r.choice(["replace", "replace", "replace", "delete", "dup", "append"])
        if action == "replace":
            parent[idx] = _random_value(r, 2)
        elif action == "delete":
            del parent[idx]
        elif action == "dup":
            parent.insert(idx, copy.deepcopy(parent[idx]))
        else:
            parent.append(_random_value(r, 2))
    return tree


@pytest.fixture(scope="module")
def valid_run(program):
    nodes, constants, _, _ = program
    header, payload = run_request(nodes, constants)
    return header, payload, P.unpack(header["prog"])


def test_the_fuzzed_request_is_valid_before_mutation(inproc, valid_run):
    header, payload, _ = valid_run
    reply, close = _handle(inproc, P.pack(header), payload)
    assert reply["ok"] is True and not close


def _mutated_request(r, header: dict, raw: list) -> dict:
    header = dict(header)
    target = r.choice(["prog", "prog", "prog", "prog", "bind", "up", "patch", "value"])
    if target == "value":  # a value argument that validation admits and a kernel refuses
        raw = copy.deepcopy(raw)
        node = r.choice([n for n in raw if any(a[0] == 0 for a in n[1])])
        i = r.choice([i for i, a in enumerate(node[1]) if a[0] == 0])
        node[1][i] = [0, r.choice([7, -9, [7], [0, 7]])]
        target = "prog"
    if target == "prog":
        body = P.pack(_mutate(r, raw))
        header["prog"] = body
        header["key"] = _key(body) if r.random() < 0.9 else r.randbytes(16)
    elif target == "bind":
        header["bind"] = _mutate(r, [list(header["bind"])])
        header["bind"] = header["bind"][0] if header["bind"] else None
    elif target == "up":
        header["up"] = _mutate(r, header["up"])
    else:
        del header["prog"]
        header["base"] = header["key"]
        header["patch"] = _mutate(r, [[[0, 1], None], [[1, 2, 0], 3]])
    return header


@_fuzz_settings(500)
@given(st.integers(0, 2**64 - 1))
def test_fuzz_mutated_programs(inproc, valid_run, seed):
    """Valid run requests (real uploads, a real recorded program) with random edits: decoded,
    validated and, where they stay valid, executed in process."""
    header, payload, raw = valid_run
    r = random.Random(seed)
    for _ in range(_CASES):
        out = _handle(inproc, P.pack(_mutated_request(r, header, raw)), payload)
        _OUTCOMES["transport" if out is None else out[0].get("kind", "ok")] += 1


_OUTCOMES: collections.Counter = collections.Counter()


def test_fuzzed_programs_reached_the_executor():
    """Some mutants stay valid and run, some fail inside an op: the fuzz got past validation."""
    if not _OUTCOMES:
        pytest.skip("runs after test_fuzz_mutated_programs")
    assert _OUTCOMES["ok"] > 0 and _OUTCOMES["execution"] > 0, _OUTCOMES
    assert sum(_OUTCOMES.values()) >= 4000


# -- fuzzing over a real socket --------------------------------------------------------------
@_fuzz_settings(150)
@given(st.integers(0, 2**64 - 1))
def test_fuzz_over_the_socket(server, valid_run, seed):
    """Fewer cases, each on its own connection to the real server: garbage bytes, mutated
    programs (executed where they stay valid) and random requests."""
    header, payload, raw = valid_run
    r = random.Random(seed)
    c = RawClient(server.address, server.token)
    try:
        kind = r.choice(["bytes", "program", "program", "request"])
        if kind == "bytes":
            c.send_raw(r.randbytes(r.randint(1, 200)))
            with contextlib.suppress(OSError):  # the server may have closed already
                c.t._sock.shutdown(socket.SHUT_WR)  # no more from us: answer or close, not wait
        elif kind == "program":
            c.send(_mutated_request(r, header, raw), [payload])
        else:
            c.send(_random_request(r), [r.randbytes(r.choice([0, 8]))])
        try:
            reply = c.reply()
            assert reply["ok"] is True or reply["kind"] in ERROR_KINDS, reply
        except TransportError:
            pass  # closed: an allowed answer to garbage
    finally:
        c.close()
    assert server.alive()


def test_server_still_answers_a_good_client_after_the_abuse(server):
    healthy(server)
