"""The analyzer's machinery: module contexts, tier-1 statistics, the result cache, the
environment switches, the JSON/DOT output of ``genie analyze``, layering."""

from __future__ import annotations

import ast
import json
import logging
import math
from pathlib import Path

import fakes
import pytest
import semantic_models
import torch

import genie
from genie import _C
from genie.semantic import (
    AnalyzerConfig,
    ModuleContextTracker,
    Phase,
    SemanticAnalyzer,
    WorkloadType,
    context_table,
)
from genie.semantic.cli import add_analyze_arguments, analyze_command

REMOTE = fakes.REMOTE


class Boom(torch.nn.Module):
    def forward(self, x):
        raise RuntimeError("forward failed")


class Outer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = torch.nn.Linear(4, 4)
        self.boom = Boom()

    def forward(self, x, fail=False):
        y = self.inner(x).relu()
        return self.boom(y) if fail else y * 2


def test_module_contexts_nest_restore_and_are_interned():
    model = Outer()
    x = torch.randn(2, 4).to(REMOTE)
    _C._set_context(0)
    with ModuleContextTracker(model) as tracker:
        y1 = model(x)
        assert _C._current_context() == 0  # restored after the call
        y2 = model(x)
        with pytest.raises(RuntimeError, match="forward failed"):
            model(x, fail=True)
        assert _C._current_context() == 0  # restored by the post hook on the way out
    assert not tracker.installed
    g = genie.get_graph()
    table = context_table()
    # addmm, relu, mul per call; the failing call recorded addmm and relu before raising
    assert [n.name for n in g.nodes] == ["addmm", "relu", "mul"] * 2 + ["addmm", "relu"]
    contexts = [n.context for n in g.nodes]
    assert contexts[:3] == contexts[3:6] == contexts[:3]  # same module, same way: same id
    paths = [table.get(c).path for c in contexts]
    assert paths == ["inner", "", ""] * 2 + ["inner", ""]
    inner = table.get(contexts[0])
    assert (inner.path, inner.type, inner.depth, inner.call_index) == ("inner", "Linear", 1, 0)
    assert table.get(inner.parent).path == "" and table.get(inner.parent).type == "Outer"
    del y1, y2


class Branchy(torch.nn.Module):
    """Python control flow on a tensor value: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(4, 4)
        self.b = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.a(x) if x.shape[0] > 1 and bool(x.sum() > -1e9) else self.b(x)


def test_structure_from_fx_module_tree_or_contexts():
    branchy = Branchy()
    traced = SemanticAnalyzer().analyze(semantic_models.mlp(), torch.randn(2, 20))
    assert traced.structure.source == "fx" and traced.structure.depth == 3
    # fx fails on data-dependent control flow: the module tree answers, the reason is kept
    tree = SemanticAnalyzer().analyze(branchy, torch.randn(2, 4))
    assert tree.structure.source == "module_tree" and "TraceError" in tree.structure.fx_error
    assert tree.structure.parameter_count == 40 and tree.structure.architecture == "mlp"
    # no model at hand: the module contexts stamped on the graph give the tree that ran
    model = fakes.gpt2()
    with ModuleContextTracker(model), torch.no_grad():
        out = model(torch.randint(0, 500, (1, 4)).to(REMOTE))
    profile = SemanticAnalyzer().analyze_graph(genie.get_graph())
    st = profile.structure
    assert (st.source, st.architecture, st.model_type) == (
        "contexts",
        "transformer_decoder",
        "GPT2LMHeadModel",
    )
    assert st.depth == 2 and st.blocks == ["transformer.h.0", "transformer.h.1"]
    # counted from the weights the graph reads (lm_head's tied view is uploaded on its own)
    assert st.parameter_count >= sum(p.numel() for p in model.parameters())
    assert {"path": "transformer.h.1.attn.c_attn", "type": "Conv1D", "depth": 5} in st.hierarchy
    # the pending graph still holds Branchy's call too; the structure describes GPT-2's
    assert {h["type"] for h in st.hierarchy if h["depth"] == 0} == {"GPT2LMHeadModel"}
    del out


def test_op_stream_statistics_and_topology():
    x = torch.randn(8, 8).to(REMOTE)
    with torch.no_grad():
        a = x @ x
        b = x.relu()
        y = a + b
    profile = SemanticAnalyzer().analyze_graph(genie.get_graph())
    s = profile.op_stats
    assert (s.nodes, s.edges) == (3, 2)
    assert dict(s.histogram) == {"mm": 1, "relu": 1, "add": 1}
    assert s.entropy == pytest.approx(math.log2(3))
    assert s.diversity == 1.0 and s.is_dag and s.components == 1
    assert (s.critical_path, s.max_width, s.sources, s.sinks) == (2, 2, 2, 1)
    # genie.graph.ops's convention, shared with the scheduler: mm 2MKN, one per output element
    assert s.flops == pytest.approx(2 * 8 * 8 * 8 + 64 + 64)
    assert profile.parallelism["max_width"] == 2
    del y


def test_cached_results_replay_onto_a_new_recording():
    analyzer = SemanticAnalyzer(AnalyzerConfig(cache=True))
    model = fakes.gpt2()
    ids = torch.randint(0, 500, (2, 8))
    first = analyzer.analyze(model, ids)
    genie.synchronize()
    second = analyzer.analyze(model, ids)
    assert not first.metadata["cache_hit"] and second.metadata["cache_hit"]
    assert second.graph is not first.graph
    new_ids = {n.id for n in second.graph.nodes}
    assert set(first.phases[Phase.PREFILL]).isdisjoint(new_ids)  # ids of the old recording
    assert set(second.phases[Phase.PREFILL]) <= new_ids  # mapped onto the new one
    assert [n.meta for n in first.graph.nodes] == [n.meta for n in second.graph.nodes]
    assert set(second.kv_cache["nodes"]) <= new_ids
    assert second.workload_type == WorkloadType.LLM
    report = analyzer.get_performance_report()
    assert (report["analyses"], report["cache_hits"], report["cache_misses"]) == (2, 1, 1)
    assert report["hit_rate"] == 0.5 and report["tier_avg_ms"]["tier3_semantics"] > 0
    assert report["phases"]["phases"][Phase.PREFILL]["calls"] == 2
    analyzer.clear_cache()
    assert analyzer.get_performance_report()["cache_entries"] == 0


def test_environment_switches(monkeypatch, caplog):
    monkeypatch.setenv("GENIE_ANALYZER_CACHE", "0")
    monkeypatch.setenv("GENIE_ANALYZER_SLOW_MS", "0")
    monkeypatch.setenv("GENIE_ANALYZER_DEBUG", "1")
    monkeypatch.setenv("GENIE_FAST_PATTERNS", "1")
    monkeypatch.setenv("GENIE_PHASE_DETECTION", "0")
    cfg = AnalyzerConfig.from_env()
    assert (cfg.cache, cfg.slow_ms, cfg.debug, cfg.fast_patterns, cfg.phase_detection) == (
        False,
        0.0,
        True,
        True,
        False,
    )
    analyzer = SemanticAnalyzer()
    model = fakes.resnet()
    with caplog.at_level(logging.INFO, logger="genie.semantic"):
        p1 = analyzer.analyze(model, torch.randn(1, 3, 16, 16))
        genie.synchronize()
        p2 = analyzer.analyze(model, torch.randn(1, 3, 16, 16))
    assert not p2.metadata["cache_hit"]  # cache off
    assert any("over GENIE_ANALYZER_SLOW_MS=0" in r.message for r in caplog.records)
    assert any("genie: analyzed" in r.message for r in caplog.records)  # debug summary
    assert "residual_block" in p1.metadata["debug"]["pattern_ms"]
    assert p1.phases == {} and all("execution_phase" not in n.meta for n in p1.graph.nodes)
    # fast patterns: no subgraph matching, the same verdicts from counts and roles
    assert p1.workload_type == WorkloadType.VISION
    assert p1.pattern("residual_block").hints["kinds"] == {}
    report = analyzer.get_performance_report()
    assert report["cache_hits"] == 0 and len(report["slow_analyses"]) == 2

    monkeypatch.setenv("GENIE_ANALYZER_CACHE", "7")
    assert AnalyzerConfig.from_env().cache_size == 7
    monkeypatch.setenv("GENIE_PHASE_DETECTION", "maybe")
    assert AnalyzerConfig.from_env().phase_detection is True  # not understood: default kept


def test_profile_serialises():
    profile = SemanticAnalyzer().analyze(
        semantic_models.vqa(), torch.randn(1, 3, 16, 16), torch.randint(0, 300, (1, 4))
    )
    doc = json.loads(profile.to_json())
    assert doc["workload_type"] == "multimodal"
    assert doc["patterns"][0]["name"] in {p.name for p in profile.patterns}
    assert set(doc["phases"]) == set(profile.phases)
    assert doc["structure"]["architecture"] == "multimodal"
    text = profile.format()
    assert text.startswith("workload      multimodal") and "multimodal_fusion" in text


GPT2_SCRIPT = """
import torch
from transformers import GPT2Config, GPT2LMHeadModel

def build():
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=32)
    return GPT2LMHeadModel(cfg).eval(), {"input_ids": torch.randint(0, 100, (1, 5))}
"""


def _run_cli(argv):
    import argparse

    parser = add_analyze_arguments(argparse.ArgumentParser())
    return analyze_command(parser.parse_args(argv))


def test_genie_analyze_prints_the_profile_and_writes_json_and_dot(tmp_path, capsys):
    script = tmp_path / "gpt2_example.py"
    script.write_text(GPT2_SCRIPT)
    out_json, out_dot = tmp_path / "g.json", tmp_path / "g.dot"
    assert _run_cli([str(script), "--json", str(out_json), "--dot", str(out_dot), "--hints"]) == 0
    printed = capsys.readouterr().out
    assert "workload      llm" in printed and "prefill" in printed
    assert '"kv_cache": true' in printed  # --hints
    doc = json.loads(out_json.read_text())
    assert doc["profile"]["workload_type"] == "llm"
    metas = [n["meta"] for n in doc["graph"]["nodes"]]
    assert {"qkv_projection", "ffn_up", "lm_head"} <= {m["semantic_role"] for m in metas}
    assert all("execution_phase" in m and "data_residency" in m for m in metas)
    dot = out_dot.read_text()
    assert dot.startswith('digraph "GPT2LMHeadModel"') and "semantic_role=qkv_projection" in dot
    assert "execution_phase=prefill" in dot


def test_genie_analyze_module_target_and_errors(tmp_path, capsys):
    assert _run_cli(["semantic_models:TinyDLRMNotHere"]) == 2
    assert "TinyDLRMNotHere" in capsys.readouterr().err
    assert _run_cli([str(tmp_path / "missing.py")]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "mlp_example.py").write_text(
        "import torch\nmodel = torch.nn.Linear(3, 2)\nexample_inputs = torch.randn(2, 3)\n"
    )
    assert _run_cli([str(tmp_path / "mlp_example.py")]) == 0
    assert "workload      unknown" in capsys.readouterr().out


def test_semantic_layer_imports_neither_runtime_nor_scheduler():
    root = Path(genie.semantic.__file__).parent
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert not name.startswith(("genie.runtime", "genie.scheduler")), (path, name)
