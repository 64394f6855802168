"""Placement and its constraints: KV-cache co-location, memory, pipelining, modality branches,
recomputation; strategies, pins and the schedule cache."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from fakes import REMOTE, gpt2, resnet
from torch import nn

import genie
from genie import _C
from genie.runtime.executor import install_executor, use_local
from genie.runtime.multi_device import MultiDeviceExecutor
from genie.scheduler import (
    DeviceSpec,
    GraphAnalysis,
    MemoryPlacementError,
    NetworkTopology,
    PlacementError,
    Planner,
    Scheduler,
    SemanticOptimizer,
)
from genie.scheduler.cost_model import GraphCostEstimator


def _record(model, *inputs):
    """The pending graph of model(*inputs) on the remote device (nothing runs)."""
    rm = copy.deepcopy(model).to(REMOTE)
    with torch.no_grad():
        out = rm(*[x.to(REMOTE) for x in inputs])
    return genie.get_graph(), out


# -- KV cache co-location --------------------------------------------------------------------
@torch.no_grad()
def test_decode_keeps_kv_cache_and_its_ops_on_one_device():
    model = gpt2().to(REMOTE)
    ids = torch.randint(0, 500, (2, 8)).to(REMOTE)
    out = model(ids, use_cache=True)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    nxt.cpu()  # prefill runs; its KV cache stays resident
    cache = out.past_key_values
    cache_storages = {
        int(_C._storage_id(t)) for layer in cache.layers for t in (layer.keys, layer.values)
    }
    model(nxt, past_key_values=cache, use_cache=True)
    graph = genie.get_graph()
    assert cache_storages <= set(graph.input_storages)

    # gpu0 is much faster, but the cache lives on gpu1: the cache's ops stay with it.
    topo = NetworkTopology()
    topo.add_device("gpu0", "H100")
    topo.add_device("gpu1", "L4")
    topo.add_link("client", "gpu0", kind="eth100")
    topo.add_link("client", "gpu1", kind="eth100")
    topo.add_link("gpu0", "gpu1", kind="pcie4")
    resident = dict.fromkeys(cache_storages, "gpu1")
    schedule = Scheduler(network_topology=topo).create_schedule(graph, resident=resident)
    readers = [n for n in graph.nodes if any(t.storage in cache_storages for t in n.inputs)]
    assert len(readers) == 2 * len(cache.layers)  # one cat per key and value cache
    users = list(readers)
    for r in readers:  # the attention that consumes each extended cache
        users += [c for c in graph.consumers(r) if "attention" in c.op]
    assert len(users) > len(readers)
    assert {schedule.placement[n.id] for n in users} == {"gpu1"}
    assert any("KV cache" in note for note in schedule.notes)
    # Nothing moves the cache: the plan transfers none of its storages.
    plan = Planner().generate_plan(graph, None, schedule).validate()
    assert not {t.storage for t in plan.transfers} & cache_storages

    # The cache split over devices (as a pipeline leaves it): each layer's ops follow its cache.
    layer0 = {int(_C._storage_id(t)) for t in (cache.layers[0].keys, cache.layers[0].values)}
    resident = {s: ("gpu0" if s in layer0 else "gpu1") for s in cache_storages}
    schedule = Scheduler(network_topology=topo).create_schedule(graph, resident=resident)
    for r in readers:
        cache_dev = resident[next(t.storage for t in r.inputs if t.storage in cache_storages)]
        assert schedule.placement[r.id] == cache_dev
        for c in graph.consumers(r):
            if "attention" in c.op:
                assert schedule.placement[c.id] == cache_dev


# -- memory ----------------------------------------------------------------------------------
def test_memory_that_cannot_fit_names_what_does_not_fit():
    torch.manual_seed(0)
    graph, _ = _record(
        nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256)).eval(),
        torch.randn(4, 256),
    )
    topo = NetworkTopology()
    for name in ("a", "b"):
        topo.add_device(name, DeviceSpec.cpu(memory_bytes=100_000))
        topo.add_link("client", name, kind="pcie4")
    topo.add_link("a", "b", kind="pcie4")
    with pytest.raises(MemoryPlacementError) as err:
        Scheduler(network_topology=topo).create_schedule(graph)
    msg = str(err.value)
    assert "does not fit" in msg and "needs" in msg and "has 97.66 KiB" in msg
    assert "256.00 KiB (weight/input)" in msg  # the 256x256 fp32 weight that no device can hold
    assert (
        err.value.details
        and err.value.details[0]["peak_bytes"] > err.value.details[0]["capacity_bytes"]
    )


def test_a_device_that_keeps_a_flush_s_values_needs_room_for_all_of_them():
    """Note: [What a device holds]: with holds="flush" the peak counts every intermediate the
    chain writes (as a server does until the flush ends); with "last_use" only the largest
    pair alive at once."""
    torch.manual_seed(0)
    layers = [m for _ in range(4) for m in (nn.Linear(64, 64), nn.ReLU())]
    graph, _ = _record(nn.Sequential(*layers).eval(), torch.randn(256, 64))
    topo = NetworkTopology()
    topo.add_device("a", DeviceSpec.cpu(memory_bytes=1 << 30))
    topo.add_link("client", "a", kind="pcie4")
    peak = {
        holds: Scheduler(network_topology=topo).create_schedule(graph, holds=holds).peak_memory["a"]
        for holds in ("last_use", "flush")
    }
    weights = sum(graph.constants[s].untyped_storage().nbytes() for s in graph.constants)
    activation = 256 * 64 * 4
    assert peak["last_use"] <= weights + 3 * activation
    assert peak["flush"] >= weights + 8 * activation  # four linears, four relus, all kept


# -- pipelining a CNN ------------------------------------------------------------------------
@pytest.mark.parametrize("n", [2, 3, 4])
def test_pipelined_cnn_balances_stage_costs(n):
    torch.manual_seed(0)
    graph, _ = _record(resnet(), torch.randn(16, 3, 32, 32))
    topo = NetworkTopology.uniform(n, "A100", device_link="nvlink3")
    schedule = Scheduler(network_topology=topo, strategy="pipeline").create_schedule(graph)
    costs = schedule.stage_costs
    assert len(costs) == n and schedule.devices_used == topo.device_names
    total = sum(costs)
    A = GraphAnalysis.of(graph)
    spec = topo.spec("gpu0")
    biggest = max(GraphCostEstimator().time(c, spec) for c in A.costs)
    # The stated bound: the bottleneck stage is at most an equal share plus one node...
    assert max(costs) <= total / n + biggest + 1e-12
    # ...which for this CNN keeps every stage within 25% of the mean.
    assert max(costs) <= 1.25 * total / n
    assert min(costs) >= 0.6 * total / n
    plan = Planner().generate_plan(graph, None, schedule).validate()
    assert len(plan.fragments) == n


# -- recomputation ---------------------------------------------------------------------------
def _recompute_graph():
    """`a = x @ w` is computed on gpu0 and read on gpu0 and gpu1; gpu1 also reads x and w."""
    torch.manual_seed(0)
    x, w, v = (torch.randn(512, 512).to(REMOTE) for _ in range(3))
    a = x @ w  # 2*512^3 FLOPs, 1 MiB out
    left = a @ v
    right = a.relu() + x.sum() + w.sum()
    keep = (left, right)
    graph = genie.get_graph()
    mm = [n for n in graph.nodes if n.name == "mm"]
    producer, left_mm = mm
    pins = {producer.id: "gpu0", left_mm.id: "gpu0"}
    for n in graph.nodes:
        if n.name in ("relu", "sum", "add"):
            pins[n.id] = "gpu1"
    return graph, producer, pins, keep


def _two_gpus(link_gbps: float, utilization: float = 0.0) -> NetworkTopology:
    topo = NetworkTopology()
    topo.add_device("gpu0", "A100")
    topo.add_device("gpu1", "A100")
    topo.add_link("client", "gpu0", kind="eth100")
    topo.add_link("client", "gpu1", kind="eth100")
    topo.add_link("gpu0", "gpu1", bandwidth_gbps=link_gbps, latency_us=10, utilization=utilization)
    return topo


def test_recomputation_flips_when_bandwidth_drops():
    graph, producer, pins, _keep = _recompute_graph()
    fast = Scheduler(network_topology=_two_gpus(3600)).create_schedule(graph, pins=pins)
    assert producer.id not in fast.recompute  # moving 1 MiB over NVLink beats 268 MFLOPs
    slow = Scheduler(network_topology=_two_gpus(1)).create_schedule(graph, pins=pins)
    assert slow.recompute == {producer.id: ["gpu1"]}  # over 1 Gb/s, computing again wins
    plan = Planner().generate_plan(graph, None, slow).validate()
    gpu1 = [f for f in plan.fragments if f.device == "gpu1"]
    assert any(producer.id in f.recomputed for f in gpu1)
    assert producer.outputs[0].storage not in {t.storage for t in plan.transfers}
    # Congestion does what a slow link does.
    busy = Scheduler(network_topology=_two_gpus(800, utilization=0.9)).create_schedule(
        graph, pins=pins
    )
    idle = Scheduler(network_topology=_two_gpus(800)).create_schedule(graph, pins=pins)
    assert producer.id in busy.recompute and producer.id not in idle.recompute


# -- modality branches -----------------------------------------------------------------------
class VQA(nn.Module):
    """VQA-style: a CNN over the image (patch features) and a transformer encoder over the
    question, fused where the question attends to the image patches, then a classifier."""

    def __init__(self, vocab=300, dim=64, answers=10):
        super().__init__()
        self.vision = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, 64, 3, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.Conv2d(64, dim, 3, padding=1, stride=2, bias=False),
            nn.BatchNorm2d(dim),
            nn.ReLU(inplace=True),
        )
        self.embed = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(dim, 4, dim * 4, dropout=0.0, batch_first=True)
        self.text = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.q = nn.Linear(dim, dim)
        self.head = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, answers))

    def forward(self, image, question):
        v = self.vision(image).flatten(2).transpose(1, 2)  # [B, patches, dim]
        t = self.q(self.text(self.embed(question)))  # [B, words, dim]
        fused = F.scaled_dot_product_attention(t.unsqueeze(1), v.unsqueeze(1), v.unsqueeze(1))
        return self.head(fused.squeeze(1).mean(1))


def vqa() -> VQA:
    torch.manual_seed(0)
    m = VQA().eval()
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.1, 0.1)
            mod.running_var.uniform_(0.5, 1.5)
    return m


def vqa_inputs(side: int, words: int):
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 3, side, side, generator=g), torch.randint(
        0, 300, (2, words), generator=g
    )


@pytest.mark.parametrize("side,words,fusion_side", [(48, 8, "vision"), (8, 1024, "text")])
def test_vqa_branches_run_apart_and_join_where_least_moves(side, words, fusion_side):
    graph, _ = _record(vqa(), *vqa_inputs(side, words))
    A = GraphAnalysis.of(graph)
    branches = A.branches()
    assert branches is not None and sorted(branches.labels) == ["text", "vision"]
    topo = NetworkTopology.uniform(2, "A100", device_link="pcie4")
    schedule = Scheduler(network_topology=topo).create_schedule(graph)  # auto
    assert schedule.strategy == "parallel"
    where = {}
    for label, members in zip(branches.labels, branches.sets, strict=True):
        devs = {schedule.placement[A.cnodes[ci].id] for ci in members}
        assert len(devs) == 1, f"the {label} branch is split over {devs}"
        where[label] = devs.pop()
    assert where["vision"] != where["text"]
    fusion = A.cnodes[branches.fusion]
    assert schedule.placement[fusion.id] == where[fusion_side]
    # What crosses is the other branch's (smaller) output, once.
    plan = Planner().generate_plan(graph, None, schedule).validate()
    crossing = sum(t.nbytes for t in plan.transfers)
    own = {s for ci in branches.sets[branches.labels.index(fusion_side)] for s in A.writes[ci]}
    assert not {t.storage for t in plan.transfers} & own
    other = branches.sets[1 - branches.labels.index(fusion_side)]
    assert crossing <= sum(A.storage_bytes[s] for ci in other for s in A.writes[ci])


@torch.no_grad()
def test_vqa_split_over_two_devices_equals_eager():
    model = vqa()
    image, question = vqa_inputs(32, 16)
    ref = model(image, question)
    topo = NetworkTopology()
    for name in ("cpu0", "cpu1"):
        topo.add_device(name, DeviceSpec.cpu(cores=2))
        topo.add_link("client", name, bandwidth_gbps=100, latency_us=2)
    topo.add_link("cpu0", "cpu1", bandwidth_gbps=100, latency_us=5)
    ex = MultiDeviceExecutor({"cpu0": "cpu", "cpu1": "cpu"}, topology=topo)
    install_executor(ex)
    try:
        out = copy.deepcopy(model).to(REMOTE)(image.to(REMOTE), question.to(REMOTE)).cpu()
    finally:
        genie.synchronize()
        use_local()
    assert torch.equal(out, ref)
    assert ex.last_schedule.strategy == "parallel"
    assert {f.device for f in ex.last_plan.fragments} == {"cpu0", "cpu1"}


def test_semantic_annotations_drive_branches():
    """With modality annotations (as genie.semantic writes them) no structure is guessed."""
    graph, _ = _record(vqa(), *vqa_inputs(16, 8))
    A = GraphAnalysis(graph)
    br = A.branches()
    for label, members in zip(br.labels, br.sets, strict=True):
        for ci in members:
            A.cnodes[ci].meta["modality"] = label
    A.cnodes[br.fusion].meta["modality"] = "fusion"
    annotated = GraphAnalysis(graph).branches()
    assert sorted(annotated.labels) == ["text", "vision"]
    assert annotated.fusion == br.fusion


# -- strategies, pins, cache -----------------------------------------------------------------
@pytest.mark.parametrize(
    "strategy", ["auto", "sequential", "parallel", "pipeline", "priority", "dynamic"]
)
def test_every_strategy_gives_a_complete_valid_schedule(strategy):
    graph, _ = _record(gpt2(), torch.randint(0, 500, (2, 8)))
    topo = NetworkTopology.uniform(3, "H100")
    schedule = Scheduler(network_topology=topo, strategy=strategy).create_schedule(graph)
    ids = {n.id for n in graph.nodes}
    assert (
        set(schedule.placement) == ids == set(schedule.node_to_stage) == set(schedule.node_to_group)
    )
    assert set(schedule.placement.values()) <= set(topo.device_names)
    for nid, g in schedule.node_to_group.items():
        group = schedule.groups[g]
        assert (
            group.device == schedule.placement[nid] and group.stage == schedule.node_to_stage[nid]
        )
    # Stages respect dependencies: a producer's stage never comes after its consumer's.
    for p, c in graph.edges():
        assert schedule.node_to_stage[p] <= schedule.node_to_stage[c]
    assert schedule.makespan > 0
    Planner().generate_plan(graph, None, schedule).validate()


def test_pins_are_honoured_and_conflicts_are_errors():
    graph, _ = _record(gpt2(), torch.randint(0, 500, (2, 8)))
    topo = NetworkTopology.uniform(2, "H100")
    lm_head = [n for n in graph.nodes if n.name == "mm"][-1]
    schedule = Scheduler(network_topology=topo, strategy="sequential").create_schedule(
        graph, pins={lm_head.id: "gpu1"}
    )
    assert schedule.placement[lm_head.id] == "gpu1"
    lm_head.meta["genie.device"] = "gpu0"
    assert Scheduler(network_topology=topo).create_schedule(graph).placement[lm_head.id] == "gpu0"
    with pytest.raises(PlacementError, match="unknown device 'gpu7'"):
        Scheduler(network_topology=topo).create_schedule(graph, pins={lm_head.id: "gpu7"})
    cat = next(n for n in graph.nodes if n.name == "cat")  # shares a device with its attention
    attn = next(c for c in graph.consumers(cat) if "attention" in c.op)
    with pytest.raises(PlacementError, match="must share a device"):
        Scheduler(network_topology=topo).create_schedule(
            graph, pins={cat.id: "gpu0", attn.id: "gpu1"}
        )


def test_schedules_are_cached_by_structure_and_rebound_to_new_recordings():
    topo = NetworkTopology.uniform(2, "H100")
    scheduler = Scheduler(network_topology=topo, strategy="pipeline")
    planner = Planner()
    g1, _ = _record(gpt2(), torch.randint(0, 500, (2, 8)))
    s1 = scheduler.create_schedule(g1)
    p1 = planner.generate_plan(g1, None, s1)
    genie.synchronize()
    g2, _ = _record(gpt2(), torch.randint(0, 500, (2, 8)))
    assert g2.structural_hash() == g1.structural_hash()
    assert {n.id for n in g1.nodes}.isdisjoint({n.id for n in g2.nodes})
    s2 = scheduler.create_schedule(g2)
    stats = scheduler.get_stats()
    assert stats["cache_hits"] == 1 and stats["schedules_created"] == 1
    assert [s2.placement[n.id] for n in g2.nodes] == [s1.placement[n.id] for n in g1.nodes]
    p2 = planner.generate_plan(g2, None, s2).validate()
    assert planner.stats["cache_hits"] == 1
    assert set(p2.homes) == {s for n in g2.nodes for s in n.fresh + n.writes}
    assert len(p2.transfers) == len(p1.transfers)
    scheduler.create_schedule(g2)
    assert scheduler.get_stats()["cache_hits"] == 2
    # Another topology is another schedule.
    topo.set_link("gpu0", "gpu1", bandwidth=1e9)
    scheduler.create_schedule(g2)
    assert scheduler.get_stats()["schedules_created"] == 2


def test_semantic_optimizer_fusion_groups_stay_together():
    graph, _ = _record(resnet(), torch.randn(4, 3, 32, 32))
    report = SemanticOptimizer(enabled={"fusion_groups"}).apply(graph)
    assert report["fusion_groups"] > 0
    topo = NetworkTopology.uniform(3, "A100")
    schedule = Scheduler(network_topology=topo, strategy="pipeline").create_schedule(graph)
    groups: dict = {}
    for n in graph.nodes:
        key = n.meta.get("genie.fusion_group")
        if key is not None:
            groups.setdefault(key, set()).add(
                (schedule.placement[n.id], schedule.node_to_stage[n.id])
            )
    assert groups and all(len(v) == 1 for v in groups.values())
