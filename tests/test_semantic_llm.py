"""The semantic layer on language models: GPT-2 prefill then decode against its KV cache,
BERT as an encoder."""

from __future__ import annotations

import fakes
import pytest
import torch

import genie
from genie.semantic import Phase, Residency, Role, SemanticAnalyzer, WorkloadType

REMOTE = fakes.REMOTE


def _roles(graph) -> set[str]:
    return {n.meta["semantic_role"] for n in graph.nodes}


def _nodes(graph, role):
    return [n for n in graph.nodes if n.meta.get("semantic_role") == role]


@pytest.fixture
def analyzer():
    return SemanticAnalyzer()


def test_gpt2_prefill_then_decode_with_kv_cache(analyzer):
    model = fakes.gpt2()
    prompt = torch.randint(0, 500, (2, 8))
    prefill, out = analyzer.analyze(model, prompt, use_cache=True, return_outputs=True)

    assert prefill.workload_type == WorkloadType.LLM
    assert prefill.patterns[0].name == "llm" and prefill.patterns[0].confidence > 0.9
    assert prefill.call_phase == Phase.PREFILL
    assert prefill.structure.architecture == "transformer_decoder"
    g = prefill.graph
    # fused q/k/v projection and FFN roles, from HF GPT-2's own module names
    assert {
        Role.QKV_PROJECTION,
        Role.ATTENTION,
        Role.ATTENTION_OUTPUT,
        Role.FFN_UP,
        Role.FFN_DOWN,
        Role.TOKEN_EMBEDDING,
        Role.POSITION_EMBEDDING,
        Role.LM_HEAD,
        Role.LAYER_NORM,
        Role.RESIDUAL_ADD,
    } <= _roles(g)
    qkv = _nodes(g, Role.QKV_PROJECTION)[0]
    assert qkv.meta["module_path"] == "transformer.h.0.attn.c_attn"
    assert qkv.meta["module_type"] == "Conv1D" and qkv.meta["layer_index"] == 0
    assert _nodes(g, Role.FFN_UP)[-1].meta["layer_index"] == 1
    # every node is stamped, and prefill covers the transformer
    assert all("execution_phase" in n.meta and "data_residency" in n.meta for n in g.nodes)
    assert set(prefill.phases) == {Phase.EMBEDDING, Phase.PREFILL}
    assert len(prefill.phases[Phase.PREFILL]) > len(g.nodes) // 2
    # the cache is created in prefill: the cats that extend it are the stateful values
    kv = _nodes(g, Role.KV_CACHE_UPDATE)
    assert len(kv) == 4  # keys and values of two layers
    assert all(n.meta["data_residency"] == Residency.STATEFUL_KV_CACHE for n in kv)
    assert prefill.kv_cache["present"] is False  # nothing resident yet

    # a decode step: the cache is resident after the flush, the query is one token
    with torch.no_grad():
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        token.cpu()
    decode = analyzer.analyze(model, token, past_key_values=out.past_key_values, use_cache=True)
    assert decode.workload_type == WorkloadType.LLM
    assert decode.call_phase == Phase.DECODE
    assert Phase.PREFILL not in decode.phases and Phase.DECODE in decode.phases
    assert decode.latency_sensitivity == "high"
    dg = decode.graph
    cached = set(decode.kv_cache["storages"])
    assert len(cached) == 4 and cached <= set(dg.input_storages)
    assert all(decode.residency[s] == Residency.STATEFUL_KV_CACHE for s in cached)
    assert decode.kv_cache["bytes"] == 4 * 2 * 4 * 8 * 16 * 4  # k and v: [2, 4 heads, 8, 16] fp32
    for n in _nodes(dg, Role.KV_CACHE_UPDATE):
        assert n.meta["execution_phase"] == Phase.DECODE
        assert n.inputs[0].storage in cached  # past keys/values read from the resident cache
    # the CPU model's weights are uploads: persistent weights, not activations
    weights = {s for s, r in decode.residency.items() if r == Residency.PERSISTENT_WEIGHT}
    ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    uploads = {s for s, c in dg.constants.items() if c.untyped_storage().data_ptr() in ptrs}
    assert weights == uploads and len(uploads) >= len(ptrs)  # (lm_head's tied view is its own)

    stats = analyzer.phase_detector.statistics()
    assert stats["transitions"] == {"prefill->decode": 1}
    assert stats["current_phase"] == Phase.DECODE


def test_gpt2_on_remote_weights_and_later_decode_steps(analyzer):
    model = fakes.gpt2().to(REMOTE)
    genie.synchronize()  # weights resident
    ids = torch.randint(0, 500, (1, 6)).to(REMOTE)
    phases = []
    with torch.no_grad():
        past = None
        for _ in range(3):
            with analyzer.track(model):
                out = model(ids, past_key_values=past, use_cache=True)
            p = analyzer.analyze_graph(genie.get_graph(), model)
            phases.append(p.call_phase)
            past = out.past_key_values
            ids = out.logits[:, -1:].argmax(-1)
            ids.cpu()
    assert phases == [Phase.PREFILL, Phase.DECODE, Phase.DECODE]
    # parameters resident on the device, recognised through the model
    params = {genie._C._storage_id(t) for t in model.parameters()}
    assert {s for s, r in p.residency.items() if r == Residency.PERSISTENT_WEIGHT} == params
    assert p.kv_cache["present"] and len(p.kv_cache["storages"]) == 4
    stats = analyzer.phase_detector.statistics()
    assert stats["phases"][Phase.DECODE]["calls"] == 2
    assert stats["transitions"] == {"prefill->decode": 1, "decode->decode": 1}
    analyzer.phase_detector.reset()
    assert analyzer.phase_detector.statistics()["calls"] == 0
    assert analyzer.phase_detector.current_phase is None


def test_bert_is_a_text_encoder(analyzer):
    profile = analyzer.analyze(fakes.bert(), torch.randint(0, 500, (2, 8)))
    assert profile.workload_type == WorkloadType.LLM
    assert profile.structure.architecture == "transformer_encoder"
    assert profile.call_phase == Phase.TEXT_ENCODER
    assert Phase.PREFILL not in profile.phases and Phase.DECODE not in profile.phases
    roles = _roles(profile.graph)
    assert {
        Role.Q_PROJECTION,
        Role.K_PROJECTION,
        Role.V_PROJECTION,
        Role.FFN_UP,
        Role.FFN_DOWN,
        Role.POOLER,
    } <= roles
    assert Role.KV_CACHE_UPDATE not in roles
    assert profile.pattern("llm").hints["decoder"] is False
    key = _nodes(profile.graph, Role.K_PROJECTION)[0]
    assert key.meta["module_path"] == "encoder.layer.0.attention.self.key"


def test_gpt2_without_hooks_is_still_an_llm(analyzer):
    """Graph only (no module contexts): op stream, lineage and the KV cache still tell."""
    model = fakes.gpt2()
    with torch.no_grad():
        out = model(torch.randint(0, 500, (2, 8)).to(REMOTE), use_cache=True)
    profile = analyzer.analyze_graph(genie.get_graph())
    assert profile.workload_type == WorkloadType.LLM
    assert profile.structure.source == "graph"
    assert profile.call_phase == Phase.PREFILL
    assert len(profile.kv_cache["nodes"]) == 4
    assert all("module_path" not in n.meta for n in profile.graph.nodes)
    del out
