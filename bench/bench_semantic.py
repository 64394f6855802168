"""Semantic analysis time of a full GPT-2 (12 layers, batch 8, sequence 128) graph, cold and
cached, next to the time to capture it.

    python bench/bench_semantic.py [--repeat 15] [--layers 12] [--batch 8] [--seq 128]
    python bench/bench_semantic.py --zoo        # the semantic zoo's table instead
    python bench/bench_semantic.py --heldout    # models the zoo does not hold

Rows (median and best wall-clock, and median CPU time of this process, over --repeat runs, ms):
  capture forward       recording model(ids) on remote_accelerator with the module-context hooks
  get_graph             genie.get_graph(): the pending program as a Graph
  structural_hash       Graph.structural_hash() of a fresh Graph (part of every cold analysis)
  cold, first sight     a new SemanticAnalyzer: every tier, model structure and module-context
                        rules included, structural hash included
  cold, known model     result cache cleared, the analyzer has seen the model before (its
                        structure and context rules are reused), structural hash included
  cached, same graph    analyze_graph on a graph already analysed (hash memoised by the Graph)
  cached, re-captured   a new Graph of the same program: structural hash + cache replay
Writes bench/results/semantic.json.

``--zoo`` runs the semantic zoo (tests/semantic_zoo.py: tiny random-weight models from
transformers' auto mappings, recommenders, plain models) through both entry points and, for
every causal LM, generate() under ``SemanticAnalyzer.observe``; prints the table
(architecture, expected, got, confidence per entry point, generate() phases) and writes
bench/results/semantic_zoo.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import genie
from genie.graph import Graph
from genie.semantic import AnalyzerConfig, ModuleContextTracker, SemanticAnalyzer


def _time(fn, repeat: int) -> tuple[float, float, float, list[float]]:
    """(median wall ms, best wall ms, median CPU ms, wall samples). CPU time (this process
    only) is reported because the machines this runs on are often shared: wall time then
    includes waiting for a core."""
    xs, cpu = [], []
    for _ in range(repeat):
        c = time.process_time()
        t = time.perf_counter()
        fn()
        xs.append((time.perf_counter() - t) * 1e3)
        cpu.append((time.process_time() - c) * 1e3)
    return statistics.median(xs), min(xs), statistics.median(cpu), xs


def zoo_main(out_path: str, held_out: bool = False) -> None:
    # the zoo lives with the tests (its models and expected labels are test data)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import semantic_zoo as zoo

    t0 = time.perf_counter()
    entries, skipped = zoo.zoo_entries()
    if held_out:
        entries, skipped = zoo.held_out_entries({e.name for e in entries}), []
    analyzers = {"graph": SemanticAnalyzer(), "model": SemanticAnalyzer()}
    results = [zoo.run_entry(e, analyzers) for e in entries]
    phases = {
        e.name: zoo.generate_phases(e)
        for e in entries
        if e.source == "MODEL_FOR_CAUSAL_LM" and not held_out
    }
    genie.synchronize()
    summary = zoo.summary(results)
    print(zoo.table(results))
    print(
        f"\n{len(entries)} architectures built ({len(skipped)} candidates could not be "
        f"built tiny), {summary['ran']} ran on remote_accelerator, "
        f"{time.perf_counter() - t0:.1f} s"
    )
    for ep in ("graph", "model"):
        s = summary[ep]
        print(
            f"{ep:>5} entry point: {s['right']}/{s['judged']} right ({s['share']:.1%}), "
            f"{s['exceptions']} exceptions, {s['unknown']} unknown, "
            f"{len(s['cut_by_flush'])} forwards cut by a flush; wrong: {s['wrong']}"
        )
    print("generate() call phases per causal LM:")
    for name, ph in phases.items():
        print(f"  {name:44s} {ph}")
    for name, why in skipped:
        print(f"  not built: {name}: {why}")
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "semantic_zoo",
                "summary": summary,
                "results": [r.to_dict() for r in results],
                "generate_phases": phases,
                "not_built": skipped,
                "machine": {
                    "python": platform.python_version(),
                    "torch": torch.__version__,
                    "transformers": _version("transformers"),
                },
            },
            indent=1,
            default=str,
        )
    )
    print(f"wrote {out}")


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--out", default=None)
    ap.add_argument("--zoo", action="store_true", help="run the semantic zoo instead")
    ap.add_argument(
        "--heldout",
        action="store_true",
        help="run models the zoo does not hold (other mappings, far ends)",
    )
    args = ap.parse_args()
    results = Path(__file__).parent / "results"
    if args.zoo or args.heldout:
        name = "semantic_heldout.json" if args.heldout else "semantic_zoo.json"
        zoo_main(args.out or str(results / name), held_out=args.heldout)
        return
    args.out = args.out or str(results / "semantic.json")

    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    dev = torch.device("remote_accelerator", 0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=args.layers)).eval().to(dev)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq)).to(dev)
    genie.synchronize()  # weights and ids resident: the graphs below are the forward alone
    tracker = ModuleContextTracker(model).install()

    def forward():
        with torch.no_grad():
            return model(ids, use_cache=True)  # keep the outputs alive: they are the results

    out = forward()
    graph = genie.get_graph()
    nodes, constants = graph.nodes, graph.constants
    cfg = AnalyzerConfig(slow_ms=1e9)
    warm = SemanticAnalyzer(cfg)
    profile = warm.analyze_graph(graph, model)  # imports, first-use registry loading

    del out
    genie.synchronize()  # the outputs are gone: nothing is observable, nothing runs

    def capture_ms() -> tuple[float, float]:
        c, t = time.process_time(), time.perf_counter()
        out = forward()
        dt, dc = (time.perf_counter() - t) * 1e3, (time.process_time() - c) * 1e3
        del out
        genie.synchronize()
        return dt, dc

    def get_graph_ms() -> tuple[float, float]:
        out = forward()
        c, t = time.process_time(), time.perf_counter()
        genie.get_graph()
        dt, dc = (time.perf_counter() - t) * 1e3, (time.process_time() - c) * 1e3
        del out
        genie.synchronize()
        return dt, dc

    def sample(fn) -> tuple[float, float, float, list[float]]:
        runs = [fn() for _ in range(args.repeat)]
        xs = [r[0] for r in runs]
        return statistics.median(xs), min(xs), statistics.median(r[1] for r in runs), xs

    rows = {}
    rows["capture forward"] = sample(capture_ms)
    rows["get_graph"] = sample(get_graph_ms)
    rows["structural_hash"] = _time(lambda: Graph(nodes, constants).structural_hash(), args.repeat)

    def cold_first():
        SemanticAnalyzer(cfg).analyze_graph(Graph(nodes, constants), model)

    rows["analyze: cold, first sight"] = _time(cold_first, args.repeat)

    known = SemanticAnalyzer(cfg)
    known.analyze_graph(Graph(nodes, constants), model)

    def cold_known():
        known.clear_cache(structures=False)
        known.analyze_graph(Graph(nodes, constants), model)

    rows["analyze: cold, known model"] = _time(cold_known, args.repeat)

    cached = SemanticAnalyzer(cfg)
    same = Graph(nodes, constants)
    cached.analyze_graph(same, model)
    rows["analyze: cached, same graph"] = _time(
        lambda: cached.analyze_graph(same, model), args.repeat * 4
    )
    rows["analyze: cached, re-captured"] = _time(
        lambda: cached.analyze_graph(Graph(nodes, constants), model), args.repeat
    )
    tracker.remove()
    genie.synchronize()

    tiers = SemanticAnalyzer(cfg).analyze_graph(Graph(nodes, constants), model).metadata["tier_ms"]
    print(
        f"GPT-2 {args.layers} layers, batch {args.batch}, seq {args.seq}: {len(nodes)} nodes, "
        f"workload {profile.workload_type}, phase {profile.call_phase}"
    )
    print(f"{'step':<32}{'median ms':>12}{'best ms':>12}{'median CPU ms':>15}")
    for name, (med, best, cpu, _) in rows.items():
        print(f"{name:<32}{med:>12.3f}{best:>12.3f}{cpu:>15.3f}")
    print("tiers of one cold analysis (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in tiers.items()))
    goal = {"cold_ms": 20.0, "cached_ms": 0.5}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    result = {
        "benchmark": "semantic",
        "model": f"gpt2-{args.layers}l",
        "batch": args.batch,
        "seq": args.seq,
        "nodes": len(nodes),
        "workload_type": str(profile.workload_type),
        "call_phase": profile.call_phase,
        "rows": {
            k: {
                "median_ms": round(m, 4),
                "best_ms": round(b, 4),
                "median_cpu_ms": round(c, 4),
                "runs_ms": [round(x, 4) for x in xs],
            }
            for k, (m, b, c, xs) in rows.items()
        },
        "tiers_ms": tiers,
        "goal": goal,
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_average_1min": load,
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
