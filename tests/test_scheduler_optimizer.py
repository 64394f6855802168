"""SemanticOptimizer passes write switchable hints the Scheduler honours; AdaptiveOptimizer
keeps what measured times say helped."""

from __future__ import annotations

import copy

import pytest
import torch
from fakes import REMOTE, gpt2, resnet

import genie
from genie.scheduler import (
    PASSES,
    AdaptiveOptimizer,
    NetworkTopology,
    Scheduler,
    SemanticOptimizer,
)
from genie.scheduler.cost_model import is_view


def _record(model, *inputs):
    with torch.no_grad():
        out = copy.deepcopy(model).to(REMOTE)(*[x.to(REMOTE) for x in inputs])
    return genie.get_graph(), out


def test_fusion_groups_mark_conv_bn_relu_and_can_be_switched_off():
    graph, _ = _record(resnet(), torch.randn(2, 3, 32, 32))
    report = SemanticOptimizer().apply(graph)
    assert set(report) == set(PASSES)
    groups: dict = {}
    for n in graph.nodes:
        g = n.meta.get("genie.fusion_group")
        if g is not None:
            groups.setdefault(g, []).append(n.name)
    assert groups
    assert all(names[0] == "convolution" and "batch_norm" in names[1] for names in groups.values())
    assert any(names[-1].startswith("relu") for names in groups.values())
    report = SemanticOptimizer(fusion_groups=False).apply(graph)
    assert "fusion_groups" not in report
    assert not any("genie.fusion_group" in n.meta for n in graph.nodes)  # old hints removed
    with pytest.raises(ValueError, match="unknown optimization"):
        SemanticOptimizer(fusion=True)


def test_decode_colocation_puts_the_decode_phase_on_one_device():
    graph, _ = _record(gpt2(), torch.randint(0, 500, (2, 8)))
    for n in graph.nodes:
        n.meta["execution_phase"] = "decode"  # as genie.semantic annotates a decode step
    topo = NetworkTopology.uniform(3, "H100")
    opt = SemanticOptimizer(enabled={"decode_colocation"})
    schedule = Scheduler(network_topology=topo, strategy="priority", optimizer=opt).create_schedule(
        graph
    )
    assert len(set(schedule.placement.values())) == 1
    assert all(n.meta.get("genie.colocate") == "decode" for n in graph.nodes if not is_view(n))


def test_early_compute_and_parallel_branches():
    graph, _ = _record(gpt2(), torch.randint(0, 500, (2, 8)))
    report = SemanticOptimizer(enabled={"early_compute", "prefill_parallel"}).apply(graph)
    early = [n.name for n in graph.nodes if n.meta.get("genie.early")]
    assert "arange" in early  # position ids depend on no activation
    assert "addmm" not in early and report["early_compute"] == len(early)
    # Annotated q/k/v projections become parallel branches: separate groups of one stage.
    qkv = [n for n in graph.nodes if n.name == "addmm"][:3]
    for n, role in zip(qkv, ("q_projection", "k_projection", "v_projection"), strict=True):
        n.meta["semantic_role"] = role
    SemanticOptimizer(enabled={"prefill_parallel"}).apply(graph)
    assert [n.meta.get("genie.parallel_branch") for n in qkv] == [
        "0:q_projection",
        "0:k_projection",
        "0:v_projection",
    ]


def test_modality_branches_are_marked():
    from test_scheduler_placement import vqa, vqa_inputs

    graph, _ = _record(vqa(), *vqa_inputs(16, 8))
    SemanticOptimizer(enabled={"modality_branches"}).apply(graph)
    labels = {n.meta.get("genie.branch") for n in graph.nodes} - {None}
    assert labels == {"text", "vision"}
    assert sum(bool(n.meta.get("genie.fusion_point")) for n in graph.nodes) == 1


def test_adaptive_optimizer_keeps_only_what_helped():
    graph, _ = _record(resnet(), torch.randn(2, 3, 32, 32))
    adaptive = AdaptiveOptimizer(trials=2)
    scheduler = Scheduler(network_topology=NetworkTopology.uniform(2, "A100"), optimizer=adaptive)

    def measured(enabled) -> float:
        # fusion_groups costs 10% here; every other pass saves 3%.
        t = 1.0 + (0.1 if "fusion_groups" in enabled else 0.0)
        return t * (1.0 - 0.03 * len(set(enabled) - {"fusion_groups"}))

    seen = set()
    for _ in range(2 * (len(PASSES) + 1) + 2):
        schedule = scheduler.create_schedule(graph)
        enabled = schedule.optimizer_key[1]
        seen.add(enabled)
        scheduler.record_execution(schedule, measured(enabled))
    kept = adaptive.chosen(graph)
    assert kept == frozenset(PASSES) - {"fusion_groups"}
    assert len(seen) == len(PASSES) + 1  # all on, then each pass off once
    assert adaptive.report()[graph.structural_hash()[:16]]["done"]
    # From now on the kept configuration is what schedules are made with.
    assert set(scheduler.create_schedule(graph).optimizer_key[1]) == set(kept)
