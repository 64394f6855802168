"""The semantic layer on a VQA model (fusion of two branches), a DLRM recommender and a plain
MLP that must not pass for a language model."""

from __future__ import annotations

import fakes
import semantic_models
import torch

from genie.semantic import Modality, Phase, Role, SemanticAnalyzer, WorkloadType


def test_vqa_is_multimodal_with_both_branches_and_the_fusion_point():
    images, question = torch.randn(2, 3, 16, 16), torch.randint(0, 300, (2, 6))
    profile = SemanticAnalyzer().analyze(semantic_models.vqa(), images, question)
    assert profile.workload_type == WorkloadType.MULTIMODAL
    assert profile.structure.architecture == "multimodal"
    g = profile.graph

    def branch(prefix):
        return [n for n in g.nodes if n.meta.get("module_path", "").startswith(prefix)]

    vision, text = branch("vision_encoder"), branch("text_encoder")
    assert vision and all(n.meta["modality"] == Modality.VISION for n in vision)
    assert text and all(n.meta["modality"] == Modality.TEXT for n in text)
    assert all(n.meta["execution_phase"] == Phase.VISION_BACKBONE for n in vision)
    assert {n.meta["execution_phase"] for n in text} <= {Phase.TEXT_ENCODER, Phase.EMBEDDING}

    # one fusion point: the cross-attention where question tokens attend to image regions
    fusion = profile.pattern("multimodal_fusion")
    assert fusion is not None and fusion.workload == WorkloadType.MULTIMODAL
    [point] = profile.metadata["fusion_points"]
    node = g.node(point)
    assert node.meta["module_path"] == "fusion.cross_attn"
    assert node.meta["semantic_role"] == Role.CROSS_ATTENTION
    lineage = node.meta["lineage"]
    assert lineage["fusion_of"] == ["text", "vision"]
    assert lineage["branches"] == {"text": ["text_encoder"], "vision": ["vision_encoder"]}
    assert all(
        g.node(i).meta["modality"] == m for m, ids in lineage["sources"].items() for i in ids
    )
    assert fusion.hints["fusion_modules"] == ["fusion.cross_attn"]
    # everything from the fusion module on is the fusion phase, answer head included
    after = [n for n in g.nodes if n.meta.get("module_path", "").startswith(("fusion", "answer"))]
    assert all(n.meta["execution_phase"] == Phase.MULTIMODAL_FUSION for n in after)
    assert profile.parallelism["branches"] == 2
    assert set(profile.phases) >= {
        Phase.VISION_BACKBONE,
        Phase.TEXT_ENCODER,
        Phase.MULTIMODAL_FUSION,
    }


def test_clip_dual_encoder_is_multimodal():
    model = fakes.clip()
    profile = SemanticAnalyzer().analyze(
        model, input_ids=torch.randint(0, 500, (2, 7)), pixel_values=torch.randn(2, 3, 32, 32)
    )
    assert profile.workload_type == WorkloadType.MULTIMODAL
    [point] = profile.metadata["fusion_points"]  # image-text similarity logits
    lineage = profile.graph.node(point).meta["lineage"]
    assert lineage["fusion_of"] == ["text", "vision"]
    assert "text_model" in lineage["branches"]["text"]
    assert "vision_model" in lineage["branches"]["vision"]


def test_dlrm_is_recsys():
    profile = SemanticAnalyzer().analyze(fakes.dlrm(), *fakes.dlrm_inputs())
    assert profile.workload_type == WorkloadType.RECSYS
    assert profile.structure.architecture == "recsys"
    recsys = profile.pattern("recsys")
    assert recsys.confidence > 0.9 and recsys.hints["embedding_tables"] == 3
    g = profile.graph
    bags = [n for n in g.nodes if n.meta["semantic_role"] == Role.EMBEDDING_BAG]
    assert len(bags) == 3
    assert all(n.meta["execution_phase"] == Phase.EMBEDDING for n in bags)
    assert all(n.meta["modality"] == Modality.CATEGORICAL for n in bags)
    roles = [n.meta["semantic_role"] for n in g.nodes]
    assert roles.count(Role.BOTTOM_MLP) >= 2 and roles.count(Role.TOP_MLP) >= 2
    inter = [n for n in g.nodes if n.meta["semantic_role"] == Role.FEATURE_INTERACTION]
    assert {n.name for n in inter} >= {"stack", "bmm"}
    assert all(n.meta["execution_phase"] == Phase.INTERACTION for n in inter)
    assert profile.latency_sensitivity == "high"


def test_plain_mlp_is_not_an_llm():
    profile = SemanticAnalyzer().analyze(semantic_models.mlp(), torch.randn(4, 20))
    assert profile.workload_type == WorkloadType.UNKNOWN
    assert profile.pattern("llm") is None and profile.pattern("attention") is None
    assert profile.structure.architecture == "mlp"
    assert {n.meta["modality"] for n in profile.graph.nodes} == {Modality.TABULAR}
    assert set(profile.phases) == {Phase.FORWARD}
