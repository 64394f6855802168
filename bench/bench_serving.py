"""Serving a model with a fresh input every request: local eager vs genie (lazy and compiled)
vs torch.distributed.rpc, and 8 concurrent clients against one `genie serve`.

A model with random weights answers requests whose input is new every call (--family):
BERT (the host gets the pooled output), GPT-2 (the last position's logits) or a ResNet
(torchvision; its logits). "small": 2 layers, hidden 128, batch 8, sequence 64 (ResNet-18 on
64x64 images); "base": BERT-base / GPT-2 124M at batch 8, sequence 128, ResNet-50 at batch 8,
224x224. Side by side in one run, each with the same
inputs, every result checked against eager's:
  eager          the model in this process on --device (the input copied there, the output back);
  genie lazy     ``model.to("remote_accelerator:0")`` through a loopback ``genie serve --device``
                 (another process); the input's upload begins at .to() (Note: [Early uploads])
                 and the server starts the program when it lands (Note: [Client speculation]);
  lazy, upload at flush   the same session with early uploads off (what came before);
  genie compiled ``torch.compile(model, backend="genie")`` through the same session;
  rpc            a torch.distributed.rpc (TensorPipe) server process holding the same model on
                 --device: ``rpc_sync(forward, (ids,))`` returns the pooled output.
The modes take turns in rounds (a loaded machine slows them alike); milliseconds per request
(median, p99) and the ratio to eager.

Load (--clients 8): 8 client processes against one `genie serve`, each sending --requests
fresh inputs back to back (lazy, early uploads on), against one local process running the same
requests back to back: total throughput, its ratio, p50/p99 latency, results exact.

    python bench/bench_serving.py                      # CPU, small BERT
    python bench/bench_serving.py --device cuda        # on a GPU host: BERT-base, a few minutes
    python bench/bench_serving.py --quick              # a smoke run
    python bench/bench_serving.py --device cuda --family resnet --dtype float32,float16

Prints a table and writes bench/results/serving[_FAMILY][_cuda].json.
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing as mp
import os
import platform
import queue
import statistics
import time
import traceback
from pathlib import Path

import torch
from fresh_inputs import serve_rpc, start_rpc

ROOT = Path(__file__).resolve().parent.parent
REMOTE = "remote_accelerator:0"
SEED = 0
WARMUP = 5  # untimed requests first: speculation learns, a CUDA server captures its graphs


# -- the models and their requests -----------------------------------------------------------
# --family picks the model; each answers with what a server would send back: BERT its pooled
# output, GPT-2 the last position's logits, ResNet its logits.
FAMILIES = ("bert", "gpt2", "resnet")


def config(family: str, size: str) -> dict:
    if family == "resnet":
        return {"batch": 8, "image": 224 if size == "base" else 64}
    if size == "base":
        return {"batch": 8, "seq": 128, "hf": {}}
    small = {
        "bert": {
            "vocab_size": 1000,
            "hidden_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 512,
            "max_position_embeddings": 128,
        },
        "gpt2": {"vocab_size": 1000, "n_embd": 128, "n_layer": 2, "n_head": 4, "n_positions": 128},
    }
    return {"batch": 8, "seq": 64, "hf": small[family]}


def build(family: str, size: str, dtype: torch.dtype):
    """The same weights in every process: seeded."""
    torch.manual_seed(SEED)
    cfg = config(family, size)
    if family == "bert":
        from transformers import BertConfig, BertModel

        model = BertModel(BertConfig(**cfg["hf"]))
    elif family == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        model = GPT2LMHeadModel(GPT2Config(**cfg["hf"]))
    else:
        import torchvision

        model = torchvision.models.resnet50() if size == "base" else torchvision.models.resnet18()
    return model.eval().to(dtype)


def answer(family: str, out) -> torch.Tensor:
    """What the host takes from the model's output (on the model's device)."""
    if family == "bert":
        return out.pooler_output
    if family == "gpt2":
        return out.logits[:, -1]
    return out


def requests(family: str, size: str, n: int, seed: int, dtype=torch.float32) -> list:
    cfg = config(family, size)
    g = torch.Generator().manual_seed(seed)
    if family == "resnet":
        shape = (cfg["batch"], 3, cfg["image"], cfg["image"])
        return [torch.randn(shape, generator=g).to(dtype) for _ in range(n)]
    vocab = cfg["hf"].get("vocab_size", 30522 if family == "bert" else 50257)
    return [torch.randint(0, vocab, (cfg["batch"], cfg["seq"]), generator=g) for _ in range(n)]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


# -- torch.distributed.rpc -----------------------------------------------------------------------
_RPC_MODELS: dict[str, torch.nn.Module] = {}
_RPC_DEVICE = "cpu"


_RPC_FAMILY = "bert"


def rpc_forward(x: torch.Tensor, dtype: str) -> torch.Tensor:
    """Runs in the rpc server: the model there, its answer back on the host."""
    with torch.no_grad():
        return answer(_RPC_FAMILY, _RPC_MODELS[dtype](x.to(_RPC_DEVICE))).cpu()


def rpc_server(
    port: int, family: str, size: str, dtypes: list[str], device: str, threads: int
) -> None:
    global _RPC_DEVICE, _RPC_FAMILY
    torch.set_num_threads(threads)
    _RPC_DEVICE, _RPC_FAMILY = device, family
    for d in dtypes:
        _RPC_MODELS[d] = build(family, size, getattr(torch, d)).to(device)
    serve_rpc(port)


# -- one process's modes --------------------------------------------------------------------
@torch.no_grad()
def compare(args, dtype_name: str, rpc_proc) -> dict:
    import torch.distributed.rpc as rpc

    import genie
    import genie.compile  # noqa: F401 - registers "genie" where no entry point is installed
    from genie.runtime.loopback import LoopbackServer
    from genie.runtime.remote import connect

    dtype = getattr(torch, dtype_name)
    per_mode = args.rounds * args.per_round
    fam = args.family
    inputs = requests(fam, args.model, per_mode + WARMUP, seed=1, dtype=dtype)
    model = build(fam, args.model, dtype)
    eager_model = copy.deepcopy(model).to(args.device)

    def eager(ids):
        return answer(fam, eager_model(ids.to(args.device))).cpu()

    refs = [eager(x) for x in inputs]

    rows: dict[str, dict] = {}
    srv = LoopbackServer(device=args.device, threads=args.threads)
    client = connect(srv.address, token=srv.token)
    try:
        rmodel = copy.deepcopy(model).to(REMOTE)
        compiled = torch.compile(model, backend="genie", options={"server": client})

        def lazy(ids):
            return answer(fam, rmodel(ids.to(REMOTE))).cpu()

        def at_flush(ids):
            client.early.enabled = False
            try:
                return lazy(ids)
            finally:
                client.early.enabled = True

        def comp(ids):
            return answer(fam, compiled(ids))

        def via_rpc(ids):
            return rpc.rpc_sync("server", rpc_forward, args=(ids, dtype_name))

        modes = {
            "eager": eager,
            "genie lazy": lazy,
            "lazy, upload at flush": at_flush,
            "genie compiled": comp,
        }
        if rpc_proc is not None:
            modes["rpc"] = via_rpc
        times: dict[str, list[float]] = {m: [] for m in modes}
        equal = dict.fromkeys(modes, True)
        diff = dict.fromkeys(modes, 0.0)
        spec = {"spec_hits": 0, "uploads_early": 0, "calls": 0}
        for r in range(args.rounds):
            for name, fn in modes.items():
                for x in inputs[per_mode : per_mode + WARMUP]:  # a mode's steady state
                    fn(x)
                before = dict(client.counters)
                for i in range(r * args.per_round, (r + 1) * args.per_round):
                    sync(args.device)
                    t0 = time.perf_counter()
                    out = fn(inputs[i])
                    times[name].append((time.perf_counter() - t0) * 1e3)
                    if not torch.equal(out, refs[i]):
                        equal[name] = False
                        d = float((out.float() - refs[i].float()).abs().max())
                        diff[name] = max(diff[name], d)
                if name == "genie lazy":
                    for k in ("spec_hits", "uploads_early"):
                        spec[k] += client.counters[k] - before[k]
                    spec["calls"] += args.per_round
        eager_ms = statistics.median(times["eager"])
        for name in modes:
            ms = statistics.median(times[name])
            rows[name] = {
                "median_ms": ms,
                "p99_ms": percentile(times[name], 99),
                "vs_eager": ms / eager_ms,
                "equal_eager": equal[name],
                "max_abs_diff": diff[name],
            }
        rows["genie lazy"]["client"] = spec
        session = client.server_stats()["session"]
        rows["genie lazy"]["server"] = {k: v for k, v in session.items() if k.startswith("spec")}
    finally:
        genie.configure(local_device="cpu")
        client.close()
        srv.close()
    return rows


# -- load: N clients against one server ---------------------------------------------------------
def load_client(k: int, address: str, token: str, args, barrier, results) -> None:
    try:
        import genie
        from genie.runtime.remote import connect

        torch.set_num_threads(1)
        dtype = getattr(torch, args.dtypes[0])
        inputs = requests(args.family, args.model, args.requests + WARMUP, 100 + k, dtype)
        client = connect(address, token=token)
        with torch.no_grad():
            rmodel = build(args.family, args.model, dtype).to(REMOTE)
            for x in inputs[args.requests :]:
                answer(args.family, rmodel(x.to(REMOTE))).cpu()
            barrier.wait(timeout=args.timeout)
            start = time.perf_counter()
            lat, outs = [], []
            for x in inputs[: args.requests]:
                t0 = time.perf_counter()
                outs.append(answer(args.family, rmodel(x.to(REMOTE))).cpu())
                lat.append((time.perf_counter() - t0) * 1e3)
            end = time.perf_counter()
        results.put((k, start, end, lat, torch.stack(outs).numpy(), None))  # not shared memory
        genie.configure(local_device="cpu")
        client.close()
    except Exception:  # noqa: BLE001 - reported by the parent
        barrier.abort()  # the others stop waiting for this one
        results.put((k, 0.0, 0.0, [], None, traceback.format_exc()))


@torch.no_grad()
def load(args) -> dict:
    from genie.runtime.loopback import LoopbackServer

    dtype = getattr(torch, args.dtypes[0])
    # One local process running every client's requests back to back: the reference outputs
    # and the throughput to beat.
    fam = args.family
    model = build(fam, args.model, dtype).to(args.device)
    per_client = [
        requests(fam, args.model, args.requests + WARMUP, 100 + k, dtype)
        for k in range(args.clients)
    ]
    for x in per_client[0][args.requests :]:
        answer(fam, model(x.to(args.device))).cpu()
    refs, lat = [], []
    sync(args.device)
    start = time.perf_counter()
    for xs in per_client:
        outs = []
        for x in xs[: args.requests]:
            t0 = time.perf_counter()
            outs.append(answer(fam, model(x.to(args.device))).cpu())
            lat.append((time.perf_counter() - t0) * 1e3)
        refs.append(torch.stack(outs))
    local_s = time.perf_counter() - start
    del model
    total = args.clients * args.requests

    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(args.clients), ctx.Queue()
    with LoopbackServer(device=args.device, threads=args.threads) as srv:
        procs = [
            ctx.Process(
                target=load_client, args=(k, srv.address, srv.token, args, barrier, results)
            )
            for k in range(args.clients)
        ]
        for p in procs:
            p.start()
        got = []
        deadline = time.monotonic() + args.timeout
        while len(got) < len(procs):
            try:
                got.append(results.get(timeout=1.0))
            except queue.Empty:
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead or time.monotonic() > deadline:
                    for p in procs:
                        p.kill()
                    msg = f"load clients died (exit codes {dead}) or took too long"
                    raise RuntimeError(msg) from None
        for p in procs:
            p.join(30)
    errors = [e for *_, e in got if e]
    got = [
        (k, s, e, lat, None if o is None else torch.from_numpy(o), err)
        for k, s, e, lat, o, err in got
    ]
    if errors:
        raise RuntimeError("a load client failed:\n" + errors[0])
    start = min(g[1] for g in got)
    end = max(g[2] for g in got)
    lats = [x for g in got for x in g[3]]
    exact = all(torch.equal(g[4], refs[g[0]]) for g in got)
    diff = max(float((g[4].float() - refs[g[0]].float()).abs().max()) for g in got)
    genie_rps = total / (end - start)
    local_rps = total / local_s
    return {
        "clients": args.clients,
        "requests_per_client": args.requests,
        "local": {"rps": local_rps, "p50_ms": percentile(lat, 50), "p99_ms": percentile(lat, 99)},
        "genie": {"rps": genie_rps, "p50_ms": percentile(lats, 50), "p99_ms": percentile(lats, 99)},
        "throughput_vs_local": genie_rps / local_rps,
        "exact": exact,
        "max_abs_diff": diff,
    }


def report(args, dtype_name: str, rows: dict) -> None:
    cfg = config(args.family, args.model)
    shape = f"image {cfg['image']}" if "image" in cfg else f"seq {cfg['seq']}"
    print(
        f"\n{args.family} ({args.model}, batch {cfg['batch']}, {shape}, {dtype_name}) on "
        f"{args.device}, a fresh input every request; {args.rounds}x{args.per_round} requests "
        "per mode"
    )
    print(f"{'mode':<24}{'median ms':>10}{'p99 ms':>9}{'x eager':>9}{'equal':>7}")
    for name, r in rows.items():
        print(
            f"{name:<24}{r['median_ms']:>10.2f}{r['p99_ms']:>9.2f}{r['vs_eager']:>9.2f}"
            f"{str(r['equal_eager']):>7}"
        )
    lazy = rows["genie lazy"]["client"]
    print(
        f"genie lazy: {lazy['spec_hits']} of {lazy['calls']} requests started on the server "
        f"before their recording ended; {lazy['uploads_early']} inputs uploaded at .to()"
    )
    if "rpc" in rows:
        r = rows["genie lazy"]["median_ms"] / rows["rpc"]["median_ms"]
        print(f"genie lazy / rpc: {r:.2f}x")


def main() -> int:
    from genie.runtime.transports import default_spin_us

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda (server, eager and rpc)")
    ap.add_argument("--family", choices=FAMILIES, default="bert", help="the model served")
    ap.add_argument("--model", choices=["small", "base"], help="default: small on cpu, else base")
    ap.add_argument("--dtype", default="float32", help="float32, float16 or both: float32,float16")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads of every process")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--per-round", type=int, default=10, help="timed requests per mode per round")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=25, help="requests per load client")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds the load run may take")
    ap.add_argument("--no-rpc", action="store_true")
    ap.add_argument("--no-load", action="store_true")
    ap.add_argument("--load-only", action="store_true", help="only the concurrent-client run")
    ap.add_argument("--quick", action="store_true", help="a smoke run")
    args = ap.parse_args()
    if args.device == "cuda":
        args.device = "cuda:0"
    args.dtypes = args.dtype.split(",")
    args.model = args.model or ("small" if args.device == "cpu" else "base")
    if args.quick:
        args.rounds, args.per_round, args.clients, args.requests = 2, 3, 2, 4
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return 0
    if args.family == "resnet":
        try:
            import torchvision  # noqa: F401
        except ImportError:
            print("the resnet family needs torchvision, which is not installed: nothing to measure")
            return 0
    torch.set_num_threads(args.threads)
    os.environ.setdefault("GENIE_LOG_LEVEL", "WARNING")

    result: dict = {"modes": {}}
    rpc_proc = None
    if not (args.no_rpc or args.load_only):
        rpc_args = (args.family, args.model, args.dtypes, args.device, args.threads)
        rpc_proc = start_rpc(rpc_server, rpc_args)
    try:
        for dtype_name in [] if args.load_only else args.dtypes:
            rows = result["modes"][dtype_name] = compare(args, dtype_name, rpc_proc)
            report(args, dtype_name, rows)
    finally:
        if rpc_proc is not None:
            import torch.distributed.rpc as rpc

            rpc.shutdown()
            rpc_proc.join(30)
    result |= {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
            "torch": torch.__version__,
            "spin_us": default_spin_us(),  # GENIE_SPIN_US: how long each waiter polls
        },
        "args": vars(args),
    }
    if not args.no_load:
        ld = load(args)
        result["load"] = ld
        print(
            f"\nload: {ld['clients']} clients x {ld['requests_per_client']} requests against one "
            f"genie serve, vs one local process back to back"
        )
        print(f"{'':<8}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}")
        for k in ("local", "genie"):
            v = ld[k]
            print(f"{k:<8}{v['rps']:>9.1f}{v['p50_ms']:>9.2f}{v['p99_ms']:>9.2f}")
        print(f"throughput genie/local: {ld['throughput_vs_local']:.2f}x; exact: {ld['exact']}")

    name = "serving" + ("" if args.family == "bert" else f"_{args.family}")
    name += ("" if args.device == "cpu" else "_cuda") + ("_quick" if args.quick else "")
    path = ROOT / "bench" / "results" / f"{name}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
