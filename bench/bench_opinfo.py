"""PyTorch's OpInfo and ModuleInfo databases on remote_accelerator against eager CPU, each entry
in a child process (Note: [Conformance in child processes] in genie/conformance.py).

    python bench/bench_opinfo.py [--kinds op,module,grad] [--stride 1] [--jobs 2] [--timeout 300]

Entries: ``op`` = (OpInfo op, dtype) with every sample, for float32, float16, bfloat16, int64,
bool and complex64 where the op supports them; ``module`` = (ModuleInfo module, eval|train),
float32 forward; ``grad`` = (OpInfo op) float32 input gradients. An entry passes when all its
samples equal eager (bitwise, or within the dtype's default assert_close tolerance: the table
counts both). Prints the pass table and every failure with its reason, and writes
bench/results/opinfo.json (every entry) and bench/results/opinfo.md (the README's table).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from genie import conformance

ROOT = Path(__file__).resolve().parents[1]


def table(outcomes: list[conformance.Outcome]) -> list[str]:
    rows = [
        "| kind | entries | pass | bitwise | fail | crash | timeout | skipped | pass rate |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    by_kind: dict[str, list[conformance.Outcome]] = collections.defaultdict(list)
    for o in outcomes:
        by_kind[o.entry.kind].append(o)
    for kind, os_ in sorted(by_kind.items()):
        n = collections.Counter(o.status for o in os_)
        tried = len(os_) - n["skip"]
        bitwise = sum(1 for o in os_ if o.status == "pass" and o.bitwise == o.samples)
        rate = n["pass"] / max(tried, 1)
        rows.append(
            f"| {kind} | {tried} | {n['pass']} | {bitwise} | {n['fail']} | {n['crash']} | "
            f"{n['timeout']} | {n['skip']} | {rate:.2%} |"
        )
    return rows


def failures(outcomes: list[conformance.Outcome]) -> list[str]:
    return [
        f"- `{o.entry.label}` ({o.status}): {o.reason}"
        for o in outcomes
        if o.status in ("fail", "crash", "timeout")
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kinds", default="op,module,grad")
    ap.add_argument("--stride", type=int, default=1, help="every n-th entry (the CI test uses one)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per entry")
    ap.add_argument("--only", default="", help="comma-separated op/module names")
    args = ap.parse_args()

    todo = conformance.entries(args.kinds.split(","))[:: args.stride]
    if args.only:
        names = set(args.only.split(","))
        todo = [e for e in todo if e.name in names]
    done = 0
    start = time.monotonic()

    def progress(o: conformance.Outcome) -> None:
        nonlocal done
        done += 1
        if o.status != "pass" or done % 100 == 0:
            print(
                f"[{done}/{len(todo)} {time.monotonic() - start:.0f}s] {o.entry.label}: {o.status} "
                f"{o.reason[:160]}",
                file=sys.stderr,
                flush=True,
            )

    outcomes = conformance.run(todo, jobs=args.jobs, timeout=args.timeout, progress=progress)
    wall = time.monotonic() - start
    rows = table(outcomes)
    fails = failures(outcomes)
    print("\n".join(rows))
    print(f"\n{len(todo)} entries in {wall:.0f} s with {args.jobs} workers; failures:")
    print("\n".join(fails) or "(none)")

    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "jobs": args.jobs,
        "stride": args.stride,
        "kinds": args.kinds,
        "seconds": round(wall, 1),
    }
    (out / "opinfo.json").write_text(
        json.dumps({"meta": meta, "entries": [o.to_json() for o in outcomes]}, indent=1)
    )
    (out / "opinfo.md").write_text("\n".join(rows) + "\n\nFailures:\n\n" + "\n".join(fails) + "\n")
    print(f"wrote {out / 'opinfo.json'} and {out / 'opinfo.md'}")


if __name__ == "__main__":
    main()
