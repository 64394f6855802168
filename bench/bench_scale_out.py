"""Scale-out on CPU over loopback: a GPT-2 (4 layers, width 256, random weights) split over two
`genie serve --device cpu` servers, its activations moved through the client (relay) or
between the servers directly (Note: [Server-to-server moves]), and the same model over two
servers that may each hold only 70% of its weights (--memory-limit).

    python bench/bench_scale_out.py [--repeats 5] [--seq 128]

Per configuration, the median of `repeats` second-and-later forwards (new input each time):
milliseconds, bytes over the client's links, bytes the servers moved between themselves.
Prints a table and writes bench/results/scale_out.json. Client and both servers share this
machine's cores, so times are for one machine, not a cluster.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import secrets
import statistics
import time
from pathlib import Path

import torch

import genie
from genie.runtime.loopback import LoopbackServer

ROOT = Path(__file__).resolve().parent.parent
REMOTE = "remote_accelerator:0"


def model_and_weights():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=500, n_positions=256)
    model = GPT2LMHeadModel(cfg).eval()
    return model, sum(p.numel() * p.element_size() for p in model.parameters())


def client_bytes(ex) -> int:
    return sum(
        b.executor.stats()["bytes_sent"] + b.executor.stats()["bytes_received"]
        for b in ex.backends.values()
    )


@torch.no_grad()
def run(
    name: str, model, servers, token, *, direct: bool, strategy: str | None, seq: int, args
) -> dict:
    ex = genie.connect([s.address for s in servers], token=token)
    ex.direct = direct
    if strategy:
        ex.scheduler.strategy = strategy
    try:
        rmodel = copy.deepcopy(model).to(REMOTE)
        gen = torch.Generator().manual_seed(1)

        def ids():
            return torch.randint(0, 500, (args.batch, seq), generator=gen)

        first = ids()
        ok = torch.equal(rmodel(first.to(REMOTE)).logits.cpu(), model(first).logits)
        times, wire, moved = [], [], []
        runs0, freed0 = ex.stats["runs"], ex.stats["released_early"]
        for _ in range(args.repeats):
            x = ids()
            b0, m0 = client_bytes(ex), ex.stats["direct_bytes"]
            t0 = time.perf_counter()
            rmodel(x.to(REMOTE)).logits.cpu()
            times.append((time.perf_counter() - t0) * 1e3)
            wire.append(client_bytes(ex) - b0)
            moved.append(ex.stats["direct_bytes"] - m0)
        plan = ex.last_plan
        return {
            "config": name,
            "seq": seq,
            "equal_to_eager": ok,
            "forward_ms": statistics.median(times),
            "client_link_bytes": int(statistics.median(wire)),
            "server_to_server_bytes": int(statistics.median(moved)),
            "fragments": len(plan.fragments),
            # Requests per forward, and dead values freed before the flush ended (Note: [Runs]).
            "runs": (ex.stats["runs"] - runs0) // args.repeats,
            "freed_early": (ex.stats["released_early"] - freed0) // args.repeats,
            "servers_used": len({f.device for f in plan.fragments}),
            "peak_planned": ex.last_schedule.peak_memory,
        }
    finally:
        genie.disconnect()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument(
        "--limit-seq",
        type=int,
        default=128,
        help="sequence length of the memory-limited run: its dead activations are freed after "
        "their last reader, in shorter requests when they do not fit otherwise (Note: [Runs])",
    )
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "scale_out.json"))
    args = p.parse_args()
    model, weights = model_and_weights()
    token = secrets.token_hex(16)
    threads = torch.get_num_threads()
    rows = []
    with (
        LoopbackServer(token=token, threads=threads) as s0,
        LoopbackServer(token=token, threads=threads) as s1,
    ):
        for name, direct in (("pipeline, relay via client", False), ("pipeline, direct", True)):
            rows.append(
                run(
                    name,
                    model,
                    (s0, s1),
                    token,
                    direct=direct,
                    strategy="pipeline",
                    seq=args.seq,
                    args=args,
                )
            )
    limit = str(int(weights * 0.7))
    with (
        LoopbackServer(token=token, threads=threads, memory_limit=limit) as s0,
        LoopbackServer(token=token, threads=threads, memory_limit=limit) as s1,
    ):
        rows.append(
            run(
                f"auto, --memory-limit {limit}",
                model,
                (s0, s1),
                token,
                direct=True,
                strategy=None,
                seq=args.limit_seq,
                args=args,
            )
        )
    hidden = args.batch * args.seq * 256 * 4
    print(f"weights {weights} B, one hidden state {hidden} B, seq {args.seq}, batch {args.batch}")
    print(
        f"{'config':<34} {'seq':>4} {'eq':>3} {'fwd ms':>8} {'client B':>10} {'s2s B':>9} "
        f"{'frags':>5} {'runs':>5} {'freed':>5}"
    )
    for r in rows:
        print(
            f"{r['config']:<34} {r['seq']:>4} {'yes' if r['equal_to_eager'] else 'NO':>3} "
            f"{r['forward_ms']:8.1f} "
            f"{r['client_link_bytes']:>10} {r['server_to_server_bytes']:>9} {r['fragments']:>5} "
            f"{r['runs']:>5} {r['freed_early']:>5}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "machine": platform.node(),
        "cpus": torch.get_num_threads(),
        "weights_bytes": weights,
        "hidden_state_bytes": hidden,
        "seq": args.seq,
        "batch": args.batch,
        "repeats": args.repeats,
    }
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
