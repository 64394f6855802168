"""Decode steps with a growing KV cache as instances of one checked program (Note: [Program
templates] in genie/runtime/remote/namer.py, Note: [Program instances] in program.py), and checked
programs run by the C++ runner (Note: [Running programs in C++])."""

from __future__ import annotations

import dataclasses
import logging

import fakes
import pytest
import torch
from remote_fixtures import DEVICE

import genie
from genie import _C
from genie.errors import ExecutionError, ProtocolError
from genie.runtime import protocol as P
from genie.runtime.loopback import LoopbackServer
from genie.runtime.program import ProgramCache, encode_program, next_patch, patch_key
from genie.runtime.program import run as PR
from genie.runtime.remote.namer import Known as _Known
from genie.runtime.remote.namer import make_template as _make_template
from genie.runtime.replay import Environment
from genie.runtime.server import Server, ServerConfig

pytest_plugins = ["remote_fixtures"]
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def decode_steps():
    """Four consecutive DynamicCache decode steps of a small GPT-2: (digest, encoding) each."""
    genie.configure(local_device="cpu")
    model = fakes.gpt2().to(DEVICE)
    steps = []
    with torch.no_grad():
        out = model(torch.randint(0, 500, (2, 6)).to(DEVICE), use_cache=True)
        pkv, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        tok.cpu()
        for _ in range(4):
            out = model(tok, past_key_values=pkv, use_cache=True)
            pkv, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            tok.cpu()
            steps.append((_C._digest_nodes(), encode_program(_C._last_flushed_nodes())))
    return steps


@pytest.fixture(scope="module")
def two_steps(decode_steps):
    return decode_steps[:2]


def _patch(d1, d2) -> list[list]:
    return [[p, b] for p, a, b in zip(d1[6], d1[5], d2[5], strict=True) if a != b]


def _metas(program) -> list:
    return [(s.op, s.inputs, s.outputs, s.args, s.extents) for s in program.steps]


def test_an_instance_is_the_program_its_patch_makes(two_steps):
    """The numbers-only check of an instance gives the same checked program as decoding the
    next step's bytes in full."""
    (d1, e1), (d2, e2) = two_steps
    limits = P.Limits()
    cache = ProgramCache()
    base = cache.add(e1.body, limits)
    patch = _patch(d1, d2)
    assert patch and all(len(path) in (4, 5) for path, _ in patch)
    inst = cache.instance(base, patch, patch_key(base.key, patch), limits)
    full = ProgramCache().add(e2.body, limits)
    assert _metas(inst) == _metas(full)
    assert all(
        inst.extent.get(k, 0) == full.extent.get(k, 0) for k in set(inst.extent) | set(full.extent)
    )
    assert inst.fresh_bytes == full.fresh_bytes
    assert (inst.inputs, inst.produced, inst.nlocals) == (full.inputs, full.produced, full.nlocals)
    # the steps no patch entry touches are the base's own, already checked
    touched = {path[0] for path, _ in patch}
    assert all(inst.steps[k] is base.steps[k] for k in range(len(base.steps)) if k not in touched)
    assert cache.instance(base, patch, patch_key(base.key, patch), limits) is inst


def _entry(d, e, field: int, part: int, pick=lambda op: "cat" in op):
    """The first parameter path at (field, part) in a step whose op `pick` likes."""
    for path in d[6]:
        if path[1] == field and path[3] == part and pick(e.nodes[path[0]][0]):
            return path
    raise AssertionError("no such parameter")


def test_an_instance_whose_view_leaves_its_storage_is_refused(two_steps):
    (d1, e1), _ = two_steps
    limits = P.Limits()
    cache = ProgramCache()
    base = cache.add(e1.body, limits)
    path = _entry(d1, e1, 3, 2)  # a size of a cat output
    patch = [[path, 10**6]]
    with pytest.raises(ProtocolError, match="does not fit"):
        cache.instance(base, patch, patch_key(base.key, patch), limits)
    # shrinking the storage a cat creates while later steps read all of it
    path = _entry(d1, e1, 3, 5)
    patch = [[path, 4]]
    with pytest.raises(ProtocolError, match="does not fit|exceeds its size"):
        cache.instance(base, patch, patch_key(base.key, patch), limits)


def test_a_patch_of_more_than_numbers_is_checked_like_a_new_program(two_steps):
    (d1, e1), _ = two_steps
    limits = P.Limits()
    cache = ProgramCache()
    base = cache.add(e1.body, limits)
    k = next(i for i, n in enumerate(e1.nodes) if n[2])
    patch = [[[k, 2, 0, 0], 10**6]]  # an input's storage index: not a number the structure omits
    with pytest.raises(ProtocolError):
        cache.instance(base, patch, patch_key(base.key, patch), limits)
    patch = [[[k, 0], "aten::from_file.default"]]  # the op itself
    with pytest.raises(ProtocolError):
        cache.instance(base, patch, patch_key(base.key, patch), limits)


def test_a_template_is_refused_when_its_paths_do_not_name_its_integers(two_steps):
    (d1, e1), _ = two_steps
    known = _Known(key=e1.key, enc=e1, created=[], external=[], random=False)
    params = torch.tensor(d1[5]).numpy()
    assert _make_template(known, params, d1[6]) is not None
    wrong = [list(p) for p in d1[6]]
    wrong[0], wrong[1] = wrong[1], wrong[0]
    if params[0] != params[1]:
        assert _make_template(known, params, wrong) is None
    assert _make_template(known, params, d1[6][:-1]) is None


def test_the_server_prepares_the_instance_the_client_names_next(decode_steps):
    """From two patches of a base the server guesses the next one (Note: [Preparing the
    next instance]); the guess is the patch the client sends for the following step, and its
    instance is checked, cached and has its C++ runner before that step asks for it."""
    (d1, e1), (d2, _), (d3, _), (d4, e4) = decode_steps
    server = Server(ServerConfig(token=b"t", prepare_next=True))
    try:
        limits = server.config.limits
        base = server.programs.add(e1.body, limits)
        p2, p3, p4 = _patch(d1, d2), _patch(d1, d3), _patch(d1, d4)
        assert next_patch(p2, p3) == p4
        server.preparer.submit(base, p2, p3)
        server.preparer.wait()  # the helper is done
        prepared = server.programs.get(patch_key(base.key, p4))
        assert prepared is not None and server.programs.prepared == 1
        assert prepared.native.get("cpu") is not None
        assert _metas(prepared) == _metas(ProgramCache().add(e4.body, limits))
        # A guess that does not check (a view far outside its storage) is dropped quietly,
        # and the helper goes on preparing.
        wild = [[path, value + 10**9] for path, value in p2]
        server.preparer.submit(base, wild, p3)
        server.preparer.submit(base, p3, p4)
        server.preparer.wait()
        assert server.programs.prepared == 2
    finally:
        server.shutdown(grace=0.1)


def test_a_decode_finds_its_steps_prepared_by_the_server():
    """Through a server that prepares instances, a DynamicCache decode still equals eager,
    and most of its steps find their instance already checked."""
    model = fakes.gpt2()
    rmodel = type(model)(model.config).eval()
    rmodel.load_state_dict(model.state_dict())
    ids = torch.randint(0, 500, (2, 5))
    srv = LoopbackServer(threads=torch.get_num_threads(), extra_args=["--prepare-next"])
    try:
        client = genie.connect(srv.address, token=srv.token)
        try:
            with torch.no_grad():
                ref = _greedy(model, ids, 12)
                got = _greedy(rmodel.to(DEVICE), ids.to(DEVICE), 12)
            server = client.server_stats()["server"]
        finally:
            genie.configure(local_device="cpu")
            client.close()
    finally:
        srv.close()
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    assert server["prepared_hits"] >= 8, server


def test_a_refused_decode_step_raises_and_the_session_goes_on(remote, monkeypatch):
    """A decode step the server refuses (its patch makes a view leave its storage), sent as
    an instance with the next step's guess right behind it, raises its own error; a decode
    started afterwards still equals eager and goes as numbers again."""
    from genie.runtime.remote.namer import Template as _Template

    model = fakes.gpt2()
    rmodel = type(model)(model.config).eval()
    rmodel.load_state_dict(model.state_dict())
    rmodel = rmodel.to(DEVICE)
    ids = torch.randint(0, 500, (2, 5))
    real_name = _Template.name

    def refused_name(t, params):  # every integer far beyond its storage
        patch = [[path, 10**9] for path, _ in t.patch(params)]
        return patch, patch_key(t.known.key, patch)

    with torch.no_grad():
        out = rmodel(ids.to(DEVICE), use_cache=True)
        pkv, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(4):
            out = rmodel(tok, past_key_values=pkv, use_cache=True)
            pkv, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            tok.cpu()
        before = dict(remote.counters)
        monkeypatch.setattr(_Template, "name", refused_name)
        out = rmodel(tok, past_key_values=pkv, use_cache=True)
        with pytest.raises(ProtocolError, match="does not fit|exceeds"):
            out.logits[:, -1:].argmax(-1).cpu()
        monkeypatch.setattr(_Template, "name", real_name)
        assert remote.counters["spec_sent"] == before["spec_sent"] + 1  # the guess went
        assert remote.counters["runs_by_template"] == before["runs_by_template"]
        ref = _greedy(model, ids, 8)
        got = _greedy(rmodel, ids.to(DEVICE), 8)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    assert remote.counters["runs_by_template"] - before["runs_by_template"] >= 6


def _greedy(m, x, n):
    """Tokens of n greedy DynamicCache decode steps after the prompt, and the last logits."""
    out = m(x, use_cache=True)
    pkv, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    toks = [tok.cpu()]
    for _ in range(n):
        out = m(tok, past_key_values=pkv, use_cache=True)
        pkv, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        toks.append(tok.cpu())
    return torch.cat(toks, 1), out.logits.cpu()


def test_decode_with_dynamic_cache_goes_as_numbers_and_starts_early(remote):
    """A greedy DynamicCache decode through the server equals eager; after the first decode
    step every step goes as a patch of numbers, and the server has it running before the
    client asks (speculation hits)."""
    model = fakes.gpt2()
    rmodel = type(model)(model.config).eval()
    rmodel.load_state_dict(model.state_dict())
    rmodel = rmodel.to(DEVICE)
    ids = torch.randint(0, 500, (2, 5))
    with torch.no_grad():
        ref_toks, ref_logits = _greedy(model, ids, 12)
        before = dict(remote.counters)
        toks, logits = _greedy(rmodel, ids.to(DEVICE), 12)
    assert torch.equal(toks, ref_toks)
    assert torch.equal(logits, ref_logits)
    delta = {k: remote.counters[k] - before.get(k, 0) for k in ("runs_by_template", "spec_hits")}
    assert delta["runs_by_template"] >= 10
    assert delta["spec_hits"] >= 8


def _program_of(fn):
    """The checked program of what `fn` records (not run here), with an environment holding
    its inputs."""
    genie.configure(local_device="cpu")
    genie.synchronize()
    keep = fn()
    nodes = _C._pending_nodes()
    constants = _C._pending_constants()
    del keep
    _C._collect()  # nobody holds the result: the recorder drops the pending nodes
    enc = encode_program(nodes)
    program = ProgramCache().add(enc.body, P.Limits())
    env = Environment("cpu")
    for sid, t in constants.items():
        env.put_constant(sid, t)
    return program, enc.binding, env


@pytest.mark.parametrize("native", [True, False])
def test_the_cpp_runner_and_the_python_steps_agree(monkeypatch, native):
    """The same checked program run by the C++ runner and by the Python steps leaves the
    same bytes, equal to eager."""
    a, b = torch.randn(6, 5), torch.randn(5, 4)
    program, binding, env = _program_of(
        lambda: (torch.relu(a.to(DEVICE) @ b.to(DEVICE)).t().contiguous() + 1).sum(0)
    )
    monkeypatch.setattr(PR, "_NATIVE", native)
    PR.execute(program, binding, {}, env)
    assert (PR.native_runner(program, env.device) is not None) == native
    m = program.steps[-1].outputs[0]
    out = env.view(dataclasses.replace(m, storage=binding[m.storage]))
    assert torch.equal(out, (torch.relu(a @ b).t().contiguous() + 1).sum(0))


def test_a_failing_step_in_the_cpp_runner_names_the_op():
    table = torch.randn(4, 3)
    idx = torch.tensor([1, 7])  # 7 is out of range
    program, binding, env = _program_of(lambda: table.to(DEVICE)[idx.to(DEVICE)])
    with pytest.raises(ExecutionError, match="aten::index"):
        PR.execute(program, binding, {}, env)


def test_a_template_whose_base_the_server_lost_is_sent_in_full_and_started_again(remote):
    """When the server no longer has a template's base, the step goes in full, the results
    still equal eager, and the next steps go as numbers against the new base."""
    model = fakes.gpt2()
    rmodel = type(model)(model.config).eval()
    rmodel.load_state_dict(model.state_dict())
    rmodel = rmodel.to(DEVICE)
    ids = torch.randint(0, 500, (2, 5))

    def steps(m, x, n, between=None):
        out = m(x, use_cache=True)
        pkv, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        toks = [tok.cpu()]
        for i in range(n):
            if between is not None and i == n // 2:
                between()
            out = m(tok, past_key_values=pkv, use_cache=True)
            pkv, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            toks.append(tok.cpu())
        return torch.cat(toks, 1)

    def forget():  # as if the server had evicted every base: keys it never saw
        for t in remote.namer.templates_known():
            t.known.key = bytes(16)

    def described():  # programs sent as bytes: in full, or as a patch of one sent before
        return remote.counters["programs_sent"] + remote.counters["programs_patched"]

    with torch.no_grad():
        ref = steps(model, ids, 8)
        got = steps(rmodel, ids.to(DEVICE), 8, between=forget)
    assert torch.equal(got, ref)
    assert described() == 3  # prefill, the first decode step, the one after forget()
    assert remote.counters["runs_by_template"] == 8 - 2  # every other step, as numbers


def test_shrinking_sizes_are_not_guessed_below_zero(remote, caplog):
    """Inputs of one structure that shrink (4096, then 8 floats) would continue in a straight
    line to a negative size: no such guess is sent (the server would refuse it with a
    warning), and every result equals eager."""
    w = torch.randn(1)
    rw = w.to(DEVICE)
    sizes = [8192, 4096, 8, 8, 8]
    with caplog.at_level(logging.WARNING, logger="genie"):
        for n in sizes:
            x = torch.randn(n)
            assert torch.equal((x.to(DEVICE) * rw).sum().cpu(), (x * w).sum())
    assert "speculative run request failed" not in caplog.text
    assert remote.counters["spec_sent"] == remote.counters["spec_started"]
