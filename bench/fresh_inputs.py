"""The fresh-input rows of bench_remote_gpu.py (issue "Serving with fresh inputs"): a new input
every call, eager copying it to the GPU, genie uploading it at .to(), and a
torch.distributed.rpc (TensorPipe) server process holding the same model on the same GPU, taking
turns call by call; and the rpc set-up bench_serving.py shares."""

from __future__ import annotations

import multiprocessing as mp
import socket
import statistics
import time

import torch
from bench_remote_gpu import REMOTE, sync, to


def variants(inputs: tuple, n: int) -> list[tuple]:
    """`n` distinct inputs shaped like `inputs`: integers (token ids) below the largest one
    there, floats normal; seeded."""
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(n):
        out.append(
            tuple(
                torch.randn(t.shape, generator=g).to(t.dtype)
                if t.is_floating_point()
                else torch.randint(0, int(t.max()) + 1, t.shape, generator=g, dtype=t.dtype)
                for t in inputs
            )
        )
    return out


@torch.no_grad()
def fresh_inputs(name, build, inputs, pick, dtype, args, rmodel) -> dict:
    """A new input every call: eager (copied from the host each call), genie and rpc taking
    turns call by call; median ms of each, and whether every result equals eager's."""
    import genie

    fresh = variants(inputs, args.fresh_inputs)
    eager = build().to(dtype).to(args.device)
    refs = [pick(eager(*to(x, args.device))).cpu() for x in fresh]
    dtype_name = str(dtype).removeprefix("torch.")
    fns = {
        "eager": lambda x: pick(eager(*to(x, args.device))).cpu(),
        # The upload begins at .to() and the server starts the program as soon as it lands
        # (Note: [Early uploads] in remote/early.py, Note: [Client speculation]).
        "remote": lambda x: pick(rmodel(*to(x, REMOTE))).cpu(),
    }
    if _RPC_CLIENT["on"]:
        import torch.distributed.rpc as rpc

        rpc.rpc_sync("server", _rpc_load, args=(name, dtype_name, args.small))
        fns["rpc"] = lambda x: rpc.rpc_sync("server", _rpc_forward, args=x)
    times: dict[str, list[float]] = {k: [] for k in fns}
    equal = dict.fromkeys(fns, True)
    for fn in fns.values():  # warm-up: the server learns the program, rpc its buffers
        for x in fresh[:5]:
            fn(x)
    for i in range(args.repeats):
        x = fresh[i % len(fresh)]
        for k, fn in fns.items():
            sync(args.device)
            t0 = time.perf_counter()
            out = fn(x)
            sync(args.device)
            times[k].append((time.perf_counter() - t0) * 1e3)
            equal[k] = equal[k] and torch.equal(out, refs[i % len(fresh)])
    fns = eager = None  # free its GPU memory before the next row
    genie.synchronize()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    row = {f"{k}_new_input_ms": statistics.median(v) for k, v in times.items()}
    row |= {f"{k}_new_input_equal": v for k, v in equal.items() if k != "eager"}
    base = row["eager_new_input_ms"]
    row["remote_new_input_vs_eager"] = row["remote_new_input_ms"] / base
    if "rpc_new_input_ms" in row:
        row["rpc_new_input_vs_eager"] = row["rpc_new_input_ms"] / base
    return row


# -- torch.distributed.rpc: the same models in a server process, for the fresh-input rows -----
_RPC: dict = {}  # in the rpc server process: its device, the model and what the host needs
_RPC_CLIENT = {"on": False}


def _rpc_load(name: str, dtype_name: str, small: bool) -> None:
    from bench_remote_gpu import models

    _RPC.pop("model", None)
    if _RPC["device"].startswith("cuda"):
        torch.cuda.empty_cache()
    for n, build, _, pick in models(small):
        if n == name:
            _RPC["model"] = build().to(getattr(torch, dtype_name)).to(_RPC["device"])
            _RPC["pick"] = pick


def _rpc_forward(*x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return _RPC["pick"](_RPC["model"](*(t.to(_RPC["device"]) for t in x))).cpu()


def _rpc_server(port: int, device: str, threads: int) -> None:
    torch.set_num_threads(threads)
    _RPC["device"] = device
    serve_rpc(port)


def free_port() -> int:
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        return sk.getsockname()[1]


def start_rpc(target, args: tuple):
    """Spawn the rpc server process `target(port, *args)` and join this process to it as the
    client ("client", rank 1; the server is "server", rank 0). torch.distributed.rpc starts
    once a process. Returns the server process."""
    import torch.distributed.rpc as rpc

    port = free_port()
    proc = mp.get_context("spawn").Process(target=target, args=(port, *args))
    proc.start()
    opts = rpc.TensorPipeRpcBackendOptions(init_method=f"tcp://127.0.0.1:{port}")
    rpc.init_rpc("client", rank=1, world_size=2, rpc_backend_options=opts)
    return proc


def serve_rpc(port: int) -> None:
    """In the server process: join as "server" and serve until the client shuts down."""
    import torch.distributed.rpc as rpc

    opts = rpc.TensorPipeRpcBackendOptions(init_method=f"tcp://127.0.0.1:{port}")
    rpc.init_rpc("server", rank=0, world_size=2, rpc_backend_options=opts)
    rpc.shutdown()  # waits for the client's shutdown


def start_model_server(device: str):
    """The rpc server for the fresh-input rows, which load each row's model into it."""
    proc = start_rpc(_rpc_server, (device, torch.get_num_threads()))
    _RPC_CLIENT["on"] = True
    return proc


def fresh_goal(r: dict) -> str:
    limit = 1.25 if r["model"].startswith("ResNet") else 1.1 if r["dtype"] == "float32" else 1.0
    met = r["remote_new_input_vs_eager"] <= limit
    if "rpc_new_input_ms" in r:
        met = met and r["remote_new_input_ms"] < r["rpc_new_input_ms"]
    return "met" if met else "missed"


def fresh_line(r: dict) -> str:
    rpc_ms, rpc_x = r.get("rpc_new_input_ms"), r.get("rpc_new_input_vs_eager")
    equal = all(v for k, v in r.items() if k.endswith("_new_input_equal"))
    return " ".join([
        f"{r['model']:<20}", f"{r['dtype']:<8}", f"{r['eager_new_input_ms']:>9.2f}",
        f"{r['remote_new_input_ms']:>9.2f}", f"{r['remote_new_input_vs_eager']:>10.2f}x",
        f"{rpc_ms:>8.2f}" if rpc_ms is not None else " " * 8,
        f"{rpc_x:>8.2f}x" if rpc_x is not None else " " * 9,
        f"{str(equal):>6}", f"{fresh_goal(r):>7}",
    ])  # fmt: skip
