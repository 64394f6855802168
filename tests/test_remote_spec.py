"""Speculative runs ("spec" requests, Note: [Speculative runs] in genie/runtime/server/speculation.py): a
run that matches the speculation adopts its results without running again, anything else
undoes it, and whatever the server declines or undoes leaves the session as it was."""

from __future__ import annotations

import io
import random

import pytest
import torch
from remote_fixtures import DEVICE, BytesTransport, RawClient, run_request, small_program

import genie
from genie.runtime import protocol as P
from genie.runtime.program import ProgramCache, encode_program
from genie.runtime.server import Server, ServerConfig, Session
from genie.runtime.transports.base import Frame

pytest_plugins = ["remote_fixtures"]

_SPEC_COUNTERS = ("spec_started", "spec_declined", "spec_hits", "spec_misses")


# -- recorded programs ----------------------------------------------------------------------
class Recorded:
    """A recorded program with what the tests need to bind it: the client's ids (`binding`),
    the locals the program reads (`inputs`) and the ids of the storages it creates."""

    def __init__(self, nodes, constants):
        self.nodes, self.constants = nodes, constants
        self.enc = encode_program(nodes)
        self.key = self.enc.key
        self.binding = list(self.enc.binding)
        self.program = ProgramCache().add(self.enc.body, P.Limits())
        self.inputs = set(self.program.inputs)
        self.created = [s for i, s in enumerate(self.binding) if i not in self.inputs]

    def spec_bind(self, inputs: dict[int, int] | None = None) -> list[int | None]:
        """The binding a client predicts: its input ids (renamed by `inputs`), None for the
        storages the program creates."""
        inputs = inputs or {}
        return [inputs.get(s, s) if i in self.inputs else None for i, s in enumerate(self.binding)]

    def run_bind(self, offset: int, inputs: dict[int, int] | None = None) -> list[int]:
        """The binding of a later run: created storages get new ids (id + offset)."""
        inputs = inputs or {}
        return [
            inputs.get(s, s) if i in self.inputs else s + offset for i, s in enumerate(self.binding)
        ]


def _record(fn, *, fails: bool = False):
    """The nodes and constants `fn` records; then runs them here, on the local executor."""
    genie.configure(local_device="cpu")
    genie.synchronize()
    result = fn()
    nodes = genie._C._pending_nodes()
    constants = {  # copies: the local run below may write them in place
        sid: torch.empty(0, dtype=t.dtype).set_(
            t.untyped_storage().clone(), t.storage_offset(), t.shape, t.stride()
        )
        for sid, t in genie._C._pending_constants().items()
    }
    if fails:
        with pytest.raises(genie.ExecutionError):
            result.cpu()
    else:
        result.cpu()
    return nodes, constants


@pytest.fixture(scope="module")
def small():
    nodes, constants, expected, ref = small_program()
    return Recorded(nodes, constants), expected, ref


def _in_place():
    """x = arange(6) uploaded; x.add_(1); y = x * 2: the program writes its input."""

    def fn():
        x = torch.arange(6, dtype=torch.float32).to(DEVICE)
        x.add_(1)
        return x * 2

    rec = Recorded(*_record(fn))
    assert len(rec.binding) == 2 and rec.inputs == {0}
    return rec


@pytest.fixture(scope="module")
def in_place():
    return _in_place()


# -- requests -------------------------------------------------------------------------------
def _first_run(c: RawClient, rec: Recorded) -> None:
    """The plain run that uploads the inputs and caches the program on the server."""
    header, payload = run_request(rec.nodes, rec.constants)
    reply = c.request(header, [payload])
    assert reply == {"ok": True}, reply


def _spec(rec: Recorded, bind: list, **extra) -> dict:
    return {"t": "spec", "key": rec.key, "bind": bind, **extra}


def _run(rec: Recorded, bind: list, **extra) -> dict:
    return {"t": "run", "key": rec.key, "bind": bind, "rng": [], **extra}


def _raw_ref(sid: int, nbytes: int) -> list:
    return [sid, "uint8", [nbytes], [1], 0, nbytes]


def _fetch(c, sid: int, nbytes: int) -> bytes:
    """A storage's bytes as the server holds them."""
    reply = c.request({"t": "fetch", "ref": _raw_ref(sid, nbytes)})
    assert reply["ok"] is True, reply
    return reply.get("_payload", b"")


def _floats(c, sid: int, n: int) -> torch.Tensor:
    return torch.frombuffer(bytearray(_fetch(c, sid, 4 * n)), dtype=torch.float32)


def _stats(c) -> dict:
    reply = c.request({"t": "stats"})
    assert reply["ok"] is True, reply
    return reply["session"]


def _counters(c) -> tuple[int, int, int, int]:
    s = _stats(c)
    return tuple(s[k] for k in _SPEC_COUNTERS)


# -- over the socket --------------------------------------------------------------------------
def test_spec_then_the_matching_run_is_a_hit(server, small):
    rec, expected, ref = small
    c = RawClient(server.address, server.token)
    _first_run(c, rec)  # a plain run: its storages are what a run without spec gives
    real = rec.run_bind(10_000)
    # Pipelined as the client will: the spec's reply is read after the run is sent.
    c.send(_spec(rec, rec.spec_bind()))
    c.send(_run(rec, real))
    assert c.reply() == {"ok": True, "spec": True}
    assert c.reply() == {"ok": True, "spec": "hit"}
    out = rec.binding.index(ref["storage"])
    got = torch.frombuffer(
        bytearray(c.request({"t": "fetch", "ref": P.encode_ref(ref, real[out])})["_payload"]),
        dtype=torch.float32,
    ).view(8, 1)
    assert torch.equal(got, expected)
    for old, new in zip(rec.binding, real, strict=True):  # every storage the run made
        if old != new:
            nbytes = rec.enc.fresh[old]
            assert _fetch(c, new, nbytes) == _fetch(c, old, nbytes)
    assert _counters(c) == (1, 0, 1, 0)
    c.close()


def test_a_hit_runs_nothing_again(server, in_place):
    """The adopted run wrote its input once: x = arange(6) + 1 + 1, not + 3."""
    rec = in_place
    c = RawClient(server.address, server.token)
    _first_run(c, rec)
    x, y = rec.binding
    assert torch.equal(_floats(c, x, 6), torch.arange(6.0) + 1)
    assert c.request(_spec(rec, [x, None])) == {"ok": True, "spec": True}
    assert c.request(_run(rec, [x, y + 500])) == {"ok": True, "spec": "hit"}
    assert torch.equal(_floats(c, x, 6), torch.arange(6.0) + 2)
    assert torch.equal(_floats(c, y + 500, 6), (torch.arange(6.0) + 2) * 2)
    assert torch.equal(_floats(c, y, 6), (torch.arange(6.0) + 1) * 2)  # the first run's
    assert _counters(c) == (1, 0, 1, 0)
    c.close()


def test_a_run_with_another_input_is_a_miss_and_still_right(server, small):
    rec, expected, ref = small
    c = RawClient(server.address, server.token)
    _first_run(c, rec)
    # The same inputs with other values under other ids: what the speculation runs on.
    other, up, payload = {}, [], b""
    for sid, t in rec.constants.items():
        st = torch.empty(0, dtype=t.dtype).set_(t.untyped_storage()) * 2 + 1
        other[int(sid)] = int(sid) + 20_000
        up.append(
            [other[int(sid)], st.untyped_storage().nbytes(), 0, st.untyped_storage().nbytes(), True]
        )
        payload += st.numpy().tobytes()
    assert c.request({"t": "upload", "up": up}, [payload]) == {"ok": True}
    before = _stats(c)["resident_count"]
    assert c.request(_spec(rec, rec.spec_bind(other))) == {"ok": True, "spec": True}
    real = rec.run_bind(10_000)
    assert c.request(_run(rec, real)) == {"ok": True}
    out = real[rec.binding.index(ref["storage"])]
    got = c.request({"t": "fetch", "ref": P.encode_ref(ref, out)})
    assert torch.equal(
        torch.frombuffer(bytearray(got["_payload"]), dtype=torch.float32).view(8, 1), expected
    )
    s = _stats(c)
    assert tuple(s[k] for k in _SPEC_COUNTERS) == (1, 0, 0, 1)
    assert s["resident_count"] == before + len(rec.created)  # the run's, not the speculation's
    c.close()


def test_a_miss_undoes_in_place_writes(server, in_place):
    rec = in_place
    c = RawClient(server.address, server.token)
    _first_run(c, rec)
    x, y = rec.binding
    start = torch.arange(6.0) + 1
    assert torch.equal(_floats(c, x, 6), start)
    assert c.request(_spec(rec, [x, None])) == {"ok": True, "spec": True}
    # The server ran x.add_(1) already; a fetch is not the predicted run: undone.
    assert torch.equal(_floats(c, x, 6), start)
    assert _counters(c) == (1, 0, 0, 1)
    # A spec whose output id the client names (and holds): undone too, the old value back.
    assert c.request(_spec(rec, [x, y])) == {"ok": True, "spec": True}
    assert torch.equal(_floats(c, y, 6), start * 2)
    assert torch.equal(_floats(c, x, 6), start)
    # Normal runs afterwards see the undone values.
    assert c.request(_run(rec, [x, y + 700])) == {"ok": True}
    assert torch.equal(_floats(c, x, 6), start + 1)
    assert torch.equal(_floats(c, y + 700, 6), (start + 1) * 2)
    c.close()


def test_spec_pre_and_the_commit_order(server, in_place):
    """A committing run's releases apply after the adoption; a run that releases a storage
    of its own binding is a miss, handled (and failing) exactly as without a speculation."""
    rec = in_place
    c = RawClient(server.address, server.token)
    _first_run(c, rec)
    x, y = rec.binding
    assert c.request(_spec(rec, [x, None])) == {"ok": True, "spec": True}
    reply = c.request(_run(rec, [x, y + 1], pre=[["release", [y]]]))
    assert reply == {"ok": True, "spec": "hit"}
    assert c.request({"t": "fetch", "ref": _raw_ref(y, 24)})["ok"] is False  # released
    assert torch.equal(_floats(c, y + 1, 6), (torch.arange(6.0) + 2) * 2)

    assert c.request(_spec(rec, [x, None])) == {"ok": True, "spec": True}
    reply = c.request(_run(rec, [x, y + 2], pre=[["release", [x]]]))
    assert reply["ok"] is False and "not resident" in reply["msg"], reply
    assert _counters(c) == (2, 0, 1, 1)
    assert c.request({"t": "hello"})["ok"] is True
    c.close()


def test_declines_and_malformed_specs(server, small):
    rec, _, _ = small
    c = RawClient(server.address, server.token)
    _first_run(c, rec)
    before = _stats(c)
    nlocals = len(rec.binding)

    def declined(req, why: str) -> None:
        reply = c.request(req)
        assert reply["ok"] is True and reply["spec"] is False, reply
        assert why in reply["why"], reply

    def refused(req, why: str) -> None:
        reply = c.request(req)
        assert reply["ok"] is False and reply["kind"] == "protocol" and why in reply["msg"], reply
        assert c.request({"t": "hello"})["ok"] is True  # the session goes on

    declined({"t": "spec", "key": b"k" * 16, "bind": []}, "unknown program")
    declined(_spec(rec, [None] * nlocals), "is an input")
    foreign = {sid: 90_000 + i for i, sid in enumerate(rec.binding)}
    declined(_spec(rec, rec.spec_bind(foreign)), "not resident")
    bind = rec.spec_bind()
    twice = [bind[0] if i in rec.inputs else None for i in range(nlocals)]
    declined(_spec(rec, twice), "bound twice")
    refused(_spec(rec, bind[:-1]), f"{nlocals - 1} ids for {nlocals}")
    refused(_spec(rec, [*bind, None]), f"{nlocals + 1} ids for {nlocals}")
    refused(_spec(rec, "all"), "binding")
    refused(_spec(rec, [-1 if b is None else b for b in bind]), "storage id")
    refused(_spec(rec, [1.5 if b is None else b for b in bind]), "storage id")
    refused({"t": "spec", "key": 7, "bind": bind}, "program key")
    refused({"t": "spec", "key": rec.key[:8], "bind": bind}, "16 bytes")
    c.send(_spec(rec, bind), [b"\0" * 8])
    reply = c.reply()
    assert reply["ok"] is False and "no payload" in reply["msg"], reply

    after = _stats(c)
    assert after["spec_declined"] == 4 and after["spec_started"] == 0
    assert after["resident_count"] == before["resident_count"]
    assert after["resident_bytes"] == before["resident_bytes"]

    other = RawClient(server.address, server.token)  # another session cannot use c's storages
    declined_reply = other.request(_spec(rec, bind))
    assert declined_reply["spec"] is False and "not resident" in declined_reply["why"]
    assert other.request({"t": "hello"})["ok"] is True
    other.close()
    assert c.request(_spec(rec, bind)) == {"ok": True, "spec": True}  # c's own still works
    c.close()


def test_temporaries_never_leak(server, small):
    rec, _, _ = small
    c = RawClient(server.address, server.token)
    _first_run(c, rec)
    before = _stats(c)
    for follow in ({"t": "stats"}, {"t": "hello"}, {"t": "release", "ids": []}, b"\xc1"):
        assert c.request(_spec(rec, rec.spec_bind())) == {"ok": True, "spec": True}
        c.request(follow)  # not the predicted run: the speculation is undone
        now = _stats(c)
        assert now["resident_count"] == before["resident_count"]
        assert now["resident_bytes"] == before["resident_bytes"]
    assert now["spec_misses"] == 4
    # Another spec is not the predicted run either; the second one is then adopted.
    c.send(_spec(rec, rec.spec_bind()))
    c.send(_spec(rec, rec.spec_bind()))
    c.send(_run(rec, rec.run_bind(30_000)))
    assert [c.reply() for _ in range(3)] == [
        {"ok": True, "spec": True},
        {"ok": True, "spec": True},
        {"ok": True, "spec": "hit"},
    ]
    now = _stats(c)
    assert now["resident_count"] == before["resident_count"] + len(rec.created)
    assert (now["spec_hits"], now["spec_misses"]) == (1, 5)
    c.close()


# -- in process: limits, failures, internals -----------------------------------------------
class InProcess:
    """One server Session driven in this process (no sockets): its state can be inspected."""

    def __init__(self, device: str = "cpu", **limits):
        self.server = Server(ServerConfig(token=b"spec", device=device, limits=P.Limits(**limits)))
        self.t = BytesTransport()
        self.session = Session(self.server, self.t, 1)

    def request(self, header: dict, payload: bytes = b"") -> dict:
        self.t._payload = io.BytesIO(payload)
        self.t.start_frame(len(payload))
        frame = Frame(P.PROTOCOL_VERSION, P.REQUEST, P.pack(header), len(payload))
        reply, buffers, _ = self.session.handle_frame(frame)
        if buffers:
            reply["_payload"] = b"".join(bytes(b) for b in buffers)
        return reply

    def floats(self, sid: int, n: int) -> torch.Tensor:
        reply = self.request({"t": "fetch", "ref": _raw_ref(sid, 4 * n)})
        assert reply["ok"] is True, reply
        return torch.frombuffer(bytearray(reply["_payload"]), dtype=torch.float32)

    def clean(self) -> None:
        """No temporaries in the session, none in what the graph runner may copy away."""
        assert self.session.spec.pending is None
        assert all(sid >= 0 for sid in self.session.env.storages)
        for e in self.session.runner._entries.values():
            assert all(sid >= 0 for slot in e.slots for sid, _ in slot.handed)

    def close(self) -> None:
        self.session.close()


def test_memory_limit_counts_the_snapshot(in_place):
    rec = in_place
    s = InProcess(memory_limit=60)  # x (24 bytes) + y (24): room for y again, not for x's copy
    header, payload = run_request(rec.nodes, rec.constants)
    assert s.request(header, payload) == {"ok": True}
    x, y = rec.binding
    assert s.request({"t": "release", "ids": [y]}) == {"ok": True}
    reply = s.request(_spec(rec, [x, None]))
    assert reply["spec"] is False and "memory limit" in reply["why"], reply
    assert s.request(_run(rec, [x, y])) == {"ok": True}  # the run itself fits
    s.clean()
    s.close()


def test_random_programs_are_declined():
    def fn():
        return torch.ones(4).to(DEVICE) + torch.rand(4, device=DEVICE)

    rec = Recorded(*_record(fn))
    s = InProcess()
    s.server.programs.add(rec.enc.body, s.server.config.limits)
    reply = s.request(_spec(rec, [None] * len(rec.binding)))
    # Its inputs are not resident either; random steps are the first reason.
    assert reply["spec"] is False and "random" in reply["why"], reply
    s.close()


def test_a_failing_speculation_is_undone_and_declined():
    """x.add_(1) runs, then index_select fails: declined, x as it was."""

    def fn():
        x = torch.zeros(3).to(DEVICE)
        x.add_(1)
        table = torch.randn(10, 4).to(DEVICE)
        return torch.index_select(table, 0, torch.tensor([3, 12]).to(DEVICE)) + x.sum()

    rec = Recorded(*_record(fn, fails=True))
    s = InProcess()
    header, payload = run_request(rec.nodes, rec.constants)
    assert s.request(header, payload)["kind"] == "execution"  # caches the program
    x = rec.binding[0]
    value = s.floats(x, 3)
    before = s.session.stats()
    reply = s.request(_spec(rec, rec.spec_bind()))
    assert reply["spec"] is False and "index_select" in reply["why"], reply
    assert torch.equal(s.floats(x, 3), value)
    after = s.session.stats()
    assert after["resident_count"] == before["resident_count"]
    assert (after["spec_declined"], after["spec_misses"]) == (1, 0)
    assert after["errors"] == before["errors"]  # a decline is no error
    s.clean()
    s.close()


def test_random_specs_are_answered_and_change_nothing(small):
    """Specs with random bindings and keys: each is started, declined or refused, never an
    internal error, and once resolved the session holds exactly what it held."""
    rec, _, _ = small
    s = InProcess()
    header, payload = run_request(rec.nodes, rec.constants)
    assert s.request(header, payload) == {"ok": True}

    def state():
        env = s.session.env.storages
        return {
            sid: bytes(torch.empty(0, dtype=torch.uint8).set_(st).numpy())
            for sid, st in env.items()
        }

    before = state()
    ids = [*rec.binding, 0, 12345, 2**63 - 1, -1, 2**63, None, None, 1.0, "1", True, [], b""]
    r = random.Random(1)
    kinds = {"started": 0, "declined": 0, "refused": 0}
    for _ in range(300):
        n = r.choice([len(rec.binding)] * 4 + [0, 1, len(rec.binding) + 1])
        bind = [r.choice(ids) for _ in range(n)]
        if r.random() < 0.5:  # mostly well formed: the predicted binding with a few changes
            bind = rec.spec_bind()
            bind[r.randrange(len(bind))] = r.choice(ids)
        key = r.choice([rec.key, rec.key, b"k" * 16, rec.key[:15], None, 7])
        reply = s.request({"t": "spec", "key": key, "bind": bind})
        if reply["ok"]:
            kinds["started" if reply["spec"] else "declined"] += 1
        else:
            assert reply["kind"] == "protocol", reply
            kinds["refused"] += 1
        assert s.request({"t": "stats"})["ok"] is True
        assert state() == before
        s.clean()
    assert min(kinds.values()) > 10, kinds
    s.close()


def test_graph_runner_rename_and_restore():
    from genie.runtime.program.graphs import GraphRunner, _Entry, _Slot

    runner = GraphRunner(torch.device("cpu"), enabled=False)
    st = torch.empty(4, dtype=torch.uint8).untyped_storage()

    def slot(handed):
        return _Slot(
            graph=None, static={}, fixed=[], fixed_list=[], loose=[], outputs={}, handed=handed
        )

    runner._entries[b"k"] = _Entry(slots=[slot([(-1, st), (7, st)]), slot([(-2, st)])], next=1)
    saved = runner.handed(b"k")
    runner.rename({-1: 42, -2: 43})
    e = runner._entries[b"k"]
    assert [s.handed for s in e.slots] == [[(42, st), (7, st)], [(43, st)]]
    e.next = 0
    runner.restore_handed(b"k", saved)
    assert [s.handed for s in e.slots] == [[(-1, st), (7, st)], [(-2, st)]]
    assert e.next == 1  # whose turn it was comes back too
    assert runner.handed(b"nope") == (0, [])


@pytest.mark.gpu
def test_speculation_through_cuda_graphs():
    """A recurrent step h.mul_(2); out = h + 1 whose next input is its last output: replays
    hand outputs out of the graph's pool, so undoing a speculative replay must also restore
    which of them the next replay copies away first."""

    def fn():
        h = torch.ones(4).to(DEVICE)
        h.mul_(2)
        return h + 1

    rec = Recorded(*_record(fn))
    assert rec.inputs == {0}
    s = InProcess(device="cuda")
    header, payload = run_request(rec.nodes, rec.constants)
    assert s.request(header, payload) == {"ok": True}
    ids = list(rec.binding)
    want = {ids[-1]: torch.full((4,), 3.0)}  # what each id holds, computed eagerly

    def step(hit: bool = False) -> None:
        last, new = ids[-1], max(ids) + 1
        if hit:
            assert s.request(_spec(rec, [last, None])) == {"ok": True, "spec": True}
        reply = s.request(_run(rec, [last, new]))
        assert reply == ({"ok": True, "spec": "hit"} if hit else {"ok": True})
        want[last] = want[last] * 2  # the step doubles its input in place
        want[new] = want[last] + 1
        ids.append(new)

    step()
    step()  # warm-up done: the next runs capture and replay
    step()
    assert s.session.runner.stats()["cuda_graphs"] == 1
    step(hit=True)
    # A miss: the fetch undoes a replay that overwrote the output held under ids[-1].
    assert s.request(_spec(rec, [ids[-1], None])) == {"ok": True, "spec": True}
    assert torch.equal(s.floats(ids[-1], 4), want[ids[-1]])
    s.clean()
    step()
    step(hit=True)
    step()
    assert s.session.runner.stats()["cuda_graph_replays"] >= 5
    for sid, value in want.items():
        assert torch.equal(s.floats(sid, 4), value), sid
    stats = s.session.stats()
    assert tuple(stats[k] for k in _SPEC_COUNTERS) == (3, 0, 2, 1)
    s.clean()
    s.close()


def _recurrent():
    """h.mul_(2); out = h + 1: each step's input is the last step's output."""

    def fn():
        h = torch.ones(4).to(DEVICE)
        h.mul_(2)
        return h + 1

    return Recorded(*_record(fn))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_speculation_changes_no_value(in_place, device):
    """Two sessions run the same steps of two programs (one writes a fixed input in place,
    one feeds each output to the next step), one of them with speculations that hit or miss
    in every way; after every step both hold the same storages with the same bytes."""
    rec_r, rec_x = _recurrent(), in_place
    spec_session, plain = InProcess(device=device), InProcess(device=device)
    plain.session.server = spec_session.server  # one program cache
    for s in (spec_session, plain):
        for rec in (rec_r, rec_x):
            header, payload = run_request(rec.nodes, rec.constants)
            assert s.request(header, payload) == {"ok": True}
    x = rec_x.binding[0]
    last, fresh = rec_r.binding[1], 1_000_000
    held = {rec_x.binding[1]: 24, last: 16}  # ids that hold outputs, and their bytes
    r = random.Random(0)
    for step in range(40):
        rec = r.choice([rec_r, rec_r, rec_x])
        new = fresh = fresh + 1
        bind = [last, new] if rec is rec_r else [x, new]
        action = r.choice(["plain", "hit", "hit", "fetch", "other", "release", "stats"])
        need = rec.program.extent[0]
        other = r.choice([sid for sid, n in held.items() if n >= need])
        if action != "plain":
            predicted = [other if action == "other" else bind[0], None]
            assert spec_session.request(_spec(rec, predicted)) == {"ok": True, "spec": True}
        if action in ("fetch", "stats"):
            follow = (
                {"t": "fetch", "ref": _raw_ref(other, 16)} if action == "fetch" else {"t": "stats"}
            )
            for s in (spec_session, plain):
                assert s.request(follow)["ok"] is True
        pre = []
        if action == "release" and len(held) > 4:
            pre = [["release", [next(iter(held))]]]
            del held[pre[0][1][0]]
        replies = [s.request(_run(rec, bind, pre=pre)) for s in (spec_session, plain)]
        assert replies[1] == {"ok": True}
        hit = action in ("hit", "release") or (action == "other" and other == bind[0])
        assert replies[0] == ({"ok": True, "spec": "hit"} if hit else {"ok": True}), (step, action)
        held[new] = 16 if rec is rec_r else 24
        if rec is rec_r:
            last = new
        spec_session.clean()
        a, b = spec_session.session.env.storages, plain.session.env.storages
        assert sorted(a) == sorted(b), step
        for sid in b:
            n = b[sid].nbytes()
            assert a[sid].nbytes() == n
            assert spec_session.request({"t": "fetch", "ref": _raw_ref(sid, n)}) == plain.request(
                {"t": "fetch", "ref": _raw_ref(sid, n)}
            ), (step, action, sid)
    stats = spec_session.session.stats()
    assert stats["spec_hits"] > 5 and stats["spec_misses"] > 5 and stats["spec_declined"] == 0
    if device == "cuda":
        assert spec_session.session.runner.stats()["cuda_graph_replays"] > 10
    spec_session.close()
    plain.close()
