"""The evidence the classifier reads, one rule at a time, on models small enough to read:
what each data input is, and what that makes the workload. Module names here say nothing
(``a``, ``b``, ``t``): only the dataflow can."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import genie
from genie.semantic import Modality, Phase, SemanticAnalyzer, WorkloadType

REMOTE = "remote_accelerator:0"


def _graph_profile(model, *args):
    """The graph entry point: forward on remote_accelerator, analyse the pending graph."""
    model = model.to(REMOTE).eval()
    with torch.no_grad():
        model(*(a.to(REMOTE) for a in args))
    profile = SemanticAnalyzer().analyze_graph(genie.get_graph())
    genie.synchronize()
    return profile


class Tokens(nn.Module):
    """Ids masked and copied before the lookup, then attention over the sequence."""

    def __init__(self):
        super().__init__()
        self.t = nn.Embedding(100, 16)
        self.a = nn.Linear(16, 48)
        self.b = nn.Linear(16, 100)

    def forward(self, ids):
        ids = torch.where(ids == 99, torch.zeros_like(ids), ids)  # an edit before the lookup
        x = self.t(ids)
        q, k, v = self.a(x).chunk(3, -1)
        return self.b(F.scaled_dot_product_attention(q, k, v, is_causal=True))


class Fields(nn.Module):
    """Four categorical fields in one shared table (per-field offsets), products of their
    embeddings, an MLP: the same [B, F] integer input as tokens, but nothing mixes it as a
    sequence."""

    def __init__(self):
        super().__init__()
        self.register_buffer("off", torch.tensor([0, 10, 20, 30]), persistent=False)
        self.t = nn.Embedding(40, 8)
        self.a = nn.Linear(32, 16)
        self.b = nn.Linear(16, 1)

    def forward(self, ids):
        e = self.t(ids + self.off)
        pair = (e.sum(1) ** 2 - (e**2).sum(1)).sum(1, keepdim=True)
        return pair + self.b(self.a(e.flatten(1)).relu())


class Patches(nn.Module):
    """Patches from a strided convolution plus a lookup of position ids, then attention."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 16, 8, 8)
        self.p = nn.Embedding(16, 16)
        self.register_buffer("pos", torch.arange(16)[None], persistent=False)
        self.a = nn.Linear(16, 48)
        self.b = nn.Linear(16, 5)

    def forward(self, pixels):
        x = self.c(pixels).flatten(2).transpose(1, 2) + self.p(self.pos)
        q, k, v = self.a(x).chunk(3, -1)
        return self.b(F.scaled_dot_product_attention(q, k, v).mean(1))


def test_ids_edited_before_the_lookup_are_tokens():
    """Token ids stay text through an edit before the embedding; a causal sequence model."""
    profile = _graph_profile(Tokens(), torch.randint(0, 100, (2, 8)))
    assert profile.metadata["input_modalities"] == {Modality.TEXT: 1}
    assert profile.workload_type == WorkloadType.LLM
    assert profile.call_phase == Phase.PREFILL


def test_fields_in_one_table_are_categorical_not_tokens():
    """The same [B, F] ids with nothing mixing positions are categorical fields: a
    recommender, with the products of two fields' embeddings as its interaction."""
    profile = _graph_profile(Fields(), torch.randint(0, 10, (4, 4)))
    assert profile.metadata["input_modalities"] == {Modality.CATEGORICAL: 1}
    assert profile.workload_type == WorkloadType.RECSYS
    assert Phase.INTERACTION in profile.phases


def test_position_lookup_added_to_patches_is_not_a_second_modality():
    """Position ids looked up and added onto patch embeddings belong to the image: vision,
    with no fusion point."""
    profile = _graph_profile(Patches(), torch.randn(2, 3, 32, 32))
    assert profile.workload_type == WorkloadType.VISION
    assert not profile.metadata["fusion_points"]
    assert set(profile.metadata["input_modalities"]) == {Modality.VISION}


@pytest.mark.parametrize("shape", [(4, 12), (4, 3, 12)])
def test_dense_floats_alone_are_unknown(shape):
    """Floats through linear layers, with no ids, pixels or waveform: UNKNOWN, not a guess."""
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 2))
    profile = _graph_profile(model, torch.randn(*shape))
    assert profile.workload_type == WorkloadType.UNKNOWN
