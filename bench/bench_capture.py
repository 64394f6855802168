"""Capture cost: per op (C++ microbenchmark) and for a whole GPT-2, next to eager CPU.

Goals (issue: the capture core): capture <= 1.2x eager CPU per op; for GPT-2 (12 layers,
batch 8, sequence 128) capture alone <= 0.2x the eager CPU forward and capture + local replay
<= 1.3x eager. All ratios come from one run, side by side.

    python bench/bench_capture.py [--quick]

Prints a table and writes bench/results/capture.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import genie

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build" / "bench"


def build_micro() -> Path:
    exe = BUILD / "capture_micro"
    subprocess.run(
        [
            "cmake",
            "-S",
            str(ROOT),
            "-B",
            str(BUILD),
            "-G",
            "Ninja",
            "-DGENIE_BUILD_BENCHMARKS=ON",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DPython_EXECUTABLE={sys.executable}",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    subprocess.run(
        ["cmake", "--build", str(BUILD), "--target", "capture_micro"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return exe


def per_op(quick: bool) -> dict:
    exe = build_micro()
    calls, rounds = ("500", "7") if quick else ("2000", "15")
    out = subprocess.run(
        [str(exe), calls, rounds, "16"], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout)


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def whole_model(quick: bool) -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel

    layers, batch, seq = (2, 2, 32) if quick else (12, 8, 128)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=layers, bos_token_id=0, eos_token_id=0)).eval()
    ids = torch.randint(0, 50257, (batch, seq), generator=torch.Generator().manual_seed(1))
    repeats = 3
    with torch.no_grad():
        model(ids)
        eager = median_ms(lambda: model(ids), repeats)
        rmodel = model.to(genie.BACKEND)
        rids = ids.to(genie.BACKEND)
        rmodel(rids).logits.cpu()  # uploads the weights once; warms the shape cache

        def capture_only():
            out = rmodel(rids).logits
            capture_only.out = out

        captures, totals = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            capture_only()
            t1 = time.perf_counter()
            capture_only.out.cpu()
            t2 = time.perf_counter()
            captures.append((t1 - t0) * 1e3)
            totals.append((t2 - t0) * 1e3)
        nodes = len(genie.last_graph())
    capture, total = statistics.median(captures), statistics.median(totals)
    return {
        "model": f"GPT-2 {layers} layers",
        "batch": batch,
        "seq": seq,
        "nodes": nodes,
        "eager_ms": eager,
        "capture_ms": capture,
        "capture_plus_replay_ms": total,
        "capture_ratio": capture / eager,
        "total_ratio": total / eager,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    args = parser.parse_args()
    ops = per_op(args.quick)
    model = whole_model(args.quick)

    print(
        f"per-op capture cost, {ops['size']}x{ops['size']} fp32, median of {ops['rounds']} rounds "
        f"of {ops['calls']} calls (C++)"
    )
    print(f"{'op':<12}{'eager us':>10}{'capture us':>12}{'ratio':>8}   goal <= 1.2")
    for name, r in ops["ops"].items():
        r["ratio"] = r["capture_us"] / r["eager_us"]
        print(f"{name:<12}{r['eager_us']:>10.3f}{r['capture_us']:>12.3f}{r['ratio']:>8.2f}")
    print(
        f"\n{model['model']}, batch {model['batch']}, seq {model['seq']} ({model['nodes']} nodes run)"
    )
    print(f"eager forward            {model['eager_ms']:10.1f} ms")
    print(
        f"capture                  {model['capture_ms']:10.1f} ms  ratio {model['capture_ratio']:.3f}  goal <= 0.2"
    )
    print(
        f"capture + local replay   {model['capture_plus_replay_ms']:10.1f} ms  ratio {model['total_ratio']:.3f}  goal <= 1.3"
    )

    result = {
        "machine": platform.node(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "per_op": ops,
        "whole_model": model,
    }
    out = ROOT / "bench" / "results" / "capture.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
