"""The semantic layer on vision models: a ViT and a ResNet-style CNN."""

from __future__ import annotations

import fakes
import torch

import genie
from genie.semantic import Modality, Phase, Role, SemanticAnalyzer, WorkloadType


def _role_nodes(graph, role):
    return [n for n in graph.nodes if n.meta.get("semantic_role") == role]


def test_vit_is_vision_with_transformer_blocks():
    profile = SemanticAnalyzer().analyze(fakes.vit(), torch.randn(2, 3, 32, 32))
    assert profile.workload_type == WorkloadType.VISION
    assert profile.structure.architecture == "vit"
    assert profile.pattern("llm") is None  # attention without tokens is not a language model
    assert profile.pattern("attention") is not None
    residual = profile.pattern("residual_block")
    assert residual is not None and residual.hints["kinds"] == {"residual_attention_prenorm": 2}
    g = profile.graph
    patch = _role_nodes(g, Role.PATCH_EMBEDDING)
    assert len(patch) == 1 and patch[0].name == "convolution"
    assert all(n.meta["modality"] == Modality.VISION for n in g.nodes)
    assert profile.call_phase == Phase.VISION_BACKBONE
    head = [g.node(i) for i in profile.phases[Phase.VISION_HEAD]]
    assert head and all(n.meta["module_path"].startswith("pooler") for n in head)
    assert patch[0].id in profile.phases[Phase.VISION_BACKBONE]
    assert {Role.Q_PROJECTION, Role.FFN_UP, Role.RESIDUAL_ADD} <= {
        n.meta["semantic_role"] for n in g.nodes
    }


def test_resnet_residual_blocks_backbone_and_head():
    model = fakes.resnet()
    profile = SemanticAnalyzer().analyze(model, torch.randn(2, 3, 16, 16))
    assert profile.workload_type == WorkloadType.VISION
    assert profile.structure.source == "fx"  # plain nn.Module code traces
    assert profile.structure.architecture == "resnet"
    assert profile.structure.parameter_count == sum(p.numel() for p in model.parameters())
    residual = profile.pattern("residual_block")
    # six basic blocks: four with identity skips, two downsampling with 1x1 projections
    assert residual.matches == 6
    assert residual.hints["kinds"] == {"residual_basic": 4, "residual_projection": 2}
    g = profile.graph
    adds = _role_nodes(g, Role.RESIDUAL_ADD)
    assert len(adds) == 6 and sorted(residual.nodes) == sorted(n.id for n in adds)
    assert {n.meta["module_type"] for n in adds} == {"BasicBlock"}
    convs = [n for n in g.nodes if n.name == "convolution"]
    assert all(n.meta["semantic_role"] == Role.CONV_BACKBONE for n in convs)
    assert all(n.meta["execution_phase"] == Phase.VISION_BACKBONE for n in convs)
    fc = _role_nodes(g, Role.CLASSIFIER_HEAD)
    assert [n.meta["module_path"] for n in fc] == ["fc"]
    assert fc[0].meta["execution_phase"] == Phase.VISION_HEAD
    assert profile.pattern("vision").hints["recommendations"][:2] == [
        "batch_images",
        "fuse_conv_bn",
    ]


def test_resnet_graph_only_still_finds_residual_blocks():
    model = fakes.resnet()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 16, 16).to(fakes.REMOTE))
    profile = SemanticAnalyzer().analyze_graph(genie.get_graph())
    assert profile.workload_type == WorkloadType.VISION
    assert profile.structure.architecture == "resnet"
    assert profile.pattern("residual_block").matches == 6
    del out
