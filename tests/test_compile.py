"""torch.compile(model, backend="genie"): compiled models give eager's bits, in this process and
through a loopback server; the program crosses the wire once and parameters are uploaded once."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from fakes import bert, gpt2, resnet, vit
from torch import nn

import genie
from genie.runtime.loopback import LoopbackServer
from genie.runtime.remote import connect


@pytest.fixture(scope="module")
def server():
    """A loopback `genie serve` with this process's thread count (the same reduction order)."""
    srv = LoopbackServer(threads=torch.get_num_threads())
    yield srv
    srv.close()


@pytest.fixture(params=["local", "loopback"])
def where(request):
    """(compile options, the session or None): each test runs in process and on a server."""
    torch._dynamo.reset()
    if request.param == "local":
        yield None, None
    else:
        srv = request.getfixturevalue("server")
        client = connect(srv.address, token=srv.token, install=False)
        try:
            yield {"server": client}, client
        finally:
            client.close()
    torch._dynamo.reset()


def _ids(batch=2, seq=12, seed=1):
    return torch.randint(0, 500, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _images(seed=1):
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _first(out):
    if isinstance(out, torch.Tensor):
        return out
    return out[0]


MODELS = {
    "gpt2": (gpt2, _ids, {"use_cache": False}),
    "bert": (bert, _ids, {}),
    "vit": (vit, _images, {}),
    "resnet": (resnet, _images, {}),
}


@pytest.mark.parametrize("name", sorted(MODELS))
@torch.no_grad()
def test_inference_equals_eager(where, name):
    """Two calls with fresh inputs give eager's bits; through a server the program is sent
    once and the second call uploads only its input (the weights stay resident)."""
    options, client = where
    build, make_input, kwargs = MODELS[name]
    model = build()
    compiled = torch.compile(model, backend="genie", options=options)
    x1, x2 = make_input(seed=1), make_input(seed=2)
    assert torch.equal(_first(compiled(x1, **kwargs)), _first(model(x1, **kwargs)))
    if client is not None:
        sent, uploaded = client.counters["programs_sent"], client.counters["upload_bytes"]
        assert sent == 1
    assert torch.equal(_first(compiled(x2, **kwargs)), _first(model(x2, **kwargs)))
    if client is not None:
        assert client.counters["programs_sent"] == sent, "the program was sent again"
        assert client.counters["upload_bytes"] - uploaded == x2.numel() * x2.element_size()


@torch.no_grad()
def test_tensors_changed_between_calls_are_sent_again(where):
    """Once a call finds the weights and the input held, a weight or the input changed in
    place, or a weight replaced by a new tensor, is uploaded again and nothing else is: each
    result is eager's."""
    options, client = where
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    compiled = torch.compile(model, backend="genie", options=options)
    x = torch.randn(3, 8)

    def uploaded_by(change) -> int:
        change()
        before = client.counters["upload_bytes"] if client is not None else 0
        assert torch.equal(compiled(x), model(x))
        return client.counters["upload_bytes"] - before if client is not None else 0

    for _ in range(3):
        uploaded_by(lambda: None)
    w = model[0].weight
    changes = [
        (lambda: None, 0),
        (lambda: w.mul_(2), w.numel() * 4),
        (lambda: x.add_(1), x.numel() * 4),
        (lambda: setattr(model[2], "weight", nn.Parameter(torch.randn(4, 16))), 4 * 16 * 4),
        (lambda: None, 0),
    ]
    for change, nbytes in changes:
        sent = uploaded_by(change)
        if client is not None:
            assert sent == nbytes


def test_the_native_version_check_sees_writes_replacements_and_bad_arguments():
    """``_C.VersionCheck`` (Note: [Checking what was found]): the same tensors at the same
    versions hold; an in-place write, another tensor in the place, a shorter list or an
    inference tensor (which keeps no version) do not; bad picks are refused when it is made."""
    from genie import _C

    params = [nn.Parameter(torch.randn(3)) for _ in range(4)]
    args = [torch.randn(2), *params]
    check = _C.VersionCheck(args, [1, 2, 3, 4])
    assert len(check) == 4 and check.holds(args) and check.holds(list(args))
    assert not check.holds([args[0], params[0], torch.randn(3), *params[2:]])
    assert not check.holds(args[:3])
    with torch.no_grad():
        params[2].add_(1)
    assert not check.holds(args)
    with torch.inference_mode():
        frozen = torch.randn(3)
    assert not _C.VersionCheck([frozen], [0]).holds([frozen])
    with pytest.raises(IndexError):
        _C.VersionCheck(args, [9])
    with pytest.raises(TypeError):
        _C.VersionCheck([1.5], [0])


class _Breaky(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        h = self.a(x).relu()
        print("a graph break", end="")  # noqa: T201 - Dynamo cannot trace print: two graphs
        return self.b(h).softmax(-1)


@torch.no_grad()
def test_graph_break_runs_each_subgraph(where, capsys):
    """A graph break splits the model into two programs; the result is eager's."""
    options, client = where
    torch.manual_seed(0)
    model = _Breaky().eval()
    compiled = torch.compile(model, backend="genie", options=options)
    for seed in (1, 2):
        x = torch.randn(3, 8, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(compiled(x), model(x))
    assert "a graph break" in capsys.readouterr().out
    if client is not None:
        assert client.counters["programs_sent"] == 2


def test_training_steps_equal_eager(where):
    """Three SGD steps of a ResNet-style CNN in training mode (batch norm statistics
    updated): losses, gradients, parameters and running statistics equal eager's bits; the
    forward and backward graphs run as programs, the optimizer step runs eagerly. Through a
    server the activations saved for backward stay there: a step brings back the gradients
    and little else, and the session holds no more after the third step than after the
    second."""
    options, client = where
    ref = resnet().train()
    model = copy.deepcopy(ref)
    compiled = torch.compile(model, backend="genie", options=options)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(3)
    state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    held = []
    for _ in range(3):
        x, y = torch.randn(4, 3, 32, 32, generator=gen), torch.randint(0, 10, (4,), generator=gen)
        fetched = client.counters["fetch_bytes"] if client is not None else 0
        losses = []
        for m, o in ((ref, opt_ref), (compiled, opt)):
            loss = nn.functional.cross_entropy(m(x), y)
            loss.backward()
            o.step()
            o.zero_grad()
            losses.append(loss)
        assert torch.equal(losses[0], losses[1])
        if client is not None:
            assert client.counters["fetch_bytes"] - fetched < state_bytes + (16 << 10)
            held.append(client.server_stats()["session"]["resident_bytes"])
    if client is not None:
        assert held[2] == held[1], "saved activations of finished steps are still held"
    for a, b in zip(ref.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    if client is not None:
        assert client.counters["programs_sent"] == 2  # forward and backward, once each


def _train_step(model, opt, x, y):
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss


OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
    "adamw": lambda params: torch.optim.AdamW(params, lr=0.01),
}


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_compiled_train_step_runs_the_optimizer_there(where, optimizer):
    """torch.compile of a whole training step (forward, loss, backward, optimizer.step(),
    zero_grad()) of a ResNet-style CNN: losses, parameters and optimizer state equal what
    PyTorch's own torch.compile (aot_eager: the same aten graphs run eagerly) gives, bit for
    bit, and eager within rounding (SGD: bit for bit). Through a server the optimizer step runs
    there on what it holds: after the first step a step uploads its batch and nothing of the
    parameters, gradients or optimizer state."""
    options, client = where
    make_opt = OPTIMIZERS[optimizer]
    models = [resnet().train() for _ in range(3)]  # eager, aot_eager, genie
    opts = [make_opt(m.parameters()) for m in models]
    steps = [
        _train_step,
        torch.compile(_train_step, backend="aot_eager"),
        torch.compile(_train_step, backend="genie", options=options),
    ]
    gen = torch.Generator().manual_seed(3)
    for n in range(3):
        x, y = torch.randn(4, 3, 32, 32, generator=gen), torch.randint(0, 10, (4,), generator=gen)
        uploaded = client.counters["upload_bytes"] if client is not None else 0
        losses = [step(m, o, x, y) for step, m, o in zip(steps, models, opts, strict=True)]
        assert torch.equal(losses[2], losses[1])
        torch.testing.assert_close(losses[2], losses[0])
        if client is not None and n > 0:
            batch = x.numel() * x.element_size() + y.numel() * y.element_size()
            assert client.counters["upload_bytes"] - uploaded < batch + (8 << 10)
    compiled_ref, model = models[1], models[2]
    for a, b in zip(compiled_ref.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(opts[1].state.values(), opts[2].state.values(), strict=True):
        for k in a:
            assert torch.equal(a[k], b[k]), k
    if optimizer == "sgd":
        for a, b in zip(models[0].state_dict().values(), model.state_dict().values(), strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_deferred_host_copies_keep_training_state_on_the_server(server, optimizer):
    """options={"defer_host_copies": True}: a compiled training step (SGD with momentum,
    AdamW) leaves parameters, gradients, batch norm statistics and optimizer state on the
    server; a step sends its batch (and the loss's seed gradient) and brings back its loss,
    nothing else. Until genie.compile.synchronize() the host's copies read NaN (never silently
    old values); afterwards they equal PyTorch's own compiled step bit for bit, and training
    goes on from there."""
    torch._dynamo.reset()
    client = connect(server.address, token=server.token, install=False)
    try:
        ref, model = resnet().train(), resnet().train()
        opt_ref = OPTIMIZERS[optimizer](ref.parameters())
        opt = OPTIMIZERS[optimizer](model.parameters())
        ref_step = torch.compile(_train_step, backend="aot_eager")
        options = {"server": client, "defer_host_copies": True}
        step = torch.compile(_train_step, backend="genie", options=options)
        gen = torch.Generator().manual_seed(3)
        for n in range(5):
            x = torch.randn(4, 3, 32, 32, generator=gen)
            y = torch.randint(0, 10, (4,), generator=gen)
            sent, got = client.counters["upload_bytes"], client.counters["fetch_bytes"]
            assert torch.equal(step(model, opt, x, y), ref_step(ref, opt_ref, x, y))
            if n > 0:
                batch = x.numel() * x.element_size() + y.numel() * y.element_size()
                # and the backward's 4-byte seed gradient of the loss
                assert batch <= client.counters["upload_bytes"] - sent <= batch + 4
                assert client.counters["fetch_bytes"] - got < 1024
            if n == 2:
                assert torch.isnan(model.stem[0].weight).all()
                assert genie.compile.synchronize() > 0
                for a, b in zip(
                    ref.state_dict().values(), model.state_dict().values(), strict=True
                ):
                    assert torch.equal(a, b)
        genie.compile.synchronize()
        for a, b in zip(ref.state_dict().values(), model.state_dict().values(), strict=True):
            assert torch.equal(a, b)
        for a, b in zip(opt_ref.state.values(), opt.state.values(), strict=True):
            for k in a:
                assert torch.equal(a[k], b[k]), k
    finally:
        client.close()
        torch._dynamo.reset()


def test_deferred_host_copies_need_a_server():
    torch._dynamo.reset()
    options = {"server": "local", "defer_host_copies": True}
    compiled = torch.compile(nn.Linear(2, 2), backend="genie", options=options)
    with pytest.raises(Exception, match="defer_host_copies is for a server"):
        compiled(torch.randn(1, 2))


@torch.no_grad()
def test_dynamic_shapes_one_program_per_shape(where):
    """dynamic=True: each new batch size records one program; a size seen before reuses it."""
    options, client = where
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.LayerNorm(8)).eval()
    compiled = torch.compile(model, backend="genie", options=options, dynamic=True)
    for n in (2, 3, 5, 3, 2):
        x = torch.randn(n, 8)
        assert torch.equal(compiled(x), model(x))
    if client is not None:
        assert client.counters["programs_sent"] == 3


@torch.no_grad()
def test_generate_with_static_cache(where):
    """HF generate() on a compiled forward with StaticCache gives eager's tokens, twice (the
    cache is reset in between). Through a server the cache is written in place there: a
    generation uploads it about once, not once per token."""
    options, client = where
    model = gpt2()
    ids = _ids(batch=1, seq=6)
    kw = {"max_new_tokens": 5, "do_sample": False, "cache_implementation": "static"}
    ref = model.generate(ids, pad_token_id=0, **kw)
    model.forward = torch.compile(model.forward, backend="genie", options=options)
    assert torch.equal(model.generate(ids, pad_token_id=0, **kw), ref)
    uploaded = client.counters["upload_bytes"] if client is not None else 0
    assert torch.equal(model.generate(ids, pad_token_id=0, **kw), ref)
    if client is not None:
        cfg = model.config
        cache_bytes = 2 * cfg.n_layer * (6 + 5) * cfg.n_embd * 4  # keys and values, float32
        assert client.counters["upload_bytes"] - uploaded < 2 * cache_bytes


def test_dropout_draws_fresh_numbers_each_call(where):
    """Dropout in training mode: each call draws a fresh mask (about half the values zeroed,
    the rest scaled by 2), the same one again after torch.manual_seed; gradients flow."""
    options, _ = where
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.Dropout(0.5)).train()
    compiled = torch.compile(model, backend="genie", options=options)
    x = torch.randn(32, 64)
    torch.manual_seed(5)
    a = compiled(x)
    torch.manual_seed(5)
    assert torch.equal(compiled(x), a)
    assert not torch.equal(compiled(x), a)
    assert 0.4 < (a == 0).float().mean().item() < 0.6
    kept = a != 0
    assert torch.allclose(a[kept], (model[0](x) * 2)[kept])
    a.sum().backward()
    assert model[0].weight.grad.abs().sum() > 0


def test_unknown_option_is_named():
    torch._dynamo.reset()
    compiled = torch.compile(nn.Linear(2, 2), backend="genie", options={"sever": "x"})
    with pytest.raises(Exception, match="unknown option.*sever"):
        compiled(torch.randn(1, 2))


def test_backend_found_by_name_without_importing_dynamo_at_import():
    """`import genie` leaves torch._dynamo unloaded; torch.compile finds "genie" by name
    (the torch_dynamo_backends entry point)."""
    code = (
        "import sys, genie; assert 'torch._dynamo' not in sys.modules; "
        "import torch._dynamo; assert 'genie' in torch._dynamo.list_backends()"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert "genie" in torch._dynamo.list_backends()
    assert genie.compile.genie_backend is not None


@torch.no_grad()
def test_server_option_and_connected_session(server):
    """options={"server": "host:port", "token": ...} opens a session of its own; with no
    options, programs go to the session genie.connect installed."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh()).eval()
    x = torch.randn(2, 8)
    options = {"server": server.address, "token": server.token}
    assert torch.equal(torch.compile(model, backend="genie", options=options)(x), model(x))
    torch._dynamo.reset()
    client = genie.connect(server.address, token=server.token)
    try:
        assert torch.equal(torch.compile(model, backend="genie")(x), model(x))
        assert client.counters["programs_sent"] == 1
    finally:
        genie.disconnect()
        torch._dynamo.reset()


@torch.no_grad()
def test_server_without_the_program_gets_its_body_again(server):
    """A server that does not have a program the client believes it sent (another server
    behind the same name, a cache that evicted it) is sent the body again; the result is
    still eager's."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU()).eval()
    x = torch.randn(2, 8)
    with LoopbackServer(threads=torch.get_num_threads()) as other:
        client = connect(other.address, token=other.token, install=False)
        try:
            compiled = torch.compile(model, backend="genie", options={"server": client})
            assert torch.equal(compiled(x), model(x))
            first = connect(server.address, token=server.token, install=False)
            try:
                # The first server is told nothing: its client only believes it has the
                # programs the other server checked.
                for key in client.namer.sent:
                    first.namer.checked(key)
                torch._dynamo.reset()
                compiled = torch.compile(model, backend="genie", options={"server": first})
                assert torch.equal(compiled(x), model(x))
                assert first.counters["programs_sent"] == 1
            finally:
                first.close()
        finally:
            client.close()
            torch._dynamo.reset()


@torch.no_grad()
def test_a_session_its_owner_closed_is_not_the_default_server(server):
    """genie.connect installs a session; once its owner closes it (client.close(), not
    genie.disconnect()), torch.compile's default is the local executor again, not a closed
    connection."""
    torch._dynamo.reset()
    client = connect(server.address, token=server.token)
    client.close()
    genie.configure(local_device="cpu")
    model = nn.Linear(8, 4)
    x = torch.randn(2, 8)
    assert torch.equal(torch.compile(model, backend="genie")(x), model(x))
