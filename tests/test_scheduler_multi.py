"""Multi-fragment plans run by MultiDeviceExecutor over several devices (here: several CPU
environments) give exactly what one device gives."""

from __future__ import annotations

import copy

import pytest
import torch
from fakes import REMOTE, gpt2, resnet
from torch import nn

import genie
from genie import _C
from genie.runtime.backends import EnvironmentBackend
from genie.runtime.executor import PythonExecutor, install_executor, use_local
from genie.runtime.multi_device import MultiDeviceExecutor
from genie.scheduler import (
    AdaptiveOptimizer,
    DeviceSpec,
    GraphCostEstimator,
    NetworkTopology,
    Scheduler,
)


def cpu_topology(
    n: int = 2, *, memory: int | None = None, link_gbps: float = 80.0, client_gbps: float = 160.0
) -> NetworkTopology:
    topo = NetworkTopology()
    names = [f"cpu{i}" for i in range(n)]
    for name in names:
        topo.add_device(name, DeviceSpec.cpu(cores=2, memory_bytes=memory or 8 << 30))
        topo.add_link("client", name, bandwidth_gbps=client_gbps, latency_us=2)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            topo.add_link(a, b, bandwidth_gbps=link_gbps, latency_us=5)
    return topo


@pytest.fixture
def multi():
    """Installs a MultiDeviceExecutor over CPU environments named as the topology's devices."""

    def make(topology: NetworkTopology, strategy="auto", **kwargs) -> MultiDeviceExecutor:
        scheduler = Scheduler(
            GraphCostEstimator(),
            topology,
            strategy=strategy,
            optimizer=kwargs.pop("optimizer", None),
        )
        ex = MultiDeviceExecutor(
            {d: "cpu" for d in topology.device_names},
            topology=topology,
            scheduler=scheduler,
            **kwargs,
        )
        install_executor(ex)
        return ex

    yield make
    genie.synchronize()
    use_local()


def _ids(seed=1, batch=2, seq=8):
    return torch.randint(0, 500, (batch, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
@pytest.mark.parametrize("concurrent", [True, False])
def test_gpt2_prefill_and_decode_split_over_two_devices(multi, concurrent):
    model = gpt2()
    ids = _ids()
    ref = model(ids, use_cache=True)
    nxt_ref = ref.logits[:, -1].argmax(-1, keepdim=True)
    ref2 = model(nxt_ref, past_key_values=ref.past_key_values, use_cache=True)

    ex = multi(cpu_topology(2), strategy="pipeline", concurrent=concurrent)
    rmodel = copy.deepcopy(model).to(REMOTE)
    out = rmodel(ids.to(REMOTE), use_cache=True)
    assert torch.equal(out.logits.cpu(), ref.logits)
    plan = ex.last_plan
    assert {f.device for f in plan.fragments} == {"cpu0", "cpu1"} and plan.transfers

    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    cache = out.past_key_values
    homes = {
        int(_C._storage_id(t)): ex._home[int(_C._storage_id(t))]
        for layer in cache.layers
        for t in (layer.keys, layer.values)
    }
    assert set(homes.values()) == {"cpu0", "cpu1"}  # the pipeline left one layer on each
    out2 = rmodel(nxt, past_key_values=cache, use_cache=True)
    assert torch.equal(out2.logits.cpu(), ref2.logits)
    # Decode: the caches did not move, and every op reading one ran where it lives.
    plan = ex.last_plan
    assert not {t.storage for t in plan.transfers} & set(homes)
    device_of = {nid: f.device for f in plan.fragments for nid in f.node_ids}
    readers = [n for n in genie.last_graph().nodes if any(t.storage in homes for t in n.inputs)]
    assert len(readers) == len(homes)
    for n in readers:
        cache_home = next(homes[t.storage] for t in n.inputs if t.storage in homes)
        assert device_of[n.id] == cache_home


@torch.no_grad()
def test_tight_memory_forces_a_split_that_fits_and_computes_right(multi):
    model = gpt2(n_layer=4, n_embd=64, vocab=500, positions=64)
    ids = _ids(seq=16)
    ref = model(ids).logits
    # What one device needs at peak for this program, counted as the executor's devices
    # keep values: to the end of the flush (Note: [What a device holds])...
    rm = copy.deepcopy(model).to(REMOTE)
    rm(ids.to(REMOTE))
    graph = genie.get_graph()
    one = Scheduler(GraphCostEstimator(), cpu_topology(1)).create_schedule(graph, holds="flush")
    peak = one.peak_memory["cpu0"]
    genie.synchronize()
    # ...and two devices with 60% of that each: the scheduler must split, and fit.
    topo = cpu_topology(2, memory=int(0.6 * peak))
    ex = multi(topo, strategy="sequential")
    out = copy.deepcopy(model).to(REMOTE)(ids.to(REMOTE)).logits
    assert torch.equal(out.cpu(), ref)
    schedule = ex.last_schedule
    assert set(schedule.devices_used) == {"cpu0", "cpu1"}
    for d in ("cpu0", "cpu1"):
        assert 0 < schedule.peak_memory[d] <= schedule.memory_capacity[d]
    assert any(note.startswith("memory:") for note in schedule.notes)


@torch.no_grad()
@pytest.mark.parametrize("n", [2, 3])
def test_pipelined_cnn_equals_one_device(multi, n):
    model = resnet()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    ref = model(x)
    ex = multi(cpu_topology(n), strategy="pipeline")
    out = copy.deepcopy(model).to(REMOTE)(x.to(REMOTE))
    assert torch.equal(out.cpu(), ref)
    assert len({f.device for f in ex.last_plan.fragments}) == n


@torch.no_grad()
def test_recomputed_values_equal_moved_ones(multi):
    """Over a slow link the plan recomputes x.exp() next to its late consumer."""
    torch.manual_seed(0)
    x = torch.randn(256, 256)
    ws = [torch.randn(256, 256) / 16 for _ in range(8)]

    def program(x, ws):
        m = x.exp()
        h = m
        for w in ws:
            h = (h @ w).tanh()
        return h + m * x

    ref = program(x, ws)
    ex = multi(cpu_topology(2, link_gbps=0.1, client_gbps=0.1), strategy="pipeline")
    out = program(x.to(REMOTE), [w.to(REMOTE) for w in ws])
    assert torch.equal(out.cpu(), ref)
    assert ex.last_schedule.recompute, "the slow link should make recomputing x.exp() pay"
    assert any(f.recomputed for f in ex.last_plan.fragments)


@torch.no_grad()
def test_measured_times_calibrate_and_adapt(multi):
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    x = torch.randn(4, 64)
    ref = model(x)
    adaptive = AdaptiveOptimizer(trials=1)
    ex = multi(cpu_topology(2), measure=True, optimizer=adaptive)
    rmodel = copy.deepcopy(model).to(REMOTE)
    for _ in range(8):
        assert torch.equal(rmodel(x.to(REMOTE)).cpu(), ref)
    est = ex.scheduler.estimator
    assert est.calibration and all(f > 0 for f in est.calibration.values())
    report = adaptive.report()
    assert report and all(v["trials"] for v in report.values())


def test_executor_protocol_edges(multi):
    ex = multi(cpu_topology(2))
    a = torch.randn(8, 8).to(REMOTE)
    b = (a @ a).relu()
    assert torch.equal(b.cpu(), (a.cpu() @ a.cpu()).relu())
    assert ex.resident_count() >= 1 and ex.resident_bytes() > 0
    # Data-dependent ops run eagerly on the device holding their input.
    idx = (b > 0.5).nonzero()
    assert torch.equal(idx.cpu(), ((a.cpu() @ a.cpu()).relu() > 0.5).nonzero())
    assert ex.name == "multi:cpu0,cpu1"


@torch.no_grad()
def test_two_genie_serve_endpoints_are_two_devices(tmp_path):
    from genie.runtime.loopback import LoopbackServer

    model = gpt2()
    ids = _ids()
    ref = model(ids).logits
    threads = torch.get_num_threads()  # same reduction order as eager here
    with LoopbackServer(threads=threads) as s0, LoopbackServer(threads=threads) as s1:
        toml = ""
        for name, srv in (("s0", s0), ("s1", s1)):
            (tmp_path / name).write_text(srv.token)
            toml += (
                f'[[device]]\nname = "{name}"\ntype = "CPU"\nendpoint = "tcp://{srv.address}"\n'
                f'token_file = "{tmp_path / name}"\n'
            )
        toml += '[[link]]\na = "s0"\nb = "s1"\nkind = "loopback"\n'
        for name in ("s0", "s1"):
            toml += f'[[link]]\na = "client"\nb = "{name}"\nkind = "loopback"\n'
        (tmp_path / "cluster.toml").write_text(toml)
        topo = NetworkTopology.from_file(tmp_path / "cluster.toml")
        ex = MultiDeviceExecutor.from_topology(
            topo, scheduler=Scheduler(network_topology=topo, strategy="pipeline")
        )
        install_executor(ex)
        try:
            out = copy.deepcopy(model).to(REMOTE)(ids.to(REMOTE)).logits.cpu()
        finally:
            genie.synchronize()
            use_local()
            ex.close()
    assert torch.equal(out, ref)
    assert {f.device for f in ex.last_plan.fragments} == {"s0", "s1"} and ex.last_plan.transfers


# -- slices of a batch (Note: [Replicas]) -----------------------------------------------------
def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(128, 128), nn.ReLU())]).eval()


def _sliced(model, x, k):
    """The program a user writes to split a batch: one forward per slice, joined."""
    return torch.cat([model(xi) for xi in x.chunk(k)])


@torch.no_grad()
def test_slices_of_a_batch_pass_through_a_pipeline_as_micro_batches(multi):
    """Four slices over a two-stage pipeline: every slice is cut at the same layer, the
    second stage of slice i and the first stage of slice i+1 wait for nothing of each
    other, each weight lives on its stage's device only, and the result equals eager."""
    model, x = _mlp(), torch.randn(16, 128)
    ex = multi(cpu_topology(2), strategy="pipeline")
    rmodel = copy.deepcopy(model).to(REMOTE)
    out = _sliced(rmodel, x.to(REMOTE), 4).cpu()
    assert torch.equal(out, _sliced(model, x, 4))
    plan = ex.last_plan
    assert ex.last_schedule.micro_batches == 4 and plan.flags["sliced"]
    first, second = plan.fragments_on("cpu0"), plan.fragments_on("cpu1")
    assert len(first) >= 4 and len(second) >= 4
    assert second[0].id not in first[1].deps and first[1].id not in second[0].deps
    params = {int(_C._storage_id(p)) for p in rmodel.parameters()}
    on = {d: set(plan.uploads[d]) & params for d in ("cpu0", "cpu1")}
    assert on["cpu0"] and on["cpu1"] and not on["cpu0"] & on["cpu1"]


@torch.no_grad()
def test_data_parallel_runs_each_slice_on_its_own_device(multi):
    """strategy="data": each slice runs on its own device, neither waiting for the other,
    with the weights uploaded to both, and the result equals eager."""
    model, x = _mlp(), torch.randn(16, 128)
    ex = multi(cpu_topology(2), strategy="data")
    rmodel = copy.deepcopy(model).to(REMOTE)
    out = _sliced(rmodel, x.to(REMOTE), 2).cpu()
    assert torch.equal(out, _sliced(model, x, 2))
    plan = ex.last_plan
    firsts = [plan.fragments_on(d)[0] for d in ("cpu0", "cpu1")]
    assert not firsts[0].deps and not firsts[1].deps
    params = {int(_C._storage_id(p)) for p in rmodel.parameters()}
    assert params <= set(plan.uploads["cpu0"]) & set(plan.uploads["cpu1"])


@torch.no_grad()
def test_a_batch_that_is_not_sliced_cannot_run_data_parallel_or_micro_batched(multi):
    """One forward over the whole batch: data parallel and a micro-batched plan say that the
    program has to slice the batch, instead of running something else."""
    model, x = _mlp(), torch.randn(16, 128)
    multi(cpu_topology(2), strategy="data")
    with pytest.raises(NotImplementedError, match="torch.chunk"):
        copy.deepcopy(model).to(REMOTE)(x.to(REMOTE)).cpu()
    ex = multi(cpu_topology(2), strategy="pipeline")
    ex.planner.micro_batching = True
    with pytest.raises(NotImplementedError, match="torch.chunk"):
        copy.deepcopy(model).to(REMOTE)(x.to(REMOTE)).cpu()


class _Recording(PythonExecutor):
    """A Python executor that asks for, and keeps, what each flush leaves dead."""

    frees_dead = True

    def __init__(self):
        super().__init__("cpu")
        self.dead: list[set[int]] = []

    def run(self, nodes, constants, targets, dead=()) -> None:
        self.dead.append(set(dead))
        super().run(nodes, constants, targets, dead)


def test_an_executor_learns_which_values_are_dead_after_a_flush():
    """With each flush the recorder names the storages no tensor holds any more: the
    intermediates the user dropped, never the result or an intermediate still held."""
    ex = _Recording()
    install_executor(ex)
    try:
        a = torch.randn(8, 8)
        x = a.to(REMOTE)
        kept = x @ x
        h = kept.relu()
        y = (h * 2).tanh()
        ids = {name: int(_C._storage_id(t)) for name, t in (("x", x), ("kept", kept), ("h", h))}
        ids["y"] = int(_C._storage_id(y))
        del h
        got = y.cpu()
        assert torch.equal(kept.cpu(), a @ a)
    finally:
        use_local()
    dead = ex.dead[0]
    assert ids["h"] in dead
    assert not {ids["x"], ids["kept"], ids["y"]} & dead
    assert torch.equal(got, ((a @ a).relu() * 2).tanh())


class _Peak(EnvironmentBackend):
    """An in-process device that remembers the most it held after any request."""

    def __init__(self, name: str):
        super().__init__(name, "cpu")
        self.peak = 0

    def _held(self) -> None:
        self.peak = max(self.peak, self.env.nbytes())

    def put_constant(self, storage, tensor) -> None:
        super().put_constant(storage, tensor)
        self._held()

    def import_(self, storage, data) -> None:
        super().import_(storage, data)
        self._held()

    def run(self, nodes) -> None:
        super().run(nodes)
        self._held()


@torch.no_grad()
def test_activations_larger_than_a_device_are_freed_after_their_last_reader():
    """Eight layers whose activations together outgrow each device's memory, split over two
    devices: every dead activation is freed on its device once its last reader ran, so
    neither device ever holds more than its memory; the result and an activation the user
    kept equal eager."""
    torch.manual_seed(0)
    x = torch.randn(256, 256)
    ws = [torch.randn(256, 256) / 16 for _ in range(8)]

    def program(x, ws):
        h, kept = x, None
        for i, w in enumerate(ws):
            h = (h @ w).tanh()
            if i == 3:
                kept = h
        return h, kept

    ref, ref_kept = program(x, ws)
    size = x.numel() * 4  # one activation, one weight
    topo = cpu_topology(2, memory=11 * size)  # 8 weights and 16 activations need 25
    backends = {d: _Peak(d) for d in topo.device_names}
    ex = MultiDeviceExecutor(
        backends, topology=topo, scheduler=Scheduler(GraphCostEstimator(), topo, "pipeline")
    )
    install_executor(ex)
    try:
        out, kept = program(x.to(REMOTE), [w.to(REMOTE) for w in ws])
        assert torch.equal(out.cpu(), ref)
        assert torch.equal(kept.cpu(), ref_kept)
    finally:
        genie.synchronize()
        use_local()
    assert {f.device for f in ex.last_plan.fragments} == {"cpu0", "cpu1"}
    assert ex.stats["released_early"] > 0
    for b in backends.values():
        assert 0 < b.peak <= 11 * size, (b.name, b.peak)
