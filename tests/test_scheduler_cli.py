"""``genie analyze --schedule``: the printed schedule and plan, JSON, and the drawing."""

from __future__ import annotations

import argparse
import builtins
import io
import json

import pytest

from genie.scheduler.cli import add_schedule_arguments, schedule_command


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    add_schedule_arguments(parser)
    return parser.parse_args(argv)


def test_schedule_prints_schedule_and_plan(tmp_path):
    out = io.StringIO()
    path = tmp_path / "s.json"
    rc = schedule_command(
        _args("vqa", "--schedule", "--devices", "2", "--schedule-json", str(path)), out=out
    )
    text = out.getvalue()
    assert rc == 0
    assert "strategy=parallel" in text and "gpu0" in text and "gpu1" in text
    assert "plan  fragments=" in text and "scheduled in" in text
    data = json.loads(path.read_text())
    assert data["schedule"]["strategy"] == "parallel" and data["plan"]["fragments"] >= 2


def test_schedule_with_a_topology_file(tmp_path):
    topo = tmp_path / "cluster.toml"
    topo.write_text(
        '[[device]]\nname = "big"\ntype = "H200"\n[[device]]\nname = "small"\ntype = "L4"\n'
        '[[link]]\na = "client"\nb = "big"\nbandwidth_gbps = 100\n'
        '[[link]]\na = "big"\nb = "small"\nkind = "pcie4"\n'
    )
    out = io.StringIO()
    rc = schedule_command(
        _args("resnet", "--schedule", "--topology", str(topo), "--strategy", "pipeline"), out=out
    )
    assert rc == 0
    assert "strategy=pipeline" in out.getvalue() and "small" in out.getvalue()


def test_draw_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "schedule.png"
    out = io.StringIO()
    assert (
        schedule_command(
            _args("gpt2", "--schedule", "--strategy", "pipeline", "--draw", str(png)), out=out
        )
        == 0
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_plan_says_what_crosses_each_link(tmp_path):
    """Over three servers of a topology file, the printed plan and its JSON say, per link,
    how many uploads and transfers cross it and how many bytes: what the chart labels."""
    topo = tmp_path / "servers.toml"
    topo.write_text(
        "".join(
            f'[[device]]\nname = "server{i}"\ntype = "H100"\nendpoint = "tcp://10.0.0.{i}:7070"\n'
            for i in range(3)
        )
        + "".join(f'[[link]]\na = "client"\nb = "server{i}"\nkind = "eth100"\n' for i in range(3))
        + '[[link]]\na = "server0"\nb = "server1"\nkind = "eth100"\n'
        + '[[link]]\na = "server1"\nb = "server2"\nkind = "eth100"\n'
    )
    out = io.StringIO()
    path = tmp_path / "s.json"
    args = ("gpt2", "--schedule", "--topology", str(topo), "--strategy", "pipeline")
    assert schedule_command(_args(*args, "--schedule-json", str(path)), out=out) == 0
    text = out.getvalue()
    moves = json.loads(path.read_text())["plan"]["moves"]
    between = [m for m in moves if m["src"] != "client"]
    assert between and all(m["bytes"] > 0 and m["count"] > 0 for m in between)
    for m in moves:
        assert f"moves {m['src']} -> {m['dst']}: {m['count']} " in text
    assert {m["dst"] for m in moves if m["src"] == "client"} == {"server0", "server1", "server2"}


def test_data_parallel_of_one_batch_says_how_to_slice_it(capsys):
    rc = schedule_command(_args("gpt2", "--schedule", "--strategy", "data"), out=io.StringIO())
    assert rc == 1
    assert "torch.chunk" in capsys.readouterr().err


def test_draw_without_matplotlib_says_so(tmp_path, monkeypatch, capsys):
    real_import = builtins.__import__

    def no_matplotlib(name, *a, **kw):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib here")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    rc = schedule_command(
        _args("resnet", "--schedule", "--draw", str(tmp_path / "x.png")), out=io.StringIO()
    )
    assert rc == 1
    assert "needs matplotlib" in capsys.readouterr().err


def test_unknown_model_and_missing_graph(capsys):
    from genie.scheduler import SchedulingError
    from genie.scheduler.cli import demo_graph

    with pytest.raises(SchedulingError, match="unknown demo model"):
        demo_graph("alexnet")
    assert schedule_command(argparse.Namespace(schedule=True)) == 2
    assert "needs a graph" in capsys.readouterr().err
