"""Speculative starts through the real client (Note: [Client speculation]): a program recorded
again starts on the server before its recording ends, and the results are eager's whether the
guess was right or not."""

from __future__ import annotations

import fakes
import pytest
import torch
from torch import nn

import genie

pytest_plugins = ["remote_fixtures"]
transformers = pytest.importorskip("transformers")

DEVICE = "remote_accelerator:0"


def _counts(client) -> dict:
    return {
        k: client.counters[k] for k in ("spec_sent", "spec_started", "spec_hits", "runs_by_digest")
    }


@torch.no_grad()
def test_repeated_forward_starts_early_and_equals_eager(remote):
    model = fakes.bert()
    x = torch.randint(0, 500, (2, 12))
    ref = model(x).pooler_output
    rmodel = fakes.bert().to(DEVICE)
    rx = x.to(DEVICE)
    for _ in range(8):
        assert torch.equal(rmodel(rx).pooler_output.cpu(), ref)
    c = _counts(remote)
    # The first run is sent in full, the next two teach the client the binding; from then on
    # every run is started early and adopted.
    assert c["runs_by_digest"] >= 7
    assert c["spec_hits"] >= 5 and c["spec_hits"] == c["spec_started"] == c["spec_sent"]
    assert remote.server_stats()["session"]["spec_misses"] == 0
    # Each run by key had its .cpu() fetch sent right behind it (Note: [Run then fetch]): one
    # wait for the server, not two.
    assert remote.counters["fetched_with_run"] == c["runs_by_digest"]


@torch.no_grad()
def test_hf_dynamic_cache_forward_speculates_over_its_empty_upload(remote):
    """HF's DynamicCache starts from torch.tensor([]) every call: a new (empty) upload each
    time, which the speculation binds as such."""
    model = fakes.gpt2()
    x = torch.randint(0, 500, (2, 10))
    ref = model(x).logits[:, -1].argmax(-1)
    rmodel = fakes.gpt2().to(DEVICE)
    rx = x.to(DEVICE)
    for _ in range(6):
        assert torch.equal(rmodel(rx).logits[:, -1].argmax(-1).cpu(), ref)
    assert _counts(remote)["spec_hits"] >= 3


@torch.no_grad()
def test_static_cache_decode_is_one_program_started_early(remote):
    def decode(model, ids, device, steps):
        cache = transformers.StaticCache(
            config=model.config, max_cache_len=ids.shape[1] + steps + 1
        )
        pos = torch.arange(ids.shape[1], device=device)
        o = model(ids, past_key_values=cache, use_cache=True, cache_position=pos)
        tok, pos, out = o.logits[:, -1:].argmax(-1), pos[-1:] + 1, []
        for _ in range(steps):
            out.append(tok.cpu())
            o = model(tok, past_key_values=cache, use_cache=True, cache_position=pos)
            tok, pos = o.logits[:, -1:].argmax(-1), pos + 1
        return torch.cat(out, 1)

    ids = torch.randint(0, 500, (2, 8))
    ref = decode(fakes.gpt2(), ids, "cpu", 10)
    before = _counts(remote)
    got = decode(fakes.gpt2().to(DEVICE), ids.to(DEVICE), DEVICE, 10)
    assert torch.equal(got, ref)
    after = _counts(remote)
    assert after["spec_hits"] - before["spec_hits"] >= 6  # every step after the first few


class Branchy(nn.Module):
    """The same first layers every call; what follows depends on a Python flag."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 16)
        self.register_buffer("acc", torch.zeros(16))

    def forward(self, x, flag: bool):
        h = torch.relu(self.a(x))
        h = torch.tanh(self.b(h)) + 1
        if flag:
            self.acc.add_(h.sum(0))  # an in-place write of a resident buffer
            return h * 2
        self.acc.mul_(0.5)
        return h - 3


@torch.no_grad()
def test_wrong_guess_is_undone_and_results_equal_eager(remote):
    fakes.seeded(1)
    model = Branchy()
    rmodel = Branchy()
    rmodel.load_state_dict(model.state_dict())
    rmodel = rmodel.to(DEVICE)
    x = torch.randn(4, 16)
    rx = x.to(DEVICE)
    flags = [True] * 4 + [False] + [True] * 3 + [False, False, True]
    for flag in flags:
        assert torch.equal(rmodel(rx, flag).cpu(), model(x, flag))
        # The buffer the wrong guesses wrote in place is what eager has.
        assert torch.equal(rmodel.acc.cpu(), model.acc)
    session = remote.server_stats()["session"]
    assert session["spec_misses"] >= 1  # the False after a run of True was guessed wrong
    assert session["spec_hits"] >= 1


@torch.no_grad()
def test_speculation_can_be_switched_off(server):
    client = genie.connect(server.address, token=server.token, speculate=False)
    try:
        model = fakes.bert()
        x = torch.randint(0, 500, (2, 12))
        rmodel = fakes.bert().to(DEVICE)
        rx = x.to(DEVICE)
        for _ in range(5):
            assert torch.equal(rmodel(rx).pooler_output.cpu(), model(x).pooler_output)
        assert client.counters["spec_sent"] == 0
        assert client.counters["runs_by_digest"] >= 4  # digests still spare the node dicts
    finally:
        genie.configure(local_device="cpu")
        client.close()


# -- Note: [Run then fetch] -----------------------------------------------------------------
@torch.no_grad()
def test_a_failed_run_with_a_fetch_behind_it_raises_its_own_error(remote):
    table = torch.randn(10, 4)
    rtable = table.to(DEVICE)
    for i in range(3):  # the program becomes known by its digest
        idx = torch.tensor([i, 9 - i])
        assert torch.equal(torch.index_select(rtable, 0, idx.to(DEVICE)).cpu(), table[idx])
    bad = torch.tensor([1, 50]).to(DEVICE)  # the same program, an index out of range
    y = torch.index_select(rtable, 0, bad)
    with pytest.raises(genie.ExecutionError, match="index"):
        y.cpu()
    with pytest.raises(genie.ExecutionError, match="index"):
        y.cpu()  # what the failed run would have made stays failed, with the same error
    idx = torch.tensor([3, 4])
    assert torch.equal(torch.index_select(rtable, 0, idx.to(DEVICE)).cpu(), table[idx])
    assert torch.equal(rtable.cpu(), table)
