"""The semantic layer on models it was not written against: the zoo of tests/semantic_zoo.py
(tiny random-weight transformers models from the auto mappings, recommenders, plain models)
through both entry points. What a user sees: the workload each model is, no exception from
the analyzer, and prefill then decode phases while a causal LM generates."""

from __future__ import annotations

import pytest
import semantic_zoo as zoo
import torch

import genie
from genie.semantic import Phase, Residency, Role, SemanticAnalyzer

pytest.importorskip("transformers")

MIN_ARCHITECTURES = 60
MIN_SHARE = 0.95


@pytest.fixture(scope="module")
def built():
    return zoo.zoo_entries()


@pytest.fixture(scope="module")
def results(built):
    entries, _ = built
    analyzers = {"graph": SemanticAnalyzer(), "model": SemanticAnalyzer()}
    out = [zoo.run_entry(e, analyzers) for e in entries]
    genie.synchronize()
    return out


def test_zoo_is_large_and_comes_from_the_mappings(built):
    """At least 60 architectures, from every mapping the zoo draws on; skips carry reasons."""
    entries, skipped = built
    assert len(entries) >= MIN_ARCHITECTURES, [e.name for e in entries]
    sources = {e.source for e in entries}
    for mapping, *_ in zoo.ZOO_TASKS[:4]:
        assert mapping.removesuffix("_MAPPING_NAMES") in sources
    assert {"llm", "vision", "multimodal", "recsys", "unknown"} <= {e.expected for e in entries}
    assert all(reason for _, reason in skipped)


@pytest.mark.parametrize("entry_point", ["graph", "model"])
def test_zoo_no_analyzer_exception(results, entry_point):
    """No model of the zoo makes the analyzer raise (unknown module classes included)."""
    errors = {r.name: r.errors[entry_point] for r in results if entry_point in r.errors}
    assert not errors, errors


def test_a_model_that_runs_on_the_device_runs_through_analyze(results):
    """analyze(cpu_model, ...) leaves the weights on the host, so host tensors meet remote
    ones in ops that would not mix them on one device (DETR's learned queries attending over
    remote features: Note: [Host tensors in attention]); every model whose forward runs on
    remote_accelerator also runs that way."""
    only_there = {
        r.name: r.failed["model"]
        for r in results
        if "model" in r.failed and "graph" not in r.failed
    }
    assert not only_there, only_there


@pytest.mark.parametrize("entry_point", ["graph", "model"])
def test_zoo_classified_right(results, entry_point):
    """At least 95% of the zoo gets the workload of the mapping it came from."""
    ran = zoo.judged(results, entry_point)
    assert len(ran) >= MIN_ARCHITECTURES * 0.8, zoo.summary(results)
    right = sum(r.right(entry_point) for r in ran)
    assert right / len(ran) >= MIN_SHARE, "\n" + zoo.table(ran, (entry_point,))


def _causal_lms(built):
    entries, _ = built
    return [e for e in entries if e.source == "MODEL_FOR_CAUSAL_LM"]


def test_causal_lms_generate_prefill_then_decode(built):
    """Every causal LM of the zoo that generates on remote_accelerator shows prefill on the
    prompt, then one decode step per new token, each against a resident KV cache. Models
    the runtime cannot run, or whose calls a data-dependent op flushed part way (only the
    tail is then seen), are reported, not judged."""
    lms = _causal_lms(built)
    assert len(lms) >= 9
    judged, failures, not_judged = 0, {}, {}
    for entry in lms:
        got = zoo.generate_phases(entry)
        assert not got.get("analyzer_errors"), (entry.name, got)
        if "error" in got or any(got["flushes_in_call"]):
            not_judged[entry.name] = got
            continue
        judged += 1
        if got["phases"] != [Phase.PREFILL, Phase.DECODE, Phase.DECODE]:
            failures[entry.name] = got["phases"]
        elif not got["kv_resident_last"]:
            failures[entry.name] = "decode without a resident KV cache"
    assert judged >= 9, (failures, not_judged)
    assert not failures, failures


def test_zoo_roles_and_residency(results):
    """Through the model entry point, every zoo model's weights are persistent and its
    activations ephemeral; every attention causal LM shows its q/k/v, FFN, token embedding
    and LM head,
    and the keys/values it caches (where its output carries a cache) are stateful."""
    problems = {}
    for r in results:
        if "model" in r.failed or "model" in r.cut or "model" not in r.roles:
            continue
        roles, inputs, nodes = r.roles["model"], r.residency["model"], r.node_residency["model"]
        missing = []
        if not inputs.get(Residency.PERSISTENT_WEIGHT):
            missing.append("persistent weights")
        if not nodes.get(Residency.EPHEMERAL_ACTIVATION):
            missing.append("ephemeral activations")
        if r.source == "MODEL_FOR_CAUSAL_LM" and r.attention:
            want = [
                (Role.Q_PROJECTION, Role.QKV_PROJECTION),
                (Role.FFN_UP,),
                (Role.TOKEN_EMBEDDING,),
                (Role.LM_HEAD,),
                (Role.ATTENTION,),
            ]
            missing += [w[0] for w in want if not any(roles.get(x) for x in w)]
            if r.made_cache and not nodes.get(Residency.STATEFUL_KV_CACHE):
                missing.append("stateful kv cache")
        if missing:
            problems[r.name] = missing
    assert not problems, problems


@pytest.mark.parametrize("name", ["LlamaForCausalLM", "MistralForCausalLM"])
def test_static_cache_is_stateful_from_prefill(name):
    """With a StaticCache the cache is allocated and written in place during prefill: those
    writes are the stateful KV cache already, and the decode steps read it resident."""
    from genie.semantic import hf_models

    model, _, kwargs = hf_models.build(name)
    ids = kwargs["input_ids"].to(zoo.REMOTE)
    model = model.to(zoo.REMOTE)
    analyzer = SemanticAnalyzer()
    with analyzer.observe(model) as calls, torch.no_grad():
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=2,
            min_new_tokens=2,
            do_sample=False,
            pad_token_id=0,
            cache_implementation="static",
        )
    genie.synchronize()
    assert calls.phases == [Phase.PREFILL, Phase.DECODE]
    prefill, decode = calls.profiles
    writes = [n for n in prefill.graph.nodes if n.meta["semantic_role"] == Role.KV_CACHE_UPDATE]
    assert writes and all(n.meta["data_residency"] == Residency.STATEFUL_KV_CACHE for n in writes)
    assert decode.kv_cache["present"] and decode.kv_cache["bytes"] > 0
    assert Residency.STATEFUL_KV_CACHE in decode.residency.values()


def test_analyze_hf_prints_profile_and_draws(tmp_path, capsys):
    """``genie analyze --hf MistralForCausalLM --draw x.svg`` builds a tiny random-weight
    Mistral (no download), prints an LLM profile in prefill, and draws one column per layer
    with a legend of the phases and the KV-cache writes marked."""
    import xml.etree.ElementTree as ET

    from genie.semantic.cli import main

    svg = tmp_path / "mistral.svg"
    assert main(["--hf", "MistralForCausalLM", "--draw", str(svg)]) == 0
    out = capsys.readouterr().out
    assert "workload      llm" in out and "call phase    prefill" in out
    texts = [e.text for e in ET.parse(svg).getroot().iter("{http://www.w3.org/2000/svg}text")]
    assert {"layer 0", "layer 1", "prefill", "embedding", "KV", "q_projection"} <= set(texts)
    assert main(["--hf", "NoSuchModelForCausalLM"]) == 2
    assert "neither a model class nor a config name" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["T5ForConditionalGeneration", "BartForConditionalGeneration"])
def test_seq2seq_encoder_then_decoder_phases(built, name):
    """A seq2seq model's forward is the encoder (``text_encoder``) and the decoder
    (``prefill``) in one graph; under generate() the encoder runs once as a call of its own,
    then every new token is a decode step."""
    from genie.semantic import hf_models

    model, args, kwargs = hf_models.build(name)
    profile = SemanticAnalyzer().analyze(model, *args, **kwargs)
    genie.synchronize()
    assert profile.structure.architecture == "transformer_seq2seq"
    assert Phase.TEXT_ENCODER in profile.phases and Phase.PREFILL in profile.phases
    entries, _ = built
    entry = next(e for e in entries if e.name == name)
    got = zoo.generate_phases(entry, decoder_start_token_id=0)
    assert got["phases"] == [Phase.TEXT_ENCODER, Phase.DECODE, Phase.DECODE, Phase.DECODE], got


_PHASES_OF = {  # the phases a forward of each kind of zoo model must show
    "MODEL_FOR_MASKED_LM": {Phase.EMBEDDING, Phase.TEXT_ENCODER},
    "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM": {Phase.TEXT_ENCODER, Phase.PREFILL},
    "MODEL_FOR_IMAGE_CLASSIFICATION": {Phase.VISION_BACKBONE, Phase.VISION_HEAD},
    "MODEL_FOR_ZERO_SHOT_IMAGE_CLASSIFICATION": {
        Phase.VISION_BACKBONE,
        Phase.TEXT_ENCODER,
        Phase.MULTIMODAL_FUSION,
    },
    "MODEL_FOR_IMAGE_TEXT_TO_TEXT": {Phase.MULTIMODAL_FUSION},
    "MODEL_FOR_AUDIO_CLASSIFICATION": {Phase.AUDIO_ENCODER},
    "MODEL_FOR_CTC": {Phase.AUDIO_ENCODER},
    "recsys": {Phase.EMBEDDING, Phase.DENSE_MLP, Phase.INTERACTION},
}


@pytest.mark.parametrize("entry_point", ["graph", "model"])
def test_zoo_phases_by_kind(results, entry_point):
    """Encoders, vision backbone then head, where modalities meet (with a fusion point),
    audio encoders, recommender embeddings / dense MLPs / interaction: each zoo model's
    forward shows the phases of its kind (forwards a flush cut part way are not judged)."""
    problems = {}
    judged = 0
    for r in results:
        if entry_point in r.failed or entry_point in r.cut:
            continue
        want = _PHASES_OF.get(r.source) or _PHASES_OF.get(r.expected)
        if want is None or (r.source.startswith("MODEL_FOR_SEQ_TO_SEQ") and not r.encoder_decoder):
            continue  # listed as seq2seq, but a decoder-only LM (with an audio tower)
        judged += 1
        got = set(r.phases[entry_point])
        if not want <= got:
            problems[r.name] = sorted(want - got)
        if Phase.MULTIMODAL_FUSION in want and not r.fusion_points[entry_point]:
            problems[r.name] = "no fusion point"
    assert judged >= 35
    assert not problems, problems


class _RotaryEmbedding(torch.nn.Module):
    """Named like an embedding table, holds none (as HF's rotary embeddings)."""

    def forward(self, x):
        return x.sin(), x.cos()


class _HostileAttention(torch.nn.Module):
    """Named like attention; reading any attribute it lacks raises something odd."""

    def __getattr__(self, name):
        if name.startswith("_") or name in ("training",):
            return super().__getattr__(name)
        raise RuntimeError(f"no {name} here")

    def forward(self, x):
        return x * 2


class _OddModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.tokens = torch.nn.Embedding(50, 16)
        self.rotary_embedding = _RotaryEmbedding()
        self.attention_thing = _HostileAttention()
        self.proj = torch.nn.Linear(16, 16)

    def forward(self, ids):
        x = self.tokens(ids)
        s, c = self.rotary_embedding(x)
        return self.proj(self.attention_thing(x * c + s))


def test_unknown_module_classes_never_raise_and_are_reported():
    """Module classes named like what they are not (an Embedding without a table, an Attention
    that raises on attribute access) do not make the analyzer raise; the profile names
    what it skipped."""
    model = _OddModel().eval()
    ids = torch.randint(0, 50, (2, 6))
    profile = SemanticAnalyzer().analyze(model, ids)
    genie.synchronize()
    skipped = "\n".join(profile.metadata["skipped"])
    assert "rotary_embedding" in skipped and "attention_thing" in skipped
    assert "not read" in profile.format()
