"""The Graph IR: structure, identity, conversions and hand-off validation."""

from __future__ import annotations

import json

import networkx as nx
import pytest
import torch
from fakes import REMOTE, gpt2

import genie


def _record_mlp(x_value=None):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).to(
        REMOTE
    )
    x = (x_value if x_value is not None else torch.randn(2, 8)).to(REMOTE)
    return m(x)


def test_pending_graph_structure():
    y = _record_mlp()
    g = genie.get_graph()
    ops = [n.name for n in g]
    assert ops.count("addmm") == 2 and "relu" in ops
    relu = next(n for n in g if n.name == "relu")
    assert [p.name for p in g.producers(relu)] == ["addmm"]
    assert any(c.name == "addmm" for c in g.consumers(g.producers(relu)[0])) or g.consumers(relu)
    assert set(g.constants) <= set(g.input_storages)
    assert nx.is_directed_acyclic_graph(g.to_networkx())
    y.cpu()
    assert genie.get_graph().nodes == [] or all(n.id > relu.id for n in genie.get_graph())
    assert relu.id in {n.id for n in genie.last_graph()}


def test_structural_hash_is_stable_and_value_blind():
    _record_mlp(torch.zeros(2, 8))
    h1 = genie.get_graph().structural_hash()
    genie.synchronize()
    _record_mlp(torch.ones(2, 8))
    h2 = genie.get_graph().structural_hash()
    genie.synchronize()
    x = torch.randn(3, 8).to(REMOTE)  # another shape: another program
    torch.nn.Linear(8, 4).to(REMOTE)(x)
    h3 = genie.get_graph().structural_hash()
    assert h1 == h2 != h3


def test_to_fx_reproduces_values():
    torch.manual_seed(0)
    a = torch.randn(4, 4)
    x = a.to(REMOTE)
    y = (x @ x.t()).relu() + 1
    g = genie.get_graph()
    gm = g.to_fx()
    args = [g.constants[s] for s in g.input_storages]
    outs = gm(*args)
    expected = (a @ a.t()).relu() + 1
    assert any(isinstance(o, torch.Tensor) and torch.equal(o, expected) for o in outs)
    assert torch.equal(y.cpu(), expected)


def test_json_and_dot_export(tmp_path):
    model = gpt2()
    ids = torch.randint(0, 500, (1, 6))
    with torch.no_grad():
        model.to(REMOTE)(ids.to(REMOTE))
    g = genie.get_graph()
    doc = json.loads(json.dumps(g.to_json()))
    assert doc["hash"] == g.structural_hash()
    assert len(doc["nodes"]) == len(g)
    assert {"op", "args", "inputs", "outputs", "producers"} <= set(doc["nodes"][0])
    dot = g.to_dot()
    assert dot.startswith('digraph "genie"') and dot.rstrip().endswith("}")
    for n in g:
        assert f"  n{n.id} [" in dot
    for p, n in g.edges():
        assert f"  n{p} -> n{n};" in dot
    (tmp_path / "g.dot").write_text(dot)


def test_handoff_validation():
    x = torch.ones(3).to(REMOTE)
    y = (x + 1) * 2
    g = genie.get_graph()
    genie.GraphHandoff.for_graph(g, wanted={genie._C._storage_id(y)}).validate()
    with pytest.raises(genie.GraphValidationError, match="nothing before it produces"):
        genie.GraphHandoff(g, supplied=set(), wanted=set()).validate()
    with pytest.raises(genie.GraphValidationError, match="neither produced nor supplied"):
        genie.GraphHandoff.for_graph(g, wanted={10**9}).validate()
    y.cpu()
