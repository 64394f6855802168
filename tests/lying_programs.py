"""Well-formed programs that lie, fed to an in-process genie server: `python lying_programs.py N`.

Run by tests/test_remote_security.py in a child process, so that a crash (the thing this looks
for) ends the child with a signal instead of taking pytest down. Each case is valid msgpack of
real aten ops, built from a real recorded program, with one to three lies: argument lists cut
short or of the wrong kind, declared outputs larger, smaller or of another dtype than what the
kernel returns, aliasing that does not hold, extra steps that write and read through declared
views, inputs declared larger than what was uploaded, and uploads that do not cover their
storage. Each case uploads, runs and then fetches random views in a fresh session. Prints
"cases=N ok=.. protocol=.. execution=.. ..." (reply kinds) and exits 0; a malformed reply
exits 1.
"""

from __future__ import annotations

import collections
import copy
import random
import sys

import torch
from remote_fixtures import BytesTransport, run_request, small_program

from genie.runtime import protocol as P
from genie.runtime.program import program_key as _key
from genie.runtime.server import Server, ServerConfig, Session
from genie.runtime.transports.base import Frame

KINDS = {"protocol", "execution", "remote", "oom", "unknown_program", "peer", "internal"}
LIMITS = P.Limits(
    max_header=1 << 20, max_message=16 << 20, max_storage=16 << 20, memory_limit=64 << 20
)
DTYPES = ["float32", "float16", "int64", "uint8", "bool", "float64"]
WRITERS = [
    ("aten::fill_.Scalar", lambda: [[1, 0], [0, 7.0]]),
    ("aten::zero_.default", lambda: [[1, 0]]),
    ("aten::add_.Tensor", lambda: [[1, 0], [0, 1.5]]),
    ("aten::neg.default", lambda: [[1, 0]]),
    ("aten::clone.default", lambda: [[1, 0], [0, None]]),
]


def _itemsize(name: str) -> int:
    return P.itemsize(P.get_dtype(name))


def _refit(ref: list, r: random.Random) -> list:
    """A reference with new numbers that still decode: shape, stride, offset, storage size."""
    ref = list(ref)
    ndim = r.randint(0, 3)
    shape = [r.choice([0, 1, 2, 3, 8, 64, 1024, 16384]) for _ in range(ndim)]
    stride, acc = [], 1
    for s in reversed(shape):
        stride.insert(0, acc if r.random() < 0.8 else r.randint(0, 64))
        acc *= max(s, 1)
    offset = r.choice([0, 0, 0, 1, 7, 100])
    ref[2], ref[3], ref[4] = shape, stride, offset
    need = P.extent(tuple(shape), tuple(stride), offset, _itemsize(ref[1]))
    ref[5] = max(need, 0) * r.choice([1, 1, 1, 2]) + r.choice([0, 0, 4, 4096])
    return ref


def _lie(r: random.Random, raw: list) -> list:
    raw = copy.deepcopy(raw)
    k = r.randrange(len(raw))
    node = raw[k]
    lie = r.randrange(9)
    if lie == 0:  # a short argument list
        node[1] = node[1][: r.randrange(len(node[1]) + 1)]
    elif lie == 1 and node[1]:  # an argument of another kind
        i = r.randrange(len(node[1]))
        node[1][i] = r.choice(
            [[0, None], [0, 3], [0, [1, 2]], [1, 0], [1, -1], [2, [0]], [3, [-1, 0]]]
        )
    elif lie == 2 and node[3] and node[3][0] is not None:  # another declared output geometry
        j = r.randrange(len(node[3]))
        if node[3][j] is not None:
            node[3][j] = _refit(node[3][j], r)
    elif lie == 3 and node[3] and node[3][0] is not None:  # another declared dtype
        ref = node[3][0]
        ref[1] = r.choice(DTYPES)
        ref[5] = P.extent(tuple(ref[2]), tuple(ref[3]), ref[4], _itemsize(ref[1]))
    elif lie == 4 and node[2]:  # an input view larger than the storage behind it
        i = r.randrange(len(node[2]))
        node[2][i] = _refit(node[2][i], r)
    elif lie == 5:  # aliasing that does not hold
        node[4] = [r.choice([-1, 0, 0, -2]) for _ in node[4]]
        node[3] = [None if a == -2 else (o or _refit([0, "float32", [], [], 0, 4], r))
                   for a, o in zip(node[4], node[3], strict=False)]  # fmt: skip
    else:  # a step that writes or reads through a declared output, maybe resized
        outs = [(kk, o) for kk, n in enumerate(raw[: k + 1]) for o in n[3] if o is not None]
        if outs:
            _, out = r.choice(outs)
            view = _refit(out, r) if r.random() < 0.6 else list(out)
            op, args = r.choice(WRITERS)
            if op.endswith("_.Scalar") or op.endswith("_.default") or op.endswith("_.Tensor"):
                raw.append([op, args(), [view], [view], [0], [view[0]], [], False])
            else:
                fresh = max(_locals(raw)) + 1
                res = [fresh, *view[1:]]
                raw.append([op, args(), [view], [res], [-1], [], [fresh], False])
    return raw


def _locals(raw: list) -> list[int]:
    return [ref[0] for n in raw for ref in n[2] + n[3] if ref is not None] or [0]


def _handle(srv: Server, session: Session, header: dict, payload: bytes = b"") -> dict:
    t = BytesTransport(payload)
    t.start_frame(len(payload))
    session.transport = t
    reply, _, _ = session.handle_frame(
        Frame(P.PROTOCOL_VERSION, P.REQUEST, P.pack(header), len(payload))
    )
    P.pack(reply)
    if not (reply.get("ok") is True or reply.get("kind") in KINDS):
        print("malformed reply:", reply, file=sys.stderr)
        sys.exit(1)
    return reply


def main(n: int) -> None:
    torch.manual_seed(0)
    nodes, constants, _, _ = small_program()
    header, payload = run_request(nodes, constants)
    base = P.unpack(header["prog"])
    srv = Server(ServerConfig(token=b"fuzz", limits=LIMITS))
    r = random.Random(0)
    counts: collections.Counter = collections.Counter()
    for _ in range(n):
        raw = base
        for _ in range(r.randint(1, 3)):
            raw = _lie(r, raw)
        body = P.pack(raw)
        h = dict(header, prog=body, key=_key(body))
        up = [list(e) for e in header["up"]]
        data = payload
        if r.random() < 0.2:  # an upload that does not cover its storage
            e = r.choice(up)
            e[1] += r.choice([4, 64, 4096])
            data = payload
        h["up"] = up
        session = Session(srv, BytesTransport(), 0)
        try:
            reply = _handle(srv, session, h, data)
            counts[reply.get("kind", "ok")] += 1
            for _ in range(2):  # read back random views of whatever it holds
                sids = list(session.env.storages) or [0]
                ref = _refit([r.choice(sids), r.choice(DTYPES), [], [], 0, 0], r)
                got = _handle(srv, session, {"t": "fetch", "ref": ref})
                counts["fetch_" + got.get("kind", "ok")] += 1
        finally:
            session.close()
    counts["cases"] = n
    print(" ".join(f"{k}={v}" for k, v in sorted(counts.items())))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10000)
