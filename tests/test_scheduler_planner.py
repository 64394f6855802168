"""The Planner: fragments, explicit transfers of the right versions, flags, validate()."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from fakes import REMOTE, gpt2, resnet

import genie
from genie.runtime.multi_device import MultiDeviceExecutor
from genie.scheduler import (
    DeviceSpec,
    NetworkTopology,
    Planner,
    PlanValidationError,
    Scheduler,
)


def _two_cpus() -> NetworkTopology:
    topo = NetworkTopology()
    for name in ("a", "b"):
        topo.add_device(name, DeviceSpec.cpu(cores=2))
        topo.add_link("client", name, bandwidth_gbps=100, latency_us=2)
    topo.add_link("a", "b", bandwidth_gbps=100, latency_us=5)
    return topo


def test_in_place_writes_move_the_version_each_reader_expects():
    """a is written on device a, read on b, updated in place on a, read on b again: two
    transfers of the same storage, each carrying the version its reader saw."""
    torch.manual_seed(0)
    x = torch.randn(16, 16)
    rx = x.to(REMOTE)
    a = rx * 2
    first = a.sum(0)
    a.add_(1)
    second = a * 3
    graph = genie.get_graph()
    by = {n.name: n for n in graph.nodes}
    double, triple = [n for n in graph.nodes if n.name == "mul"]
    pins = {double.id: "a", by["add_"].id: "a", by["sum"].id: "b", triple.id: "b"}
    topo = _two_cpus()
    schedule = Scheduler(network_topology=topo, recompute=False).create_schedule(graph, pins=pins)
    plan = Planner().generate_plan(graph, None, schedule).validate()
    a_storage = by["add_"].writes[0]
    moves = [t for t in plan.transfers if t.storage == a_storage]
    assert len(moves) == 2 and {t.version for t in moves} == {double.id, by["add_"].id}
    # The write-after-read order holds: the in-place add waits for the first read.
    frag = {nid: f.id for f in plan.fragments for nid in f.node_ids}
    order = [i for k, i in plan.steps if k == "fragment"]
    assert order.index(frag[by["sum"].id]) < order.index(frag[by["add_"].id])
    # And running the plan gives eager's values.
    ex = MultiDeviceExecutor({"a": "cpu", "b": "cpu"}, topology=topo, concurrent=False)
    ex.execute(graph, plan)
    assert torch.equal(ex.read(by["sum"].outputs[0]), (x * 2).sum(0))
    assert torch.equal(ex.read(triple.outputs[0]), (x * 2 + 1) * 3)
    del first, second


@pytest.mark.parametrize("strategy", ["pipeline", "priority", "parallel"])
def test_plans_validate_and_cover_every_node_once(strategy):
    model = copy.deepcopy(resnet()).to(REMOTE)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32).to(REMOTE))
    graph = genie.get_graph()
    topo = NetworkTopology.uniform(3, "A100")
    schedule = Scheduler(network_topology=topo, strategy=strategy).create_schedule(graph)
    plan = Planner().generate_plan(graph, None, schedule).validate()
    originals = [nid for f in plan.fragments for nid in f.node_ids if nid not in f.recomputed]
    assert sorted(originals) == sorted(n.id for n in graph.nodes)
    for f in plan.fragments:
        assert {schedule.placement[nid] for nid in f.node_ids if nid not in f.recomputed} <= {
            f.device
        }
    for t in plan.transfers:
        assert t.src_device != t.dst_device and t.nbytes > 0
        assert plan.fragments[t.dst_fragment].device == t.dst_device
    assert set(plan.homes.values()) <= set(topo.device_names)
    del out


def test_validate_rejects_broken_plans():
    with torch.no_grad():
        out = copy.deepcopy(gpt2()).to(REMOTE)(torch.randint(0, 500, (2, 8)).to(REMOTE))
    graph = genie.get_graph()
    topo = NetworkTopology.uniform(2, "H100")
    schedule = Scheduler(network_topology=topo, strategy="pipeline").create_schedule(graph)
    plan = Planner().generate_plan(graph, None, schedule).validate()
    assert plan.transfers
    missing = dataclasses.replace(
        plan,
        transfers=plan.transfers[1:],
        steps=[s for s in plan.steps if s != ("transfer", plan.transfers[0].id)],
    )
    with pytest.raises(
        PlanValidationError, match="neither produced there, uploaded, nor transferred"
    ):
        missing.validate()
    frags = [dataclasses.replace(f) for f in plan.fragments]
    frags[0].deps = frags[0].deps + [len(frags) - 1]  # the first fragment waits for the last
    with pytest.raises(PlanValidationError, match="cycle"):
        dataclasses.replace(plan, fragments=frags).validate()
    no_upload = dataclasses.replace(plan, uploads={})
    with pytest.raises(PlanValidationError):
        no_upload.validate()
    del out


def test_flags_change_the_estimate():
    with torch.no_grad():
        out = copy.deepcopy(resnet()).to(REMOTE)(torch.randn(8, 3, 32, 32).to(REMOTE))
    graph = genie.get_graph()
    topo = NetworkTopology.uniform(4, "A100", device_link="pcie4")
    schedule = Scheduler(network_topology=topo, strategy="pipeline").create_schedule(graph)
    planner = Planner()
    base = planner.generate_plan(graph, None, schedule)
    serial = planner.generate_plan(graph, None, schedule, overlap_io=False)
    micro = planner.generate_plan(graph, None, schedule, micro_batching=True)
    assert base.flags == {"overlap_io": True, "micro_batching": False, "num_micro_batches": 4}
    assert serial.flags["overlap_io"] is False and micro.flags["micro_batching"] is True
    assert serial.estimated_time >= base.estimated_time
    assert micro.estimated_time < base.estimated_time  # 4 micro-batches keep 4 stages busy
    text = base.format()
    assert "fragment" in text and "transfer" in text
    js = base.to_json()
    assert js["fragments"] == len(base.fragments) and len(js["transfer_list"]) == len(
        base.transfers
    )
    del out
