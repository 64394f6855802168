"""Models run through `genie serve` (a subprocess on 127.0.0.1) give eager's results, bit for
bit, and only what the host asks for crosses the wire."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import genie

pytest_plugins = ["remote_fixtures"]

transformers = pytest.importorskip("transformers")

DEVICE = "remote_accelerator:0"


def _gpt2(seed: int = 0, **kw):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        n_layer=2,
        n_embd=64,
        n_head=4,
        vocab_size=500,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
        **kw,
    )
    return transformers.GPT2LMHeadModel(cfg).eval()


def _remote_copy(model):
    clone = type(model)(model.config).eval()
    clone.load_state_dict(model.state_dict())
    return clone.to(DEVICE)


def test_decode_bytes_weights_once_and_kv_cache_never_fetched(remote):
    """16 greedy decode steps: after the first, what is sent is a small fraction of the
    weights (they are resident), and only the chosen tokens come back, never the KV cache."""
    model = _gpt2(5)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    rmodel = _remote_copy(model)
    fetched: list[tuple[tuple[int, ...], torch.dtype]] = []
    real_fetch = remote.fetch

    def fetch(ref):
        fetched.append((tuple(ref["shape"]), ref["dtype"]))
        return real_fetch(ref)

    remote.fetch = fetch
    ids = torch.randint(0, 500, (1, 8))
    tokens, ref_tokens = [], []
    with torch.no_grad():
        out = rmodel(ids.to(DEVICE), use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
        tokens.append(tok.item())
        first = remote.stats()
        assert first["bytes_sent"] >= weight_bytes  # the weights went with the first step
        pkv = out.past_key_values
        for _ in range(15):
            out = rmodel(tok, past_key_values=pkv, use_cache=True)
            pkv = out.past_key_values
            tok = out.logits[:, -1:].argmax(-1)
            tokens.append(tok.item())
        last = remote.stats()
        # eager reference
        rout = model(ids, use_cache=True)
        rtok = rout.logits[:, -1:].argmax(-1)
        rpkv = rout.past_key_values
        ref_tokens.append(rtok.item())
        for _ in range(15):
            rout = model(rtok, past_key_values=rpkv, use_cache=True)
            rpkv = rout.past_key_values
            rtok = rout.logits[:, -1:].argmax(-1)
            ref_tokens.append(rtok.item())
    assert tokens == ref_tokens
    sent = last["bytes_sent"] - first["bytes_sent"]
    assert sent < 0.1 * weight_bytes, (sent, weight_bytes)
    assert last["upload_bytes"] == first["upload_bytes"]  # no weight crossed the wire again
    # The first decode step goes in full; the next ones as numbers against it (Note: [Program
    # templates]), no node converted or sent again.
    assert last["programs_sent"] - first["programs_sent"] == 1
    assert last["runs_by_template"] - first["runs_by_template"] == 14
    # Only 1x1 token ids were materialized; no KV tensor (batch, heads, seq, dim) came back.
    assert fetched and all(shape == (1, 1) and dtype == torch.int64 for shape, dtype in fetched)
    assert last["bytes_received"] - first["bytes_received"] < 200 * 15


def test_released_tensors_are_freed_on_the_server(remote):
    x = torch.randn(256, 256, device=DEVICE)
    y = (x @ x).relu()
    y.cpu()
    before = remote.server_stats()["session"]["resident_bytes"]
    assert before >= 2 * 256 * 256 * 4
    del x, y
    genie.synchronize()
    torch.ones(1, device=DEVICE).cpu()  # any request carries the releases
    after = remote.server_stats()["session"]["resident_bytes"]
    assert after < before - 2 * 256 * 256 * 4 + 4096


def test_two_clients_at_once_with_different_models(server):
    """Two client processes, an MLP and a CNN, sessions open at the same time, each equal to
    its own eager run."""
    env = {
        **os.environ,
        # Not GENIE_SERVER: that connects at import, and each process must open exactly one
        # session for the rendezvous below to count clients.
        "GENIE_TEST_SERVER": server.address,
        "GENIE_TOKEN": server.token,
        "OMP_NUM_THREADS": "1",
    }
    env.pop("GENIE_TOPOLOGY", None)
    env.pop("GENIE_SERVER", None)
    common = """
        import os, time, torch, genie
        from genie.runtime.remote import connect
        c = connect(os.environ["GENIE_TEST_SERVER"])
        torch.set_num_threads(1)
        deadline = time.time() + 60
        while c.server_stats()["server"]["sessions"] < 2 and time.time() < deadline:
            time.sleep(0.05)
        assert c.server_stats()["server"]["sessions"] >= 2, "the other client never connected"
    """
    mlp = (
        common
        + """
        torch.manual_seed(0)
        def make():
            return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.LayerNorm(64),
                                       torch.nn.Linear(64, 8)).eval()
        m = make()
        r = make(); r.load_state_dict(m.state_dict()); r = r.to("remote_accelerator:0")
        with torch.no_grad():
            for i in range(4):
                x = torch.randn(3, 32)
                assert torch.equal(r(x.to("remote_accelerator:0")).cpu(), m(x))
        print("mlp ok")
    """
    )
    cnn = (
        common
        + """
        torch.manual_seed(1)
        m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 14 * 14, 5)).eval()
        r = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 14 * 14, 5)).eval()
        r.load_state_dict(m.state_dict()); r = r.to("remote_accelerator:0")
        with torch.no_grad():
            for i in range(4):
                x = torch.randn(2, 3, 16, 16)
                assert torch.equal(r(x.to("remote_accelerator:0")).cpu(), m(x))
        print("cnn ok")
    """
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for code in (mlp, cnn)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    assert "mlp ok" in outs[0][0] and "cnn ok" in outs[1][0]


@pytest.mark.gpu
def test_cuda_server_replays_cuda_graphs_and_matches_eager_cuda():
    """On a CUDA server, a repeated program is captured as a CUDA graph and replayed; results
    equal eager on the same GPU, and a decode loop (shapes change every step, no graphs) too."""
    from fakes import bert, gpt2

    from genie.runtime.loopback import LoopbackServer
    from genie.runtime.remote import connect

    with LoopbackServer(device="cuda:0") as srv:
        client = connect(srv.address, token=srv.token)
        try:
            model = bert()
            ids = torch.randint(0, 500, (2, 12), generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                ref = copy.deepcopy(model).cuda()(ids.cuda()).last_hidden_state.cpu()
                rmodel = model.to(DEVICE)
                rids = ids.to(DEVICE)
                outs = [rmodel(rids).last_hidden_state.cpu() for _ in range(6)]
            session = client.server_stats()["session"]
            assert session["cuda_graph_replays"] >= 2, session
            assert all(torch.equal(o, ref) for o in outs)

            lm = gpt2()
            prompt = torch.randint(0, 500, (1, 6), generator=torch.Generator().manual_seed(1))
            kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
            with torch.no_grad():
                ref_tokens = copy.deepcopy(lm).cuda().generate(prompt.cuda(), **kwargs).cpu()
                tokens = lm.to(DEVICE).generate(prompt.to(DEVICE), **kwargs).cpu()
            assert torch.equal(tokens, ref_tokens)
        finally:
            genie.configure(local_device="cpu")
            client.close()


@pytest.mark.gpu
def test_cuda_graph_outputs_held_by_the_user_keep_their_values():
    """A loop that keeps the last run's output while it runs the next (a decode loop's logits)
    gets a second graph that takes turns with the first, so nothing is copied; outputs held
    longer are copied away before a replay would overwrite them. Every value equals eager."""
    from genie.runtime.loopback import LoopbackServer
    from genie.runtime.remote import connect

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16))
    xs = [torch.randn(4, 16) for _ in range(12)]
    with torch.no_grad():
        ref = [copy.deepcopy(model).cuda()(x.cuda()).cpu() for x in xs]
    with LoopbackServer(device="cuda:0") as srv:
        client = connect(srv.address, token=srv.token)
        try:
            with torch.no_grad():
                rmodel = copy.deepcopy(model).to(DEVICE)
                prev = None
                for i, x in enumerate(xs[:8]):
                    out = rmodel(x.to(DEVICE))
                    assert torch.equal(out.cpu(), ref[i])
                    if prev is not None:  # held while the next run replayed
                        assert torch.equal(prev.cpu(), ref[i - 1])
                    prev = out
                graphs = client.server_stats()["session"]
                assert graphs["cuda_graph_replays"] >= 4, graphs
                assert graphs["cuda_graph_spares"] == 1 and graphs["cuda_graph_output_copies"] == 0
                kept = [rmodel(x.to(DEVICE)) for x in xs[8:]]  # each held across later runs
                for out, want in zip(kept, ref[8:], strict=True):
                    assert torch.equal(out.cpu(), want)
                assert client.server_stats()["session"]["cuda_graph_output_copies"] > 0
        finally:
            genie.configure(local_device="cpu")
            client.close()


def test_undefined_outputs_travel_and_backward_matches_eager(remote):
    """Backward ops return undefined tensors for gradients nobody asked for (layer norm's weight
    grad when the weight is frozen); they must cross the wire as such."""

    def prog(dev):
        torch.manual_seed(0)
        ln = torch.nn.LayerNorm(8).to(dev)
        ln.weight.requires_grad_(False)
        ln.bias.requires_grad_(False)
        x = torch.randn(4, 8).to(dev).requires_grad_()
        ln(x).pow(2).sum().backward()
        return x.grad.cpu()

    assert torch.equal(prog("cpu"), prog("remote_accelerator:0"))
