"""The semantic layer on models it was not written against: the zoo of tests/semantic_zoo.py
(tiny random-weight transformers models from the auto mappings, recommenders, plain models)
through both entry points. What a user sees: the workload each model is, no exception from
the analyzer, and prefill then decode phases while a causal LM generates."""

from __future__ import annotations

import genie
import pytest
import semantic_zoo as zoo
import torch
from genie.semantic import Phase, SemanticAnalyzer

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
    prompt, then one decode step per new token, each against a resident KV cache."""
    lms = _causal_lms(built)
    assert len(lms) >= 9
    ran = 0
    failures = {}
    cut = {}
    for entry in lms:
        model, _, kwargs = entry.build()
        ids = kwargs["input_ids"]
        model = model.to(zoo.REMOTE)
        analyzer = SemanticAnalyzer()
        try:
            with analyzer.observe(model) as calls, torch.no_grad():
                model.generate(
                    ids.to(zoo.REMOTE),
                    attention_mask=torch.ones_like(ids).to(zoo.REMOTE),
                    max_new_tokens=3,
                    min_new_tokens=3,
                    do_sample=False,
                    pad_token_id=0,
                )
        except genie.ExecutionError as exc:  # the runtime's business: say so, go on
            failures[entry.name] = f"runtime: {exc}".splitlines()[0]
            continue
        finally:
            genie.synchronize()
        assert not calls.errors, (entry.name, calls.errors)
        if any(p.metadata["flushes_in_call"] for p in calls.profiles):
            cut[entry.name] = [p.metadata["flushes_in_call"] for p in calls.profiles]
            continue  # a data-dependent op flushed the call part way: only its tail is seen
        ran += 1
        phases = calls.phases
        if phases != [Phase.PREFILL, Phase.DECODE, Phase.DECODE]:
            failures[entry.name] = phases
            continue
        decode = calls.profiles[-1]
        if not decode.kv_cache["present"]:
            failures[entry.name] = "decode without a resident KV cache"
    assert ran >= 9, (failures, cut)
    assert not {k: v for k, v in failures.items() if not str(v).startswith("runtime")}, failures
