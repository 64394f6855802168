"""bench_compile.py's GPU mode (``--device cuda``): remote compiled vs local torch.compile
(inductor) vs local eager, a fresh input every call; see bench_compile.py for what it measures."""

from __future__ import annotations

import json
import traceback

import torch
from bench_compile import REMOTE, ROOT, _machine, interleaved

import genie
from genie.runtime.loopback import LoopbackServer
from genie.runtime.remote import connect


def gpu_models(small: bool):
    """(name, build(), make_input(generator, dtype), pick(output) -> what the host needs)."""
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

    seq, batch = (16, 2) if small else (128, 8)

    def ids(g, dtype):
        return torch.randint(0, 30000, (batch, seq), generator=g)

    def bert():
        torch.manual_seed(0)
        return BertModel(BertConfig(num_hidden_layers=2) if small else BertConfig()).eval()

    def gpt2_lm():
        torch.manual_seed(0)
        cfg = GPT2Config(bos_token_id=0, eos_token_id=0, **({"n_layer": 2} if small else {}))
        return GPT2LMHeadModel(cfg).eval()

    side = 64 if small else 224

    def image(g, dtype):
        return torch.randn(batch, 3, side, side, generator=g).to(dtype)

    def resnet50():
        torch.manual_seed(0)
        try:
            import torchvision

            return torchvision.models.resnet50(weights=None).eval()
        except ImportError:  # transformers' default ResNet config is ResNet-50's layout
            from transformers import ResNetConfig, ResNetForImageClassification

            cfg = ResNetConfig(depths=[1, 1, 1, 1]) if small else ResNetConfig()
            return ResNetForImageClassification(cfg).eval()

    def logits(o):
        return o if isinstance(o, torch.Tensor) else o.logits

    yield "BERT-base", bert, ids, lambda o: o.pooler_output
    yield "GPT-2", gpt2_lm, ids, lambda o: o.logits[:, -1].argmax(-1)
    yield "ResNet-50", resnet50, image, logits


@torch.no_grad()
def gpu_row(name, build, make_input, pick, dtype, args, client) -> dict:
    dev = args.device
    row: dict = {"model": name, "dtype": str(dtype).removeprefix("torch.")}
    g = torch.Generator().manual_seed(1)
    n = args.warmup + args.repeats

    def fresh():
        return make_input(g, dtype)

    check = make_input(torch.Generator().manual_seed(7), dtype)
    model = build().to(dtype).to(dev)

    def on_gpu(x):
        return pick(model(x.to(dev, non_blocking=True))).cpu()

    ref = on_gpu(check)
    fns = {"eager": on_gpu}
    torch._dynamo.reset()
    if not args.no_inductor:
        inductor = torch.compile(lambda x: pick(model(x)))
        fns["inductor"] = lambda x: inductor(x.to(dev, non_blocking=True)).cpu()
    if args.lazy:
        from bench_compile import floor_backend

        # What any torch.compile backend pays: Dynamo's guards, AOT's wrapper.
        floor_model = build().to(dtype)
        fns["dynamo"] = torch.compile(lambda x: pick(floor_model(x)), backend=floor_backend)
        # Lazy capture through the same session: every aten op recorded each call.
        remote = build().to(dtype).to(REMOTE)
        fns["lazy"] = lambda x: pick(remote(x.to(REMOTE))).cpu()
    cpu_model = build().to(dtype)
    compiled = torch.compile(lambda x: pick(cpu_model(x)), backend="genie",
                             options={"server": client})  # fmt: skip
    out = compiled(check)
    fns["compiled"] = compiled
    before = dict(client.stats())
    sync = torch.cuda.synchronize if dev.startswith("cuda") else None
    row.update(interleaved(fns, lambda: (fresh(),), args.repeats, args.warmup, sync))
    after = client.stats()
    if not args.lazy:  # the lazy column runs through the same session: its traffic counts too
        row["compiled"]["programs_sent"] = after["programs_sent"] - before["programs_sent"]
        for k in ("bytes_sent", "bytes_received"):
            row["compiled"][f"{k}_per_call"] = (after[k] - before[k]) / n
    row["compiled_equal_eager"] = bool(torch.equal(out, ref))
    if out.is_floating_point():
        row["compiled_max_abs_diff"] = float((out.float() - ref.float()).abs().max())
    row["compiled_vs_eager"] = row["compiled"]["wall_ms"] / row["eager"]["wall_ms"]
    fns = model = inductor = remote = None
    torch._dynamo.reset()
    if dev.startswith("cuda"):
        torch.cuda.empty_cache()
    return row


def gpu_main(args) -> None:
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("CUDA is not available: nothing measured (use --device cpu --small to check)")
        return
    dtypes = [{"fp32": torch.float32, "fp16": torch.float16}[d] for d in args.dtypes.split(",")]
    wanted = set(args.models.split(",")) if args.models else None
    rows: list[dict] = []
    name = args.out or ("compile_gpu_small.json" if args.small else "compile_gpu.json")
    path = ROOT / "bench" / "results" / name
    with LoopbackServer(device=args.device) as srv:
        # Installed, so that the lazy column's remote_accelerator tensors run there too.
        client = connect(srv.address, token=srv.token, install=args.lazy)
        try:
            for name, build, make_input, pick in gpu_models(args.small):
                if wanted is not None and name not in wanted:
                    continue
                for dtype in dtypes:
                    try:
                        row = gpu_row(name, build, make_input, pick, dtype, args, client)
                    except Exception as e:  # noqa: BLE001 - one failing row must not hide the rest
                        traceback.print_exc()
                        # The server's side of it (a closed session says nothing here).
                        print("server log, last lines:\n" + "\n".join(srv.log().splitlines()[-25:]))
                        row = {"model": name, "dtype": str(dtype), "error": repr(e)[:500]}
                    rows.append(row)
                    _print_gpu_row(row)
                    out = {"machine": _machine(), "small": args.small, "rows": rows}
                    path.write_text(
                        json.dumps(out, indent=2)
                    )  # after each row: a cut-off run keeps them
        finally:
            if args.lazy:
                genie.disconnect()
            client.close()
    print(f"wrote {path.relative_to(ROOT)}")


def _print_gpu_row(r: dict) -> None:
    if "error" in r:
        print(f"{r['model']:<10}{r['dtype']:>9}  failed: {r['error']}")
        return
    ind = r.get("inductor", {})
    lazy = ""
    if "lazy" in r:
        lz = r["lazy"]
        c, d = r["compiled"], r["dynamo"]
        lazy = f"  lazy {lz['wall_ms']:.2f} ms, client cpu {lz['cpu_ms']:.3f}"
        lazy += f" (compiled/lazy cpu {c['cpu_ms'] / lz['cpu_ms']:.3f}; calling thread: lazy "
        lazy += f"{lz['thread_cpu_ms']:.3f} compiled {c['thread_cpu_ms']:.3f} dynamo "
        lazy += f"{d['thread_cpu_ms']:.3f})"
    print(
        f"{r['model']:<10}{r['dtype']:>9}  eager {r['eager']['wall_ms']:8.2f} ms"
        f"  inductor {ind.get('wall_ms', float('nan')):8.2f} ms"
        f"  compiled {r['compiled']['wall_ms']:8.2f} ms ({r['compiled_vs_eager']:.2f}x eager)"
        f"  client cpu: eager {r['eager']['cpu_ms']:.2f} compiled {r['compiled']['cpu_ms']:.2f}"
        f"  equal {r['compiled_equal_eager']}{lazy}"
    )
