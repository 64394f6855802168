"""torch.compile(backend="genie") vs lazy capture vs eager: the client's CPU time per forward.

    python bench/bench_compile.py [--quick] [--repeats 5] [--threads N]

For GPT-2 small (124M), BERT-base (110M) (random weights, HF transformers) and a ResNet-18-style
CNN, each call with a fresh input:
  eager            the model on this CPU (the client's time is the whole computation);
  lazy             ``model.to("remote_accelerator:0")`` through a loopback ``genie serve``:
                   every aten op recorded by the client each call;
  compiled         ``torch.compile(model, backend="genie", options={"server": ...})`` through
                   the same server: the program went once, a call is its key, the input and
                   the outputs;
  compiled-local   ``torch.compile(model, backend="genie")`` in this process (no server).
Client CPU time is ``time.process_time()`` of this process (the server is another process, so
its work is not in the remote columns). Client and server use one intra-op thread each by
default: on a small shared machine more threads make both wait on each other. Median over `repeats` calls after two warm-up calls.
Prints a table and writes bench/results/compile.json. GPU numbers are not measured here.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import genie
from genie.runtime.loopback import LoopbackServer
from genie.runtime.remote import connect

ROOT = Path(__file__).resolve().parent.parent
REMOTE = "remote_accelerator:0"


def gpt2(quick: bool):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(bos_token_id=0, eos_token_id=0)
    if quick:
        cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=500, bos_token_id=0)
    return GPT2LMHeadModel(cfg).eval(), lambda g: (_ids(g, cfg.vocab_size),), {"use_cache": False}


def bert(quick: bool):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig()
    if quick:
        cfg = BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                         intermediate_size=256, vocab_size=500)  # fmt: skip
    return BertModel(cfg).eval(), lambda g: (_ids(g, cfg.vocab_size),), {}


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.skip = nn.Identity()
        if stride != 1 or cin != cout:
            self.skip = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        return (self.b2(self.c2(self.b1(self.c1(x)).relu())) + self.skip(x)).relu()


def resnet(quick: bool):
    torch.manual_seed(0)
    widths = (16, 32) if quick else (64, 128, 256, 512)
    layers, cin = [], widths[0]
    for i, w in enumerate(widths):
        layers += [_Block(cin, w, 1 if i == 0 else 2), _Block(w, w, 1)]
        cin = w
    model = nn.Sequential(
        nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(),
        *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10),
    ).eval()  # fmt: skip
    side = 32 if quick else 64
    return model, lambda g: (torch.randn(1, 3, side, side, generator=g),), {}


def _ids(g: torch.Generator, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (1, 32), generator=g)


def _first(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    return out[0]


def per_call(fn, make_input, repeats: int) -> dict:
    """Median client CPU ms and wall ms of `fn(*make_input(g), ...)`, a fresh input each call."""
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        fn(*make_input(g))
    cpu, wall = [], []
    for _ in range(repeats):
        args = make_input(g)
        c0, w0 = time.process_time(), time.perf_counter()
        fn(*args)
        cpu.append((time.process_time() - c0) * 1e3)
        wall.append((time.perf_counter() - w0) * 1e3)
    return {"cpu_ms": statistics.median(cpu), "wall_ms": statistics.median(wall)}


@torch.no_grad()
def measure(name: str, build, quick: bool, repeats: int, client) -> dict:
    model, make_input, kw = build(quick)
    row: dict = {"model": name, "params": sum(p.numel() for p in model.parameters())}
    row["eager"] = per_call(lambda *a: _first(model(*a, **kw)), make_input, repeats)

    remote_model = copy.deepcopy(model).to(REMOTE)
    row["lazy"] = per_call(
        lambda *a: _first(remote_model(*(x.to(REMOTE) for x in a), **kw)).cpu(),
        make_input,
        repeats,
    )

    torch._dynamo.reset()
    compiled = torch.compile(model, backend="genie", options={"server": client})
    before = dict(client.stats())
    row["compiled"] = per_call(lambda *a: _first(compiled(*a, **kw)), make_input, repeats)
    row["compiled"]["programs_sent"] = client.stats()["programs_sent"] - before["programs_sent"]
    # The steady state: a call is the program's key, the binding, the input and the outputs.
    before = dict(client.stats())
    g = torch.Generator().manual_seed(5)
    for _ in range(repeats):
        compiled(*make_input(g), **kw)
    after = client.stats()
    for k in ("bytes_sent", "bytes_received"):
        row["compiled"][f"{k}_per_call"] = (after[k] - before[k]) / repeats

    torch._dynamo.reset()
    local = torch.compile(model, backend="genie", options={"server": "local"})
    row["compiled_local"] = per_call(lambda *a: _first(local(*a, **kw)), make_input, repeats)
    torch._dynamo.reset()

    g = torch.Generator().manual_seed(9)
    x = make_input(g)
    ref = _first(model(*x, **kw))
    row["compiled_equal_eager"] = bool(torch.equal(_first(compiled(*x, **kw)), ref))
    row["compiled_local_equal_eager"] = bool(torch.equal(_first(local(*x, **kw)), ref))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny configs (a smoke run)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads, client and server")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    with LoopbackServer(threads=args.threads) as srv:
        client = connect(srv.address, token=srv.token)  # lazy capture runs there too
        try:
            for name, build in (("GPT-2", gpt2), ("BERT", bert), ("ResNet-style", resnet)):
                rows.append(measure(name, build, args.quick, args.repeats, client))
        finally:
            genie.configure(local_device="cpu")
            client.close()

    head = (
        f"{'model':<13}{'eager cpu':>10}{'lazy cpu':>10}{'compiled cpu':>13}{'comp/lazy':>10}"
        f"{'local cpu':>10}{'local/eager':>12}{'eager wall':>11}{'comp wall':>10}  (ms)"
    )
    print(head)
    for r in rows:
        e, lz, c, lc = r["eager"], r["lazy"], r["compiled"], r["compiled_local"]
        print(
            f"{r['model']:<13}{e['cpu_ms']:>10.2f}{lz['cpu_ms']:>10.2f}{c['cpu_ms']:>13.2f}"
            f"{c['cpu_ms'] / lz['cpu_ms']:>10.3f}{lc['cpu_ms']:>10.2f}"
            f"{lc['cpu_ms'] / e['cpu_ms']:>12.3f}{e['wall_ms']:>11.2f}{c['wall_ms']:>10.2f}"
        )
    out = {
        "machine": {"platform": platform.platform(), "cpus": torch.get_num_threads()},
        "quick": args.quick,
        "repeats": args.repeats,
        "gpu": "not measured",
        "rows": rows,
    }
    path = ROOT / "bench" / "results" / ("compile_quick.json" if args.quick else "compile.json")
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
