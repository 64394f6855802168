"""Remote execution on CPU over loopback: eager vs genie's local executor vs the remote
executor (a `genie serve` subprocess on 127.0.0.1), for GPT-2 small (124M, random weights)
forward and one greedy decode step with the KV cache, plus the bytes on the wire per step.

    python bench/bench_remote.py [--seq 64] [--repeats 5] [--threads N]

One run, median of `repeats`. Prints a table and writes bench/results/remote.json. Client and
server share this machine's cores, so the remote column pays for both processes.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import genie
from genie.runtime.loopback import LoopbackServer
from genie.runtime.remote import connect

ROOT = Path(__file__).resolve().parent.parent
REMOTE = "remote_accelerator:0"


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def gpt2_small():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(bos_token_id=0, eos_token_id=0)).eval()


def copy_of(model):
    clone = type(model)(model.config).eval()
    clone.load_state_dict(model.state_dict())
    return clone


def _busy(client) -> float:
    """Seconds the server spent handling this session's requests (0 without a client)."""
    return client.server_stats()["session"]["busy_seconds"] if client else 0.0


@torch.no_grad()
def measure(model, ids, repeats: int, device: str, client=None) -> dict:
    """Forward and decode-step latency of `model` (already on `device`), and, with `client`,
    the bytes each cost on the wire."""
    out: dict = {}
    dev_ids = ids.to(device)

    def forward():
        return model(dev_ids, use_cache=False).logits[:, -1].cpu()

    first = client.stats() if client else None
    t0 = time.perf_counter()
    ref_logits = forward()  # first call: weights go over (remote) or get staged (local)
    out["first_forward_ms"] = (time.perf_counter() - t0) * 1e3
    if client:
        s = client.stats()
        out["first_forward_bytes_sent"] = s["bytes_sent"] - first["bytes_sent"]
    before = client.stats() if client else None
    busy = _busy(client)
    out["forward_ms"] = median_ms(forward, repeats)
    if client:
        s = client.stats()
        n = repeats
        out["forward_bytes_sent"] = (s["bytes_sent"] - before["bytes_sent"]) / n
        out["forward_bytes_received"] = (s["bytes_received"] - before["bytes_received"]) / n
        out["forward_server_busy_ms"] = (_busy(client) - busy) * 1e3 / n

    # Greedy decode with the KV cache: one prefill, then timed steps that each extend it.
    state = {}
    o = model(dev_ids, use_cache=True)
    state["pkv"] = o.past_key_values
    state["tok"] = o.logits[:, -1:].argmax(-1)
    tokens = [state["tok"].cpu()]

    def step():
        o = model(state["tok"], past_key_values=state["pkv"], use_cache=True)
        state["pkv"] = o.past_key_values
        state["tok"] = o.logits[:, -1:].argmax(-1)
        tokens.append(state["tok"].cpu())

    step()  # the first decode step's program is new to the server
    before = client.stats() if client else None
    busy = _busy(client)
    out["decode_step_ms"] = median_ms(step, repeats)
    if client:
        out["decode_server_busy_ms"] = (_busy(client) - busy) * 1e3 / repeats
        s = client.stats()
        out["decode_bytes_sent"] = (s["bytes_sent"] - before["bytes_sent"]) / repeats
        out["decode_bytes_received"] = (s["bytes_received"] - before["bytes_received"]) / repeats
    out["tokens"] = torch.cat(tokens, 1).tolist()
    out["last_logits"] = ref_logits
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model = gpt2_small()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    ids = torch.randint(0, 50257, (1, args.seq), generator=torch.Generator().manual_seed(1))
    results: dict[str, dict] = {}

    results["eager"] = measure(model, ids, args.repeats, "cpu")

    genie.configure(local_device="cpu")
    results["local executor"] = measure(copy_of(model).to(REMOTE), ids, args.repeats, REMOTE)

    with LoopbackServer(threads=args.threads) as srv:
        client = connect(srv.address, token=srv.token)
        try:
            results["remote executor"] = measure(
                copy_of(model).to(REMOTE), ids, args.repeats, REMOTE, client
            )
            results["remote executor"]["client"] = client.stats()
            results["remote executor"]["server"] = client.server_stats()
        finally:
            genie.configure(local_device="cpu")
            client.close()

    ref = results["eager"]
    same = {
        name: bool(
            torch.equal(r["last_logits"], ref["last_logits"]) and r["tokens"] == ref["tokens"]
        )
        for name, r in results.items()
    }
    rows = []
    print(
        f"GPT-2 small (124M), batch 1, seq {args.seq}, CPU x{args.threads} threads, loopback, median of {args.repeats}"
    )
    print(
        f"{'path':<17} {'forward ms':>11} {'decode ms':>10} {'same as eager':>14} {'sent/step B':>12} {'recv/step B':>12}"
    )
    for name, r in results.items():
        sent = r.get("decode_bytes_sent")
        recv = r.get("decode_bytes_received")
        print(
            f"{name:<17} {r['forward_ms']:>11.1f} {r['decode_step_ms']:>10.1f} {str(same[name]):>14} "
            f"{'' if sent is None else f'{sent:.0f}':>12} {'' if recv is None else f'{recv:.0f}':>12}"
        )
        rows.append(
            {
                "path": name,
                "forward_ms": r["forward_ms"],
                "decode_step_ms": r["decode_step_ms"],
                "first_forward_ms": r["first_forward_ms"],
                "same_as_eager": same[name],
                **{k: v for k, v in r.items() if "bytes" in k or "busy" in k},
            }
        )
    remote = results["remote executor"]
    print(
        f"server busy per forward {remote['forward_server_busy_ms']:.1f} ms, per decode step "
        f"{remote['decode_server_busy_ms']:.1f} ms (the rest of the remote column is the client: "
        "capture, encoding, the wire)"
    )
    print(
        f"weights {weight_bytes / 1e6:.1f} MB sent once (first forward sent "
        f"{remote['first_forward_bytes_sent'] / 1e6:.1f} MB); per decode step "
        f"{remote['decode_bytes_sent']:.0f} B sent ({remote['decode_bytes_sent'] / weight_bytes:.2e} of the weights), "
        f"{remote['decode_bytes_received']:.0f} B received"
    )
    out = {
        "benchmark": "remote",
        "model": "gpt2-small (124M, random weights)",
        "batch": 1,
        "seq": args.seq,
        "threads": args.threads,
        "repeats": args.repeats,
        "machine": platform.platform(),
        "torch": torch.__version__,
        "weight_bytes": weight_bytes,
        "rows": rows,
        "client_counters": remote["client"],
        "server_session": remote["server"]["session"],
    }
    path = ROOT / "bench" / "results" / "remote.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2, default=str))
    print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
