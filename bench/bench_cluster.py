"""The scheduler on paper at cluster scale: a simulated 64-GPU cluster (8 hosts of 8 H100s,
NVLink inside a host, 400 Gb/s between hosts, the client on 100 Gb/s Ethernet) planning a
GPT-2-XL-sized forward (48 layers, width 1600, batch 8, sequence 128) and a ResNet-152-sized
CNN (bottleneck blocks 3-8-36-3, batch 64, 224x224).

Nothing runs and nothing is allocated: the models are built on the meta device and moved to
remote_accelerator with to_empty(), so their forwards are only recorded. Per strategy: the
median cold time to schedule and plan (fresh Scheduler and Planner, so no cache helps;
one untimed run first warms the topology's routes), the
estimate's makespan, the devices used and the bytes the plan moves.

Goal (issue: scale-out): plan time <= 50 ms for the GPT-2-XL-sized graph.

    python bench/bench_cluster.py [--repeats 5] [--strategies pipeline,auto]

Prints a table and writes bench/results/cluster.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import genie
from genie.scheduler import GraphCostEstimator, NetworkTopology, Planner, Scheduler

ROOT = Path(__file__).resolve().parent.parent
REMOTE = "remote_accelerator:0"


def cluster(hosts: int = 8, per_host: int = 8) -> NetworkTopology:
    topo = NetworkTopology()
    names = [[f"h{h}g{g}" for g in range(per_host)] for h in range(hosts)]
    flat = [n for host in names for n in host]
    for n in flat:
        topo.add_device(n, "H100", host=n.split("g")[0])
        topo.add_link(topo.client, n, kind="eth100")
    for i, a in enumerate(flat):
        for b in flat[i + 1 :]:
            same_host = a.split("g")[0] == b.split("g")[0]
            topo.add_link(a, b, kind="nvlink4" if same_host else "ib400")
    return topo


def gpt2_xl_graph() -> genie.Graph:
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config(n_layer=48, n_embd=1600, n_head=25)).eval()
    model = model.to_empty(device=REMOTE)
    with torch.no_grad():
        model(torch.randint(0, 50257, (8, 128)).to(REMOTE))
    return _take()


class _Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = width * 4
        self.body = nn.Sequential(
            nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )  # fmt: skip
        self.skip = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x):
        return torch.relu(self.body(x) + self.skip(x))


def resnet152_graph() -> genie.Graph:
    layers, cin = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                   nn.MaxPool2d(3, 2, 1)], 64  # fmt: skip
    for blocks, width, stride in ((3, 64, 1), (8, 128, 2), (36, 256, 2), (3, 512, 2)):
        for i in range(blocks):
            layers.append(_Bottleneck(cin, width, stride if i == 0 else 1))
            cin = width * 4
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 1000)]
    with torch.device("meta"):
        model = nn.Sequential(*layers).eval()
    model = model.to_empty(device=REMOTE)
    with torch.no_grad():
        model(torch.empty(64, 3, 224, 224).to(REMOTE))
    return _take()


def _take() -> genie.Graph:
    """The pending program as a graph; then nothing is pending (its tensors are unreachable
    once the builder returns, so collecting drops the nodes without running them)."""
    g = genie.get_graph()
    return genie.Graph(g.nodes, g.constants)


def _recorded(build) -> genie.Graph:
    graph = build()
    gc.collect()
    genie._C._collect()
    assert genie.stats()["pending_nodes"] == 0, "a builder left work pending"
    return graph


def plan_once(graph: genie.Graph, topo: NetworkTopology, strategy: str):
    g = genie.Graph(graph.nodes, graph.constants)  # a fresh object: its hash is computed
    scheduler = Scheduler(GraphCostEstimator(), topo, strategy=strategy)
    schedule = scheduler.create_schedule(g)
    plan = Planner(scheduler.estimator, topo).generate_plan(g, None, schedule)
    return schedule, plan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--strategies", default="pipeline,auto")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "cluster.json"))
    args = ap.parse_args()
    topo = cluster()
    rows = []
    for name, build in (("GPT-2-XL size", gpt2_xl_graph), ("ResNet-152 size", resnet152_graph)):
        graph = _recorded(build)
        for strategy in args.strategies.split(","):
            plan_once(graph, topo, strategy)  # warm: the topology's routes, imports
            times, schedule, plan = [], None, None
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                schedule, plan = plan_once(graph, topo, strategy)
                times.append((time.perf_counter() - t0) * 1e3)
            rows.append({
                "graph": name, "nodes": len(graph.nodes), "strategy": strategy,
                "plan_ms": statistics.median(times), "plan_ms_all": times,
                "makespan_ms": schedule.makespan * 1e3,
                "devices_used": len(schedule.devices_used),
                "moved_mb": schedule.moved_bytes / 2**20,
                "fragments": len(plan.fragments), "transfers": len(plan.transfers),
            })  # fmt: skip
    print(f"{'graph':<17}{'nodes':>6} {'strategy':<10}{'plan ms':>9}{'makespan ms':>13}"
          f"{'GPUs':>6}{'moved MB':>10}{'fragments':>11}")  # fmt: skip
    for r in rows:
        goal = " (goal <= 50 ms)" if r["graph"].startswith("GPT") else ""
        print(f"{r['graph']:<17}{r['nodes']:>6} {r['strategy']:<10}{r['plan_ms']:>9.1f}"
              f"{r['makespan_ms']:>13.2f}{r['devices_used']:>6}{r['moved_mb']:>10.1f}"
              f"{r['fragments']:>11}{goal}")  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.node(), "cluster": "8 hosts x 8 H100, nvlink4 / ib400 / eth100"}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
