"""torch.compile(backend="genie") vs lazy capture vs eager: the client's CPU time per forward;
on a GPU, remote compiled vs local torch.compile (inductor) vs local eager.

    python bench/bench_compile.py [--quick] [--repeats 5] [--threads N]
    python bench/bench_compile.py --device cuda [--dtypes fp32,fp16] [--models BERT-base,GPT-2]
    python bench/bench_compile.py --device cpu --small      # check the GPU mode without a GPU

CPU mode (the default). For GPT-2 small (124M), BERT-base (110M) (random weights, HF
transformers) and a ResNet-18-style CNN, each call with a fresh input:
  eager            the model on this CPU (the client's time is the whole computation);
  lazy             ``model.to("remote_accelerator:0")`` through a loopback ``genie serve``:
                   every aten op recorded by the client each call;
  compiled         ``torch.compile(model, backend="genie", options={"server": ...})`` through
                   the same server: the program went once, a call is its key, the input and
                   the outputs;
  compiled-local   ``torch.compile(model, backend="genie")`` in this process (no server);
  dynamo           the floor every torch.compile backend pays: the same model compiled with a
                   backend whose graph returns outputs it computed once (Dynamo's guards, AOT
                   autograd's wrapper and the model's own Python around the graph, no work);
                   ``comp-dyn/lazy`` is compiled's own cost over lazy capture's.
Client CPU time is ``time.process_time()`` of this process around each call: user and system
time of every thread of the client, and nothing of the server, which is another process
(``LoopbackServer`` starts ``genie serve`` as a child; ``getrusage(RUSAGE_SELF)``, used as a
cross-check, counts a child only once it is waited for). Client and server use one intra-op
thread each by default: on a small shared machine more threads make both wait on each other.
Median over `repeats` calls after two warm-up calls; the columns take turns, each round
starting one column later, so that each follows every other equally often (what ran just
before a call decides how much of its memory is still in the caches, and so its CPU time).
Writes bench/results/compile.json.

GPU mode (``--device cuda``). BERT-base, GPT-2 (124M) and ResNet-50 (torchvision's, else
transformers' ResNet-50 layout), random weights, batch 8 (sequence 128, images 224x224), fp32
and fp16; what the host needs is computed in the graph and brought to the host (BERT's pooled
output, GPT-2's next-token ids, ResNet's logits). A fresh input tensor every call (never one
the server holds already):
  eager      the model on the GPU; the input copied there and the result back each call;
  inductor   ``torch.compile(f)`` (inductor) of the same, on the GPU;
  compiled   ``torch.compile(f, backend="genie")`` of the CPU model through a loopback
             ``genie serve --device cuda`` on the same GPU: weights uploaded once.
Milliseconds per call (median), and the client's CPU milliseconds per call. Every compiled
result is compared with eager's on the same GPU. Goal (issue 18): compiled <= 1.1x eager.
Writes bench/results/compile_gpu.json (compile_gpu_small.json with --small). A transport that
polls for replies (``GENIE_SPIN_US``, 10 ms by default on hosts with 8 or more cores) counts
its polling in the client's CPU time; the JSON records the setting.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import genie
import genie.compile  # noqa: F401 - registers "genie" where no entry point is installed
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


def interleaved(fns: dict, make, repeats: int, warmup: int = 2, sync=None) -> dict[str, dict]:
    """Median client CPU ms (every thread of the client, and the calling thread alone) and
    wall ms of each of `fns` called as `fn(*make())`, a fresh input each call, after `warmup`
    untimed rounds. The columns take turns call by call, so that a shared, noisy machine (or
    a GPU whose clocks change) slows them alike and their ratios hold; each round starts one
    column later, so that each column follows every other equally often. `sync` (a GPU's
    synchronize) runs before the clocks start and before they stop."""
    names = list(fns)
    got: dict[str, tuple[list, list, list]] = {k: ([], [], []) for k in names}
    for r in range(warmup + repeats):
        shift = r % len(names)
        for k in names[shift:] + names[:shift]:
            args = make()
            if sync is not None:
                sync()
            c0, t0, w0 = time.process_time(), time.thread_time(), time.perf_counter()
            fns[k](*args)
            if sync is not None:
                sync()
            if r >= warmup:
                cpu, thread, wall = got[k]
                wall.append((time.perf_counter() - w0) * 1e3)
                cpu.append((time.process_time() - c0) * 1e3)
                thread.append((time.thread_time() - t0) * 1e3)
    return {
        k: {
            "cpu_ms": statistics.median(cpu),
            "thread_cpu_ms": statistics.median(thread),
            "wall_ms": statistics.median(wall),
        }
        for k, (cpu, thread, wall) in got.items()
    }


def baseline_backend(rev: str):
    """The Dynamo backend of ``genie.compile`` as of git revision `rev`, loaded beside today's
    under another package name, so that one run measures a change and its base side by side
    (``--baseline REV``). Its storage ids start elsewhere, so that both share one session."""
    files = subprocess.run(
        ["git", "ls-tree", "--name-only", rev, "python/genie/compile/"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout.split()  # fmt: skip
    root = Path(tempfile.mkdtemp(prefix="genie-compile-base-"))
    pkg = root / "genie_compile_base"
    pkg.mkdir()
    for f in files:
        text = subprocess.run(
            ["git", "show", f"{rev}:{f}"], cwd=ROOT, check=True, capture_output=True, text=True
        ).stdout
        text = text.replace("genie.compile.", "genie_compile_base.")
        text = text.replace("itertools.count(1 << 48)", "itertools.count((1 << 48) + (1 << 46))")
        (pkg / Path(f).name).write_text(text)
    sys.path.insert(0, str(root))
    import genie_compile_base

    return genie_compile_base.genie_backend


def floor_backend(gm: torch.fx.GraphModule, example_inputs: list):
    """A backend whose graph costs nothing: through AOT autograd as genie's, its compiled
    function returns the outputs of its first call (the "dynamo" column)."""
    from torch._dynamo.backends.common import aot_autograd

    def compiler(graph: torch.fx.GraphModule, inputs: list):
        outputs: list = []

        def run(args: list):
            if not outputs:
                outputs.append(graph(*args))
            return outputs[0]

        run._boxed_call = True
        return run

    return aot_autograd(fw_compiler=compiler, keep_inference_input_mutations=True)(
        gm, example_inputs
    )


@torch.no_grad()
def measure(name: str, build, quick: bool, repeats: int, client, base=None) -> dict:
    model, make_input, kw = build(quick)
    row: dict = {"model": name, "params": sum(p.numel() for p in model.parameters())}
    remote_model = copy.deepcopy(model).to(REMOTE)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="genie", options={"server": client})
    local = torch.compile(model, backend="genie", options={"server": "local"})
    floor = torch.compile(model, backend=floor_backend)
    fns = {
        "eager": lambda *a: _first(model(*a, **kw)),
        "dynamo": lambda *a: _first(floor(*a, **kw)),
        "lazy": lambda *a: _first(remote_model(*(x.to(REMOTE) for x in a), **kw)).cpu(),
        "compiled": lambda *a: _first(compiled(*a, **kw)),
        "compiled_local": lambda *a: _first(local(*a, **kw)),
    }
    if base is not None:
        compiled_base = torch.compile(
            model, backend=functools.partial(base, options={"server": client})
        )
        fns["compiled_base"] = lambda *a: _first(compiled_base(*a, **kw))
    before = dict(client.stats())
    g = torch.Generator().manual_seed(1)
    row.update(interleaved(fns, lambda: make_input(g), repeats))
    row["programs_sent"] = client.stats()["programs_sent"] - before["programs_sent"]
    # The steady state: a call is the program's key, the binding, the input and the outputs.
    before = dict(client.stats())
    g = torch.Generator().manual_seed(5)
    for _ in range(repeats):
        compiled(*make_input(g), **kw)
    after = client.stats()
    for k in ("bytes_sent", "bytes_received"):
        row["compiled"][f"{k}_per_call"] = (after[k] - before[k]) / repeats

    g = torch.Generator().manual_seed(9)
    x = make_input(g)
    ref = _first(model(*x, **kw))
    row["compiled_equal_eager"] = bool(torch.equal(_first(compiled(*x, **kw)), ref))
    row["compiled_local_equal_eager"] = bool(torch.equal(_first(local(*x, **kw)), ref))
    torch._dynamo.reset()
    return row


def _train_step(model, opt, x, y):
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss


TRAIN_VARIANTS = ("model_compiled", "step_compiled", "step_compiled_deferred")


def measure_train(quick: bool, repeats: int, client) -> dict:
    """SGD-with-momentum steps of the ResNet-style CNN in training mode (batch 8) through the
    server, a fresh batch each step: the model compiled (the optimizer runs here, on the host's
    copies) vs the whole step compiled (the optimizer runs on the server; the host's copies
    brought back each step, or left there with ``defer_host_copies``). Per step: client CPU
    and wall milliseconds, bytes uploaded and fetched."""
    model, make_input, _ = resnet(quick)
    model.train()
    side = make_input(torch.Generator())[0].shape[-1]
    row: dict = {"model": "ResNet-style train step"}
    row["param_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())

    def batch(g):
        return torch.randn(8, 3, side, side, generator=g), torch.randint(0, 10, (8,), generator=g)

    torch._dynamo.reset()
    fns = {}
    for label in TRAIN_VARIANTS:
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
        options = {"server": client, "defer_host_copies": label == "step_compiled_deferred"}
        if label == "model_compiled":
            compiled_model = torch.compile(m, backend="genie", options=options)
            fns[label] = functools.partial(_train_step, compiled_model, opt)
        else:
            compiled = torch.compile(_train_step, backend="genie", options=options)
            fns[label] = functools.partial(compiled, m, opt)
    g = torch.Generator().manual_seed(1)
    row.update(interleaved(fns, lambda: batch(g), repeats))
    g = torch.Generator().manual_seed(5)
    for label, step in fns.items():
        before = client.stats()
        for _ in range(repeats):
            step(*batch(g))
        after = client.stats()
        for k in ("upload_bytes", "fetch_bytes"):
            row[label][f"{k}_per_step"] = (after[k] - before[k]) / repeats
    torch._dynamo.reset()
    return row


def cpu_main(args) -> None:
    torch.set_num_threads(args.threads)
    rows, train = [], None
    base = baseline_backend(args.baseline) if args.baseline else None
    with LoopbackServer(threads=args.threads) as srv:
        client = connect(srv.address, token=srv.token)  # lazy capture runs there too
        try:
            for name, build in (("GPT-2", gpt2), ("BERT", bert), ("ResNet-style", resnet)):
                if args.only in (None, "forward"):
                    rows.append(measure(name, build, args.quick, args.repeats, client, base))
            if args.only in (None, "train"):
                train = measure_train(args.quick, args.repeats, client)
        finally:
            genie.configure(local_device="cpu")
            client.close()

    base_head = f"{'base cpu':>10}{'base/lazy':>10}{'base-dyn/lazy':>14}" if base else ""
    print(
        f"{'model':<13}{'eager cpu':>10}{'lazy cpu':>10}{'dynamo cpu':>11}{'compiled cpu':>13}"
        f"{'comp/lazy':>10}{'comp-dyn/lazy':>14}{base_head}{'local cpu':>10}{'local/eager':>12}"
        f"{'eager wall':>11}{'comp wall':>10}  (ms)"
    )
    for r in rows:
        e, lz, c, lc = r["eager"], r["lazy"], r["compiled"], r["compiled_local"]
        d, b = r["dynamo"]["cpu_ms"], r.get("compiled_base")
        base_cols = ""
        if b:
            base_cols = (
                f"{b['cpu_ms']:>10.2f}{b['cpu_ms'] / lz['cpu_ms']:>10.3f}"
                f"{(b['cpu_ms'] - d) / lz['cpu_ms']:>14.3f}"
            )
        print(
            f"{r['model']:<13}{e['cpu_ms']:>10.2f}{lz['cpu_ms']:>10.2f}{d:>11.2f}{c['cpu_ms']:>13.2f}"
            f"{c['cpu_ms'] / lz['cpu_ms']:>10.3f}{(c['cpu_ms'] - d) / lz['cpu_ms']:>14.3f}"
            f"{base_cols}{lc['cpu_ms']:>10.2f}{lc['cpu_ms'] / e['cpu_ms']:>12.3f}"
            f"{e['wall_ms']:>11.2f}{c['wall_ms']:>10.2f}"
        )
    if train is not None:
        print(
            f"\n{'train step (ResNet-style, batch 8)':<36}{'client cpu':>11}{'wall':>9}"
            f"{'uploaded':>12}{'fetched':>12}  (ms, bytes per step; parameters: "
            f"{train['param_bytes']} bytes)"
        )
        for label in TRAIN_VARIANTS:
            t = train[label]
            print(
                f"{label:<36}{t['cpu_ms']:>11.2f}{t['wall_ms']:>9.1f}"
                f"{t['upload_bytes_per_step']:>12.0f}{t['fetch_bytes_per_step']:>12.0f}"
            )
    out = {
        "machine": _machine(),
        "quick": args.quick,
        "repeats": args.repeats,
        "baseline": args.baseline,
        "rows": rows,
        "train": train,
    }
    name = "compile_quick.json" if args.quick else "compile.json"
    if args.only is not None:
        name = name.replace(".json", f"_{args.only}.json")
    path = ROOT / "bench" / "results" / name
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path.relative_to(ROOT)}")


def _machine() -> dict:
    from genie.runtime.transports.base import default_spin_us

    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "spin_us": default_spin_us(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CPU mode: tiny configs (a smoke run)")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls (5 CPU, 20 GPU)")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads, client and server")
    ap.add_argument("--device", default=None, help="GPU mode on this device (cuda, cuda:1, cpu)")
    ap.add_argument("--small", action="store_true", help="GPU mode: tiny configs, to check it")
    ap.add_argument("--dtypes", default="fp32,fp16", help="GPU mode: fp32,fp16")
    ap.add_argument("--models", default="", help="GPU mode: BERT-base,GPT-2,ResNet-50 (all)")
    ap.add_argument("--warmup", type=int, default=5, help="GPU mode: untimed calls first")
    ap.add_argument("--no-inductor", action="store_true", help="GPU mode: skip inductor")
    ap.add_argument(
        "--lazy", action="store_true",
        help="GPU mode: also lazy capture through the same server (client CPU per call, "
        "compiled vs lazy; run with GENIE_SPIN_US=0 so that waiting is not counted)",
    )  # fmt: skip
    ap.add_argument("--only", choices=("forward", "train"), help="CPU mode: one part")
    ap.add_argument(
        "--baseline", default=None, metavar="REV",
        help="CPU mode: also genie.compile as of git REV, side by side (compiled_base)",
    )  # fmt: skip
    ap.add_argument("--out", default=None, help="GPU mode: JSON file name under bench/results")
    args = ap.parse_args()
    if args.device is None:
        args.repeats = args.repeats or 5
        cpu_main(args)
    else:
        args.repeats = args.repeats or 20
        from compile_gpu import gpu_main  # it imports this module

        gpu_main(args)


if __name__ == "__main__":
    main()
