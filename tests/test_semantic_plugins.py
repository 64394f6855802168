"""Pattern plugins: the registry, composable predicates, entry-point and environment plugins,
broken plugins reported and skipped."""

from __future__ import annotations

import sys
import textwrap

import fakes
import pytest
import torch

from genie.semantic import (
    FunctionPattern,
    MatchedPattern,
    PatternRegistry,
    PredicatePattern,
    SemanticAnalyzer,
    WorkloadType,
    any_chain,
    chain,
    register_pattern,
)
from genie.semantic.patterns import has_op_class, has_role, negate

PLUGIN = """
from genie.semantic import MatchedPattern

class ActivationCount:
    name = "{name}"

    def match(self, ctx):
        n = ctx.count_class("act")
        return MatchedPattern(self.name, 0.7, {{"activations": n}}) if n else None

def make_patterns():
    from genie.semantic import FunctionPattern
    return [FunctionPattern("{name}_fn", lambda ctx: 0.6 if ctx.count_class("matmul") else None)]

class Broken:
    def __init__(self):
        raise RuntimeError("this plugin cannot start")

class NamedLLM:
    name = "llm"  # collides with the built-in

    def match(self, ctx):
        return None
"""


def _mlp_graph_profile(analyzer):
    return analyzer.analyze(
        torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)),
        torch.randn(3, 4),
    )


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    """A directory on sys.path holding a plugin module and an installed distribution whose
    entry_points.txt registers patterns in the ``genie.patterns`` group."""
    mod = f"genie_test_plugin_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{mod}.py").write_text(textwrap.dedent(PLUGIN.format(name="acts")))
    dist = tmp_path / "genie_test_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: genie-test-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[genie.patterns]\n"
        f"acts = {mod}:ActivationCount\n"
        f"factory = {mod}:make_patterns\n"
        f"missing = {mod}:NoSuchThing\n"
        f"duplicate = {mod}:NamedLLM\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("GENIE_PATTERN_PLUGINS", raising=False)
    yield mod
    sys.modules.pop(mod, None)


def test_entry_point_plugins_load_and_broken_ones_are_skipped(plugin_dir):
    registry = PatternRegistry()
    names = registry.names()
    assert {"acts", "acts_fn"} <= set(names)
    assert registry.origin("acts").startswith("entry_point")
    errors = {e.target.split("=")[0]: e.error for e in registry.plugin_errors}
    assert "NoSuchThing" in errors["missing"]
    assert "already registered" in errors["duplicate"]
    assert registry.origin("llm") == "builtin"  # the built-in kept its name
    profile = _mlp_graph_profile(SemanticAnalyzer(registry=registry))
    acts = profile.pattern("acts")
    assert acts is not None and acts.confidence == 0.7 and acts.hints == {"activations": 1}
    assert profile.pattern("acts_fn").confidence == 0.6
    assert profile.workload_type == WorkloadType.UNKNOWN  # plugins without a workload vote


def test_environment_plugins(tmp_path, monkeypatch):
    mod = "genie_env_plugin_mod"
    (tmp_path / f"{mod}.py").write_text(textwrap.dedent(PLUGIN.format(name="env")))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(
        "GENIE_PATTERN_PLUGINS",
        f"{mod}:ActivationCount, {mod}:make_patterns,{mod}:Broken,no_such_module_xyz:Thing,oops",
    )
    try:
        registry = PatternRegistry()
        assert {"env", "env_fn"} <= set(registry.names())
        assert all(registry.origin(n).startswith("env") for n in ("env", "env_fn"))
        errors = [str(e) for e in registry.plugin_errors]
        assert any("Broken" in e and "cannot start" in e for e in errors)
        assert any("no_such_module_xyz" in e for e in errors)
        assert any("module:attribute" in e for e in errors)
        analyzer = SemanticAnalyzer(registry=registry)
        assert _mlp_graph_profile(analyzer).pattern("env") is not None
        assert analyzer.get_performance_report()["plugin_errors"] == errors
    finally:
        sys.modules.pop(mod, None)


def test_registry_refuses_duplicate_names():
    registry = PatternRegistry(plugins=False)
    with pytest.raises(ValueError, match="'llm' is already registered"):
        registry.register(FunctionPattern("llm", lambda ctx: 1.0))

    @register_pattern(registry=registry, workload=WorkloadType.VISION)
    def wide_convs(ctx):
        return 0.9 if ctx.count_class("conv") >= 3 else None

    with pytest.raises(ValueError, match="wide_convs"):
        register_pattern(FunctionPattern("wide_convs", lambda ctx: None), registry=registry)
    with pytest.raises(TypeError, match="not a pattern"):
        registry.register(object())
    profile = SemanticAnalyzer(registry=registry).analyze(fakes.resnet(), torch.randn(1, 3, 16, 16))
    m = profile.pattern("wide_convs")
    assert m.confidence == 0.9 and m.workload == WorkloadType.VISION


def test_predicates_compose_like_operator_support():
    registry = PatternRegistry(builtins=False, plugins=False)
    registry.register(
        PredicatePattern(
            "conv_no_attention",
            requires=chain(has_op_class("conv", at_least=2), negate(has_op_class("attention"))),
            evidence=[(any_chain(has_role("residual_add"), has_role("no_such_role")), 0.3)],
            base=0.5,
            workload=WorkloadType.VISION,
        )
    )
    registry.register(
        PredicatePattern(
            "never", requires=chain(has_op_class("conv"), has_op_class("embedding_bag"))
        )
    )
    analyzer = SemanticAnalyzer(registry=registry)
    cnn = analyzer.analyze(fakes.resnet(), torch.randn(1, 3, 16, 16))
    [m] = cnn.patterns
    assert m.name == "conv_no_attention" and m.confidence == pytest.approx(0.8)
    assert "any_chain(roles[residual_add]>=1, roles[no_such_role]>=1)" in m.evidence
    assert cnn.workload_type == WorkloadType.VISION
    bert = analyzer.analyze(fakes.bert(), torch.randint(0, 500, (1, 5)))
    assert bert.patterns == [] and bert.workload_type == WorkloadType.UNKNOWN


def test_a_pattern_that_raises_is_reported_and_skipped():
    registry = PatternRegistry(plugins=False)

    def explode(ctx):
        raise KeyError("boom")

    registry.register(FunctionPattern("explodes", explode))
    analyzer = SemanticAnalyzer(registry=registry)
    profile = _mlp_graph_profile(analyzer)
    assert profile.pattern("explodes") is None
    [err] = registry.plugin_errors
    assert err.source == "match" and err.target == "explodes" and "boom" in err.error


def test_matched_pattern_reads_like_the_issue():
    m = MatchedPattern("llm", 0.94, {"kv_cache": True})
    assert repr(m) == "MatchedPattern('llm', 0.94, {'kv_cache': True})"
    assert m.to_dict()["confidence"] == 0.94
