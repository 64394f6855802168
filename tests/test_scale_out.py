"""Plans over several `genie serve` servers move tensors between the servers directly
(Note: [Server-to-server moves]): results equal eager, the activations a plan moves do not
cross the client's links (a byte-counting proxy in front of each server shows it), a model
larger than one server's memory limit runs split, a server without the shared token cannot
join a group, and a group that cannot form falls back to moving through the client."""

from __future__ import annotations

import contextlib
import copy
import logging
import secrets
import socket
import threading
import time

import pytest
import torch
from fakes import REMOTE, gpt2
from remote_fixtures import RawClient, healthy
from torch import nn

import genie
from genie.errors import TransportError
from genie.runtime.executor import install_executor, use_local
from genie.runtime.loopback import LoopbackServer
from genie.runtime.multi_device import ExecutorBackend, MultiDeviceExecutor
from genie.runtime.remote import RemoteExecutor
from genie.scheduler import DeviceSpec, NetworkTopology, Scheduler

pytest_plugins = ["remote_fixtures"]


def _ids():
    return torch.randint(0, 500, (2, 12), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def pair():
    """Two servers that share one token (a cluster's), same threads as this process."""
    token = secrets.token_hex(16)
    threads = torch.get_num_threads()
    with (
        LoopbackServer(token=token, threads=threads) as s0,
        LoopbackServer(token=token, threads=threads) as s1,
    ):
        yield s0, s1


def _split_over(servers, *, direct: bool) -> MultiDeviceExecutor:
    topo = NetworkTopology()
    names = [f"s{i}" for i in range(len(servers))]
    for name in names:
        topo.add_device(name, DeviceSpec.cpu(cores=2, memory_bytes=8 << 30))
        topo.add_link("client", name, bandwidth_gbps=10.0, latency_us=20)
    topo.add_link(names[0], names[1], bandwidth_gbps=10.0, latency_us=20)
    backends = {
        # No speculative runs: their requests depend on timing, and bytes are compared here.
        name: ExecutorBackend(name, RemoteExecutor(srv.address, srv.token, speculate=False))
        for name, srv in zip(names, servers, strict=True)
    }
    ex = MultiDeviceExecutor(
        backends,
        topology=topo,
        scheduler=Scheduler(network_topology=topo, strategy="pipeline"),
        direct=direct,
    )
    install_executor(ex)
    return ex


def _client_bytes(ex: MultiDeviceExecutor) -> int:
    total = 0
    for b in ex.backends.values():
        stats = b.executor.stats()
        total += stats["bytes_sent"] + stats["bytes_received"]
    return total


def _forward_twice(ex, model, ids):
    """The second forward of a split GPT-2 with a new input: (logits, bytes over the client's
    links during it, bytes the servers moved directly during it, the input)."""
    rmodel = copy.deepcopy(model).to(REMOTE)
    rmodel(ids.to(REMOTE)).logits.cpu()
    before, direct_before = _client_bytes(ex), ex.stats["direct_bytes"]
    ids2 = ids.flip(1)
    out = rmodel(ids2.to(REMOTE)).logits.cpu()
    return out, _client_bytes(ex) - before, ex.stats["direct_bytes"] - direct_before, ids2


@torch.no_grad()
def test_a_split_model_moves_activations_between_servers_not_through_the_client(pair):
    model = gpt2()
    ids = _ids()
    results = {}
    for direct in (False, True):
        ex = _split_over(pair, direct=direct)
        try:
            out, client_bytes, moved, ids2 = _forward_twice(ex, model, ids)
            assert torch.equal(out, model(ids2).logits)
            assert {f.device for f in ex.last_plan.fragments} == {"s0", "s1"}
            results[direct] = (client_bytes, moved)
        finally:
            genie.synchronize()
            use_local()
            ex.close()
    (relayed, _), (direct, moved) = results[False], results[True]
    assert moved > 0  # the second forward moved its activations between the servers
    # The relay carried each moved storage through the client twice (down, then up); the
    # direct plan does not carry it at all: at least twice the moved bytes are saved (less
    # the few hundred bytes of the move requests themselves).
    assert relayed - direct >= 2 * moved - 1024, (relayed, direct, moved)


def test_a_server_without_the_shared_token_cannot_join_a_group(pair):
    s0, _ = pair
    with LoopbackServer(token=secrets.token_hex(16)) as stranger:
        a = RawClient(s0.address, s0.token)
        b = RawClient(stranger.address, stranger.token)
        port = a.request({"t": "peer_open", "group": "g1", "role": "listen", "backend": "gloo"})
        assert port["ok"] is True
        reply = b.request(
            {"t": "peer_open", "group": "g1", "role": "join", "backend": "gloo",
             "peer": f"127.0.0.1:{port['port']}"}
        )  # fmt: skip
        assert reply["ok"] is False and reply["kind"] == "peer", reply
        assert "token" in reply["msg"]
        # the listener's session says so too when asked to move, and both servers go on
        moved = a.request({"t": "peer_send", "group": "g1", "id": 1, "tag": 1})
        assert moved["ok"] is False
        assert a.request({"t": "stats"})["ok"] and b.request({"t": "stats"})["ok"]
        a.close()
        b.close()


@torch.no_grad()
def test_servers_that_cannot_form_a_group_move_through_the_client(caplog):
    """Two servers with different tokens: the plan still runs, moving through the client, and
    a warning says why."""
    model = gpt2()
    ids = _ids()
    threads = torch.get_num_threads()
    with LoopbackServer(threads=threads) as s0, LoopbackServer(threads=threads) as s1:
        ex = _split_over((s0, s1), direct=True)
        try:
            with caplog.at_level(logging.WARNING, logger="genie.runtime.remote.peers"):
                out = copy.deepcopy(model).to(REMOTE)(ids.to(REMOTE)).logits.cpu()
        finally:
            genie.synchronize()
            use_local()
            ex.close()
    assert torch.equal(out, model(ids).logits)
    assert ex.stats["direct_transfers"] == 0 and ex.last_plan.transfers
    assert "through this process" in caplog.text


@torch.no_grad()
def test_a_server_killed_mid_plan_is_a_clear_error_and_the_other_goes_on():
    """Kill one of two servers between forwards: the next forward raises a TransportError
    naming what to do within seconds, and the surviving server still serves a new session."""
    model = gpt2()
    ids = _ids()
    token = secrets.token_hex(16)
    threads = torch.get_num_threads()
    with LoopbackServer(token=token, threads=threads, extra_args=["--peer-timeout", "5"]) as s0:
        s1 = LoopbackServer(token=token, threads=threads, extra_args=["--peer-timeout", "5"])
        ex = _split_over((s0, s1), direct=True)
        try:
            rmodel = copy.deepcopy(model).to(REMOTE)
            assert torch.equal(rmodel(ids.to(REMOTE)).logits.cpu(), model(ids).logits)
            s1.kill()
            started = time.monotonic()
            with pytest.raises(TransportError):
                rmodel(ids.to(REMOTE)).logits.cpu()
            assert time.monotonic() - started < 20
        finally:
            genie.synchronize()
            use_local()
            ex.close()
            s1.close()
        healthy(s0)


@torch.no_grad()
def test_a_greedy_decode_split_over_two_servers_equals_eager(pair):
    """16 greedy steps of a GPT-2 pipelined over two servers: the tokens are eager's, each
    layer's KV cache stays on the server that holds the layer (it is never moved), and the
    servers moved activations between themselves."""
    model = gpt2()
    ids = _ids()
    ex = _split_over(pair, direct=True)
    try:
        got = _decode_split(ex, model, ids, 16)
        assert ex.stats["direct_transfers"] > 0
    finally:
        genie.synchronize()
        use_local()
        ex.close()
    assert torch.equal(got, _decode_eager(model, ids, 16))


def _decode_eager(model, ids, steps: int) -> torch.Tensor:
    ref, past, tok = [], None, ids
    for _ in range(steps):
        out = model(tok, past_key_values=past, use_cache=True)
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        ref.append(tok)
    return torch.cat(ref, 1)


def _decode_split(ex, model, ids, steps: int) -> torch.Tensor:
    """Greedy decode through the split executor `ex`; asserts each step's plan moves none of
    the KV caches it reads (they stay with the layer's server). Returns the tokens."""
    rmodel = copy.deepcopy(model).to(REMOTE)
    got, past, tok = [], None, ids.to(REMOTE)
    for _ in range(steps):
        caches = set()
        if past is not None:  # the caches this step reads: last step's
            caches = {
                int(genie._C._storage_id(t))
                for layer in past.layers
                for t in (layer.keys, layer.values)
            }
        out = rmodel(tok, past_key_values=past, use_cache=True)
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        got.append(tok.cpu())
        assert not {t.storage for t in ex.last_plan.transfers} & caches  # never moved
    return torch.cat(got, 1)


@torch.no_grad()
def test_connect_to_several_servers_schedules_over_what_they_report(pair):
    """genie.connect([a, b]) opens a session with each server and schedules every flush over
    them, each server described by what it reports (its device and memory)."""
    s0, s1 = pair
    model = gpt2(n_layer=4)
    ids = _ids()
    ex = genie.connect([s0.address, s1.address], token=s0.token)
    try:
        specs = [ex.topology.spec(name) for name in ex.backends]
        assert all(spec.kind == "cpu" and spec.memory_bytes > 0 for spec in specs)
        out = copy.deepcopy(model).to(REMOTE)(ids.to(REMOTE)).logits.cpu()
    finally:
        genie.disconnect()
    assert torch.equal(out, model(ids).logits)


class ByteCountingProxy:
    """A TCP proxy in front of one server: two threads per connection forward bytes and count
    them, ``up`` (client to server) and ``down`` (server to client). Servers reach each other
    directly (their groups' own ports), so only the client's traffic passes here."""

    def __init__(self, target: str):
        host, _, port = target.rpartition(":")
        self._target = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self.up = 0
        self.down = 0
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self._target)
            self._sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server, "up"), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, "down"), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        try:
            while data := src.recv(1 << 16):
                with self._lock:
                    setattr(self, direction, getattr(self, direction) + len(data))
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def counts(self) -> tuple[int, int]:
        with self._lock:
            return self.up, self.down

    def close(self) -> None:
        self._listener.close()
        for s in self._sockets:
            with contextlib.suppress(OSError):
                s.close()


def _connect_split(addresses, token) -> MultiDeviceExecutor:
    """genie.connect to several servers, planned as a pipeline (layers split over them)."""
    ex = genie.connect(list(addresses), token=token)
    ex.scheduler.strategy = "pipeline"
    return ex


@torch.no_grad()
def test_no_activation_crosses_the_client_links(pair):
    """A byte-counting proxy in front of each server: during a second forward of a model split
    over two servers, the client's links carry the new input, the program requests and the
    fetched logits, and fewer bytes than one hidden state on top of those; the servers moved
    the hidden states between themselves."""
    model = gpt2(n_layer=4, n_embd=256)
    proxies = [ByteCountingProxy(s.address) for s in pair]
    ex = _connect_split([p.address for p in proxies], pair[0].token)
    try:
        rmodel = copy.deepcopy(model).to(REMOTE)
        ids = torch.randint(0, 500, (2, 32), generator=torch.Generator().manual_seed(5))
        assert torch.equal(rmodel(ids.to(REMOTE)).logits.cpu(), model(ids).logits)
        assert {f.device for f in ex.last_plan.fragments} == {"server0", "server1"}
        before = [p.counts() for p in proxies]
        moved_before = ex.stats["direct_bytes"]
        ids2 = ids.flip(1)
        out = rmodel(ids2.to(REMOTE)).logits
        got = out.cpu()
        genie.synchronize()
        after = [p.counts() for p in proxies]
        moved = ex.stats["direct_bytes"] - moved_before
    finally:
        genie.disconnect()
        for p in proxies:
            p.close()
    assert torch.equal(got, model(ids2).logits)
    up = sum(a[0] - b[0] for a, b in zip(after, before, strict=True))
    down = sum(a[1] - b[1] for a, b in zip(after, before, strict=True))
    hidden = ids.numel() * 256 * 4  # one hidden state between layers, float32
    inputs, outputs = ids2.numel() * ids2.element_size(), got.numel() * got.element_size()
    assert moved >= hidden  # the activations went from server to server
    # Sent: the input and the requests (programs by key and binding), never a hidden state.
    assert inputs <= up < inputs + hidden, (up, inputs, hidden)
    # Received: the logits and the replies, never a hidden state.
    assert outputs <= down < outputs + hidden, (down, outputs, hidden)


@torch.no_grad()
@pytest.mark.parametrize(("width", "tokens"), [(128, 8), (384, 128)])
def test_a_model_larger_than_one_servers_memory_limit_runs_split(width, tokens):
    """Two servers that may each hold 70% of a model's weights (genie serve --memory-limit):
    the model runs split over both, equal to eager; its weights stay where they were placed,
    so a second forward with a new input uploads that input and nothing else. At 128 tokens
    the activations of the layers a server runs outgrow what it has left beside its weights:
    each is freed on its server once its last reader ran (Note: [What a device holds])."""
    model = gpt2(n_layer=4, n_embd=width)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    limit = str(int(weights * 0.7))
    token = secrets.token_hex(16)
    threads = torch.get_num_threads()
    with (
        LoopbackServer(token=token, threads=threads, memory_limit=limit) as s0,
        LoopbackServer(token=token, threads=threads, memory_limit=limit) as s1,
    ):
        ex = genie.connect([s0.address, s1.address], token=token)
        try:
            rmodel = copy.deepcopy(model).to(REMOTE)
            ids = torch.randint(0, 500, (1, tokens), generator=torch.Generator().manual_seed(7))
            assert torch.equal(rmodel(ids.to(REMOTE)).logits.cpu(), model(ids).logits)
            clients = [b.executor for b in ex.backends.values()]
            held = [c.server_stats()["session"]["resident_bytes"] for c in clients]
            uploaded = sum(c.stats()["upload_bytes"] for c in clients)
            ids2 = ids.flip(1)
            out = rmodel(ids2.to(REMOTE)).logits.cpu()
            uploaded = sum(c.stats()["upload_bytes"] for c in clients) - uploaded
            used = {f.device for f in ex.last_plan.fragments}
        finally:
            genie.disconnect()
        healthy(s0)
        healthy(s1)
    assert torch.equal(out, model(ids2).logits)
    assert used == {"server0", "server1"}
    assert all(0 < h <= int(limit) for h in held), (held, limit)  # both hold a part
    assert sum(held) >= weights
    assert uploaded == ids2.numel() * ids2.element_size()


class _TwoTowers(nn.Module):
    """Two modality encoders joined by a head: independent branches until the concatenation."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.image = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU())
        self.text = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU())
        self.head = nn.Linear(256, 10)

    def forward(self, image, text):
        return self.head(torch.cat([self.image(image), self.text(text)], -1))


class _MeetsTheOther(ExecutorBackend):
    """A server whose `at`-th fragment waits until the other server reached its own meeting
    point too: a plan that ran the two one after the other would break the barrier."""

    def __init__(self, backend: ExecutorBackend, barrier: threading.Barrier, at: int = 1):
        super().__init__(backend.name, backend.executor)
        self._barrier = barrier
        self._countdown = at

    def run(self, nodes) -> None:
        if nodes and self._countdown:
            self._countdown -= 1
            if not self._countdown:
                self._barrier.wait(timeout=30)
        super().run(nodes)


def _meeting(ex: MultiDeviceExecutor, at: dict[str, int]) -> threading.Barrier:
    barrier = threading.Barrier(len(at))
    for name, n in at.items():
        ex.backends[name] = _MeetsTheOther(ex.backends[name], barrier, n)
    return barrier


@torch.no_grad()
def test_modality_branches_run_on_two_servers_at_once(pair):
    """The parallel strategy puts each branch on its own server; both servers work at the same
    time (each one's first fragment waits for the other's to start), the result equals eager,
    and the branch's output moves between the servers."""
    model = _TwoTowers().eval()
    image, text = torch.randn(8, 64), torch.randn(8, 32)
    ex = genie.connect([s.address for s in pair], token=pair[0].token)
    ex.scheduler.strategy = "parallel"
    barrier = _meeting(ex, {"server0": 1, "server1": 1})
    try:
        rmodel = copy.deepcopy(model).to(REMOTE)
        out = rmodel(image.to(REMOTE), text.to(REMOTE)).cpu()
        plan = ex.last_plan
    finally:
        genie.disconnect()
    assert torch.equal(out, model(image, text))
    assert not barrier.broken
    first = {d: plan.fragments_on(d)[0] for d in ("server0", "server1")}
    assert not first["server0"].deps and not first["server1"].deps  # neither waits
    assert ex.stats["direct_transfers"] == len(plan.transfers) > 0


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(128, 128), nn.ReLU())]).eval()


@torch.no_grad()
def test_slices_of_a_batch_flow_through_two_servers_as_micro_batches(pair):
    """A program that runs a model over four slices of its batch, pipelined over two servers:
    the first server works on slice 2 while the second works on slice 1 (they meet), each
    server holds only its stage's weights, and the result equals eager."""
    model, x = _mlp(), torch.randn(16, 128)
    ex = _connect_split([s.address for s in pair], pair[0].token)
    barrier = _meeting(ex, {"server0": 2, "server1": 1})
    try:
        rmodel = copy.deepcopy(model).to(REMOTE)
        out = torch.cat([rmodel(xi) for xi in x.to(REMOTE).chunk(4)]).cpu()
        plan, schedule = ex.last_plan, ex.last_schedule
        params = {int(genie._C._storage_id(p)) for p in rmodel.parameters()}
    finally:
        genie.disconnect()
    assert torch.equal(out, torch.cat([model(xi) for xi in x.chunk(4)]))
    assert barrier.n_waiting == 0 and not barrier.broken
    assert schedule.micro_batches == 4 and plan.flags["sliced"]
    on = [set(plan.uploads[d]) & params for d in ("server0", "server1")]
    assert on[0] and on[1] and not on[0] & on[1]


@torch.no_grad()
def test_data_parallel_over_two_servers_keeps_the_weights_on_both(pair):
    """strategy="data" with a program that runs each half of its batch: both servers work at
    once (they meet), each holds the weights, a second call uploads only the new batch (each
    server its half) and its plan moves no weight, and the result equals eager."""
    model = _mlp()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    ex = genie.connect([s.address for s in pair], token=pair[0].token)
    ex.scheduler.strategy = "data"
    barrier = _meeting(ex, {"server0": 1, "server1": 1})
    clients = [b.executor for b in ex.backends.values()]
    try:
        rmodel = copy.deepcopy(model).to(REMOTE)

        def forward(x):
            return torch.cat([rmodel(xi.to(REMOTE)) for xi in x.chunk(2)]).cpu()

        x = torch.randn(16, 128)
        assert torch.equal(forward(x), torch.cat([model(xi) for xi in x.chunk(2)]))
        held = [c.server_stats()["session"]["resident_bytes"] for c in clients]
        uploaded = [c.stats()["upload_bytes"] for c in clients]
        x2 = torch.randn(16, 128)
        out = forward(x2)
        uploaded = [c.stats()["upload_bytes"] - u for c, u in zip(clients, uploaded, strict=True)]
        moved = {t.storage for t in ex.last_plan.transfers}
        params = {int(genie._C._storage_id(p)) for p in rmodel.parameters()}
    finally:
        genie.disconnect()
    assert torch.equal(out, torch.cat([model(xi) for xi in x2.chunk(2)]))
    assert not barrier.broken
    assert all(h >= weights for h in held), (held, weights)
    assert uploaded == [x2.numel() * 4 // 2] * 2
    assert moved and not moved & params  # the plan moves a slice's result, never a weight


@torch.no_grad()
def test_a_model_split_over_three_servers_equals_eager():
    """Three servers, one pipeline stage each: the result equals eager, every server runs a
    stage, and every activation the plan moves goes from server to server; a 16-step greedy
    decode over the same three gives eager's tokens, each layer's KV cache never moved."""
    model = gpt2(n_layer=6)
    ids = _ids()
    token = secrets.token_hex(16)
    threads = torch.get_num_threads()
    with contextlib.ExitStack() as stack:
        servers = [
            stack.enter_context(LoopbackServer(token=token, threads=threads)) for _ in range(3)
        ]
        ex = _connect_split([s.address for s in servers], token)
        try:
            out = copy.deepcopy(model).to(REMOTE)(ids.to(REMOTE)).logits.cpu()
            plan = ex.last_plan
            moved = ex.stats["direct_transfers"]
            tokens = _decode_split(ex, model, ids, 16)  # each layer's cache stays where it is
            decode_devices = {f.device for f in ex.last_plan.fragments}
        finally:
            genie.synchronize()
            genie.disconnect()
    assert torch.equal(out, model(ids).logits)
    assert {f.device for f in plan.fragments} == {"server0", "server1", "server2"}
    assert moved == len(plan.transfers) > 0
    assert torch.equal(tokens, _decode_eager(model, ids, 16))
    assert decode_devices == {"server0", "server1", "server2"}
