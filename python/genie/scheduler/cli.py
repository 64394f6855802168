"""``genie analyze --schedule``: print (and draw) the schedule and plan of a graph.

The CLI wires this in with::

    from genie.scheduler.cli import add_schedule_arguments, schedule_command
    add_schedule_arguments(analyze_parser)
    ...
    if args.schedule:
        return schedule_command(args, graph=graph, profile=profile)

When no graph is handed over, ``schedule_command`` records one of the built-in tiny demo
models named by ``args.model`` (gpt2, gpt2-decode, bert, resnet, vqa).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, TextIO

from genie.graph.ir import Graph
from genie.scheduler.cost_model import GraphCostEstimator
from genie.scheduler.errors import SchedulingError
from genie.scheduler.planner import Planner
from genie.scheduler.policies import STRATEGIES
from genie.scheduler.scheduler import Scheduler
from genie.scheduler.topology import NetworkTopology

logger = logging.getLogger(__name__)

__all__ = ["add_schedule_arguments", "schedule_command", "demo_graph", "DEMO_MODELS"]

DEMO_MODELS = ("gpt2", "gpt2-decode", "bert", "resnet", "vqa")


def add_schedule_arguments(parser: argparse.ArgumentParser) -> None:
    """The scheduling options of ``genie analyze``."""
    g = parser.add_argument_group("scheduling")
    g.add_argument("--schedule", action="store_true", help="print the execution schedule and plan")
    g.add_argument(
        "--topology", metavar="TOML", help="cluster topology file (default: N identical devices)"
    )
    g.add_argument(
        "--devices",
        type=int,
        default=2,
        metavar="N",
        help="without --topology: how many devices (default 2)",
    )
    g.add_argument(
        "--device-type", default="H100", help="without --topology: device preset (default H100)"
    )
    g.add_argument(
        "--strategy", choices=sorted(STRATEGIES), default="auto", help="scheduling strategy"
    )
    g.add_argument("--no-plan", action="store_true", help="print the schedule only")
    g.add_argument(
        "--draw",
        metavar="PNG",
        help="draw a Gantt chart per device and the placed graph (needs matplotlib)",
    )
    g.add_argument("--schedule-json", metavar="PATH", help="write schedule and plan as JSON")


def demo_graph(name: str) -> tuple[Graph, Any]:
    """Record one of the tiny demo models (random weights, no downloads); returns the
    pending graph and None (no profile)."""
    import torch

    import genie

    dev = "remote_accelerator:0"
    genie.synchronize()  # run whatever was pending, so the graph is the demo's alone
    torch.manual_seed(0)
    with torch.no_grad():
        if name in ("gpt2", "gpt2-decode"):
            from transformers import GPT2Config, GPT2LMHeadModel

            m = (
                GPT2LMHeadModel(
                    GPT2Config(n_layer=4, n_embd=128, n_head=4, vocab_size=1000, n_positions=256)
                )
                .eval()
                .to(dev)
            )
            ids = torch.randint(0, 1000, (4, 32)).to(dev)
            out = m(ids, use_cache=True)
            if name == "gpt2-decode":
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                nxt.cpu()  # flush the prefill; its KV cache stays resident
                m(nxt, past_key_values=out.past_key_values, use_cache=True)
        elif name == "bert":
            from transformers import BertConfig, BertModel

            m = (
                BertModel(
                    BertConfig(
                        num_hidden_layers=4,
                        hidden_size=128,
                        num_attention_heads=4,
                        intermediate_size=512,
                        vocab_size=1000,
                    )
                )
                .eval()
                .to(dev)
            )
            m(torch.randint(0, 1000, (4, 32)).to(dev))
        elif name == "resnet":
            from torch import nn

            layers: list[nn.Module] = []
            cin = 3
            for cout in (32, 32, 64, 64, 128, 128):
                layers += [
                    nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                    nn.BatchNorm2d(cout),
                    nn.ReLU(inplace=True),
                ]
                cin = cout
            m = (
                nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10))
                .eval()
                .to(dev)
            )
            m(torch.randn(8, 3, 32, 32).to(dev))
        elif name == "vqa":
            from torch import nn
            from torch.nn import functional as F

            vision = (
                nn.Sequential(
                    nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, 2, 1), nn.ReLU()
                )
                .eval()
                .to(dev)
            )
            embed = nn.Embedding(1000, 64).to(dev)
            text = (
                nn.TransformerEncoder(
                    nn.TransformerEncoderLayer(64, 4, 256, 0.0, batch_first=True),
                    2,
                    enable_nested_tensor=False,
                )
                .eval()
                .to(dev)
            )
            head = nn.Linear(64, 10).to(dev)
            v = vision(torch.randn(2, 3, 32, 32).to(dev)).flatten(2).transpose(1, 2)
            t = text(embed(torch.randint(0, 1000, (2, 64)).to(dev)))
            head(F.scaled_dot_product_attention(t, v, v).mean(1))
        else:
            raise SchedulingError(
                f"genie: unknown demo model {name!r}; known: {', '.join(DEMO_MODELS)}"
            )
    return genie.get_graph(), None


def _topology(args) -> NetworkTopology:
    if getattr(args, "topology", None):
        return NetworkTopology.from_file(args.topology)
    return NetworkTopology.uniform(
        max(1, int(getattr(args, "devices", 2) or 2)),
        getattr(args, "device_type", "H100") or "H100",
    )


def schedule_command(
    args: argparse.Namespace,
    graph: Graph | None = None,
    profile: Any = None,
    out: TextIO | None = None,
) -> int:
    """Schedule (and plan) `graph` -- or the demo model ``args.model`` -- and print it."""
    out = out or sys.stdout
    if graph is None:
        name = getattr(args, "model", None)
        if not name:
            print(
                "genie: --schedule needs a graph: name a model (" + ", ".join(DEMO_MODELS) + ")",
                file=sys.stderr,
            )
            return 2
        graph, profile = demo_graph(name)
    try:
        topo = _topology(args)
        scheduler = Scheduler(
            GraphCostEstimator(), topo, strategy=getattr(args, "strategy", "auto") or "auto"
        )
        schedule = scheduler.create_schedule(graph, profile)
        plan = (
            None
            if getattr(args, "no_plan", False)
            else Planner(scheduler.estimator, topo)
            .generate_plan(graph, profile, schedule)
            .validate()
        )
    except (SchedulingError, NotImplementedError) as e:  # e.g. data parallel, batch not sliced
        print(str(e), file=sys.stderr)
        return 1
    print(schedule.format(), file=out)
    if plan is not None:
        print(plan.format(), file=out)
    stats = scheduler.get_stats()
    print(f"scheduled in {stats['last_time_s'] * 1e3:.2f} ms", file=out)
    path = getattr(args, "schedule_json", None)
    if path:
        with open(path, "w") as f:
            json.dump(
                {"schedule": schedule.to_json(), "plan": plan.to_json() if plan else None},
                f,
                indent=1,
            )
        print(f"wrote {path}", file=out)
    png = getattr(args, "draw", None)
    if png:
        from genie.scheduler.draw import draw_schedule

        try:
            draw_schedule(schedule, png, graph, plan=plan)
        except SchedulingError as e:
            print(str(e), file=sys.stderr)
            return 1
        print(f"drew {png}", file=out)
    return 0
