"""Where a remote forward's time goes, on a GPU host: one timeline per model, client and server.

    python bench/bench_remote_timeline_gpu.py [--models BERT-base,GPT-2] [--dtypes float32]
        [--spin 0,10000] [--repeats 20] [--out bench/results/remote_timeline_gpu.json]

For each model it measures eager, the eager model captured as one CUDA graph in this process,
and the remote path through a loopback server, once per GENIE_SPIN_US value given: lazy
capture, or with --compiled ``torch.compile(backend="genie")`` of the CPU model. Both sides
time the same steps with time.perf_counter (CLOCK_MONOTONIC, shared by the two processes of
one host): the client around speculate / run_digest / fetch, the server around each request,
its "pre", the speculation, the GraphRunner and the CUDA graph launch (with CUDA events for
the graph's GPU time). The table gives the median of each moment over the repeats, in ms from
the start of the forward. The instrumentation wraps those functions, so the absolute figures
are a little above bench_remote_gpu.py's; the ratios between spin settings are side by side.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

T = time.perf_counter
ROOT = Path(__file__).resolve().parent.parent
_SERVER_STEPS = [  # (class path, method, tag)
    ("genie.runtime.server.session:Session", "_apply_pre", "server pre"),
    ("genie.runtime.server.session:Session", "_run", "server run request"),
    ("genie.runtime.server.session:Session", "_receive_uploads", "server upload"),
    ("genie.runtime.server.speculation:SpeculationSlot", "start", "server spec"),
    ("genie.runtime.program.graphs:GraphRunner", "run", "server GraphRunner.run"),
    ("genie.runtime.server.speculation:SpeculationSlot", "resolve", "server commit check"),
    ("genie.runtime.server.session:Session", "_fetch", "server fetch (waits for the GPU)"),
    ("genie.runtime.server.session:Session", "_send", "server reply"),
]
_CLIENT_STEPS = [
    ("upload_early", "client .to() hands its snapshot over"),
    ("speculate", "client speculate"),
    ("run_digest", "client run"),
    ("fetch", "client fetch"),
    ("run_program", "client run_program (compiled)"),
]


def _wrap(cls, name: str, tag: str, events: list) -> None:
    f = getattr(cls, name)

    def timed(*a, **k):
        t = T()
        try:
            return f(*a, **k)
        finally:
            events.append((tag, t, T()))

    setattr(cls, name, timed)


def _wrap_early_sender(events: list):
    """Time the early-upload sender (Note: [Early uploads]); returns what undoes it."""
    from genie.runtime.remote import early

    f = early.EarlyUploads._send

    def timed(self, up):
        t = T()
        try:
            return f(self, up)
        finally:
            events.append((f"client sends an upload ({threading.current_thread().name})", t, T()))

    early.EarlyUploads._send = timed
    return lambda: setattr(early.EarlyUploads, "_send", f)


def serve(argv: list[str]) -> int:
    """The genie server, traced; writes its events to $TIMELINE_OUT when it stops."""
    import importlib

    from genie.runtime import server as S

    events: list = []
    gpu: list = []
    for path, name, tag in _SERVER_STEPS:
        module, cls = path.split(":")
        _wrap(getattr(importlib.import_module(module), cls), name, tag, events)
    replay = torch.cuda.CUDAGraph.replay

    def traced_replay(self):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t = T()
        a.record()
        replay(self)
        b.record()
        events.append(("server cudaGraphLaunch", t, T()))
        gpu.append((a, b))

    torch.cuda.CUDAGraph.replay = traced_replay
    try:
        return S.main(argv)
    finally:
        torch.cuda.synchronize()
        with open(os.environ["TIMELINE_OUT"], "w") as f:
            json.dump({"events": events, "gpu_ms": [a.elapsed_time(b) for a, b in gpu]}, f)


def _median_ms(xs) -> float:
    return statistics.median(xs) * 1e3 if xs else float("nan")


def eager_figures(model, x, pick, repeats: int, fresh=None) -> dict:
    def timed(fn) -> tuple[float, float]:
        wall, gpu = [], []
        for _ in range(repeats):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = T()
            a.record()
            y = fn()
            b.record()
            y.cpu()
            wall.append(T() - t0)
            gpu.append(a.elapsed_time(b) / 1e3)
        return _median_ms(wall), _median_ms(gpu)

    for _ in range(5):
        pick(model(*x)).cpu()
    eager_ms, eager_gpu_ms = timed(lambda: pick(model(*x)))
    figures = {}
    if fresh is not None:  # the input copied from the host every call, as a server must
        figures["eager_fresh_ms"] = timed(lambda: pick(model(*fresh())))[0]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            pick(model(*x))
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = pick(model(*x))

    def replay():
        graph.replay()
        return out

    graph_ms, graph_gpu_ms = timed(replay)
    return figures | {
        "eager_ms": eager_ms,
        "eager_gpu_ms": eager_gpu_ms,
        "graph_ms": graph_ms,
        "graph_gpu_ms": graph_gpu_ms,
    }


def remote_timeline(
    build, inputs, pick, dtype, repeats: int, spin: int, fresh: bool, compiled: bool = False
) -> dict:
    from bench_remote_gpu import REMOTE, to

    import genie
    from genie.runtime.remote import client as C

    workdir = Path(tempfile.mkdtemp(prefix="genie-timeline-"))
    token = secrets.token_hex(16)
    (workdir / "token").write_text(token)
    env = dict(os.environ, GENIE_ROLE="server", TIMELINE_OUT=str(workdir / "trace.json"))
    env["GENIE_SPIN_US"] = str(spin)
    env.pop("GENIE_SERVER", None)
    cmd = [sys.executable, __file__, "--serve", "--host", "127.0.0.1", "--port", "0",
           "--port-file", str(workdir / "port"), "--token-file", str(workdir / "token"),
           "--device", "cuda", "--log-level", "WARNING"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env)
    try:
        while not (workdir / "port").exists():
            if proc.poll() is not None:
                raise RuntimeError("the traced server exited at start")
            time.sleep(0.05)
        os.environ["GENIE_SPIN_US"] = str(spin)
        genie.connect("127.0.0.1:" + (workdir / "port").read_text(), token=token)
        events: list = []
        originals = {name: getattr(C.RemoteExecutor, name) for name, _ in _CLIENT_STEPS}
        try:
            if compiled:  # torch.compile(backend="genie") of the CPU model, in the session
                cpu_model = build().to(dtype)
                torch._dynamo.reset()
                fn = torch.compile(lambda *a: pick(cpu_model(*a)), backend="genie")

                def model(*a):
                    return fn(*(t.clone() for t in a) if fresh else a)

                x = inputs
            else:
                model = build().to(dtype).to(REMOTE)
                x = to(inputs, REMOTE)
            for _ in range(6):
                out = model(*x)
                if not compiled:
                    pick(out).cpu()
            for name, tag in _CLIENT_STEPS:
                _wrap(C.RemoteExecutor, name, tag, events)
            undo = _wrap_early_sender(events)
            iters = []
            for _ in range(repeats):
                t0 = T()
                # With --fresh the input is uploaded again each call (a serving loop's request).
                if compiled:  # a fresh CPU copy of the input each call, the result on the host
                    out = model(*x)
                    t1 = T()
                else:
                    out = model(*(to(inputs, REMOTE) if fresh else x))
                    t1 = T()
                    pick(out).cpu()
                iters.append((t0, t1, T()))
                del out
            undo()
            from genie.runtime.remote.connect import active

            session = active().server_stats()["session"]
            graphs = {k: v for k, v in session.items() if k.startswith("cuda_graph")}
        finally:
            for name, f in originals.items():
                setattr(C.RemoteExecutor, name, f)
            genie.disconnect()
    finally:
        proc.terminate()
        proc.wait(60)
    trace = json.loads((workdir / "trace.json").read_text())
    moments: dict[str, list[float]] = {}
    for t0, t1, t2 in iters:
        seen: dict[str, int] = {}
        mine = [
            (tag, a, b)
            for tag, a, b in events + [tuple(e) for e in trace["events"]]
            if t0 <= a <= t2
        ]
        for tag, a, b in sorted(mine, key=lambda e: e[1]):
            seen[tag] = seen.get(tag, 0) + 1
            label = tag if seen[tag] == 1 else f"{tag} #{seen[tag]}"
            moments.setdefault(label + " start", []).append(a - t0)
            moments.setdefault(label + " end", []).append(b - t0)
        moments.setdefault("recording ends", []).append(t1 - t0)
        moments.setdefault("value on the host", []).append(t2 - t0)
    timeline = {k: _median_ms(v) for k, v in moments.items() if len(v) == len(iters)}
    return {
        "remote_ms": _median_ms([c - a for a, _, c in iters]),
        "server_cuda_graphs": graphs,
        "server_graph_gpu_ms": statistics.median(trace["gpu_ms"][-repeats:])
        if trace["gpu_ms"]
        else None,
        "timeline_ms": dict(sorted(timeline.items(), key=lambda kv: kv[1])),
    }


@torch.no_grad()
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="BERT-base,GPT-2,ResNet-50")
    parser.add_argument("--dtypes", default="float32,float16")
    parser.add_argument("--spin", default="0,10000", help="GENIE_SPIN_US values, side by side")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="upload the input again every call (timed from its .to()), and time eager with "
        "the input copied from the host every call",
    )
    parser.add_argument(
        "--compiled",
        action="store_true",
        help='the remote path is torch.compile(backend="genie") of the CPU model, not lazy capture',
    )
    parser.add_argument(
        "--out", default=str(ROOT / "bench" / "results" / "remote_timeline_gpu.json")
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_remote_timeline_gpu: needs a CUDA device")
        return 1
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_remote_gpu import models, to

    wanted = args.models.split(",")
    spins = [int(s) for s in args.spin.split(",")]
    result = {"benchmark": "remote_timeline_gpu", "device": torch.cuda.get_device_name(),
              "torch": torch.__version__, "repeats": args.repeats, "rows": []}  # fmt: skip
    for name, build, make_inputs, pick in models(False):
        if name not in wanted:
            continue
        for dtype in (getattr(torch, d) for d in args.dtypes.split(",")):
            inputs = make_inputs(dtype)
            eager = build().to(dtype).cuda()
            row = {"model": name, "dtype": str(dtype).removeprefix("torch."), "fresh": args.fresh}
            row["compiled"] = args.compiled
            fresh = functools.partial(to, inputs, "cuda") if args.fresh else None
            row.update(eager_figures(eager, to(inputs, "cuda"), pick, args.repeats, fresh))
            del eager
            torch.cuda.empty_cache()
            for spin in spins:
                row[f"spin_{spin}"] = remote_timeline(
                    build, inputs, pick, dtype, args.repeats, spin, args.fresh, args.compiled
                )
            result["rows"].append(row)
            if args.fresh:
                print(f"\n{name} {row['dtype']}: eager, input copied each call "
                      f"{row['eager_fresh_ms']:.3f} ms")  # fmt: skip
            print(f"\n{name} {row['dtype']}: eager {row['eager_ms']:.3f} ms (GPU {row['eager_gpu_ms']:.3f}), "
                  f"one CUDA graph {row['graph_ms']:.3f} ms (GPU {row['graph_gpu_ms']:.3f})")  # fmt: skip
            print(f"{'moment (median ms from the start of the forward)':56s}"
                  + "".join(f"{'spin ' + str(s):>12s}" for s in spins))  # fmt: skip
            labels = list(row[f"spin_{spins[-1]}"]["timeline_ms"])
            for label in labels:
                cells = "".join(
                    f"{row[f'spin_{s}']['timeline_ms'].get(label, float('nan')):12.3f}"
                    for s in spins
                )
                print(f"{label:56s}{cells}")
            for s in spins:
                print(f"spin {s}: server GPU per CUDA graph replay "
                      f"{row[f'spin_{s}']['server_graph_gpu_ms']} ms, "
                      f"{row[f'spin_{s}']['server_cuda_graphs']}")  # fmt: skip
            print(f"{'remote / eager':56s}" + "".join(
                f"{row[f'spin_{s}']['remote_ms'] / row['eager_ms']:11.3f}x" for s in spins))  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        sys.exit(serve(sys.argv[2:]))
    sys.exit(main())
