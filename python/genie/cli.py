"""The ``genie`` command: ``genie demo | serve | analyze | bench``.

Nothing imports this module; it imports the layers it drives.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time


def _demo(args: argparse.Namespace) -> int:
    import torch

    import genie

    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        print("genie demo needs transformers: pip install transformers", file=sys.stderr)
        return 2

    if args.remote:
        from genie.runtime.loopback import loopback_session

        with loopback_session(device=args.remote_device):
            return _demo_body(args, torch, genie, GPT2Config, GPT2LMHeadModel)
    return _demo_body(args, torch, genie, GPT2Config, GPT2LMHeadModel)


def _demo_body(args, torch, genie, GPT2Config, GPT2LMHeadModel) -> int:
    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=args.layers,
        n_embd=args.width,
        n_head=max(1, args.width // 64),
        vocab_size=args.vocab,
        n_positions=max(128, args.seq + args.tokens),
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(
        0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1)
    )
    print(
        f"genie {genie.__version__}: GPT-2 ({args.layers} layers, width {args.width}), "
        f"batch {args.batch}, sequence {args.seq}; executor: {genie._C._executor_name()}"
    )

    with torch.no_grad():
        model(ids)  # warm-up, like the remote path below
        t0 = time.perf_counter()
        ref = model(ids).logits
        t_eager = time.perf_counter() - t0

        rmodel = model.to(genie.BACKEND)
        rids = ids.to(genie.BACKEND)
        rmodel(rids).logits.cpu()  # first call: uploads weights, warms the shape cache
        t0 = time.perf_counter()
        out = rmodel(rids).logits
        t_capture = time.perf_counter() - t0
        graph = genie.get_graph()
        t0 = time.perf_counter()
        got = out.cpu()
        t_run = time.perf_counter() - t0

        gen_ref = model.to("cpu").generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=args.tokens,
            do_sample=False,
            pad_token_id=0,
        )
        rmodel = model.to(genie.BACKEND)
        gen = rmodel.generate(
            rids,
            attention_mask=torch.ones_like(rids),
            max_new_tokens=args.tokens,
            do_sample=False,
            pad_token_id=0,
        ).cpu()

        # torch.compile(backend="genie"): the program is recorded and checked once (first call).
        compiled = torch.compile(model.to("cpu"), backend="genie")
        compiled(ids)
        t0 = time.perf_counter()
        compiled_logits = compiled(ids).logits
        t_compiled = time.perf_counter() - t0

    s = graph.summary()
    print(f"captured graph: {s['nodes']} nodes, {s['edges']} edges, hash {s['hash']}")
    print("  top ops: " + ", ".join(f"{op} x{n}" for op, n in s["top_ops"]))
    print(f"eager forward      {t_eager * 1e3:9.2f} ms")
    print(f"capture            {t_capture * 1e3:9.2f} ms")
    print(f"flush (run)        {t_run * 1e3:9.2f} ms")
    same = torch.equal(got, ref)
    print(f"logits equal to eager CPU: {same}")
    gen_same = torch.equal(gen, gen_ref)
    print(f"greedy generation of {args.tokens} tokens equal to eager: {gen_same}")
    compiled_same = torch.equal(compiled_logits, ref)
    print(
        f"torch.compile(backend='genie') forward {t_compiled * 1e3:.2f} ms, "
        f"logits equal to eager CPU: {compiled_same}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "eager_ms": t_eager * 1e3,
                    "capture_ms": t_capture * 1e3,
                    "run_ms": t_run * 1e3,
                    "graph": {k: v for k, v in s.items() if k != "top_ops"},
                    "equal": same,
                    "generation_equal": gen_same,
                    "compiled_ms": t_compiled * 1e3,
                    "compiled_equal": compiled_same,
                },
                f,
                indent=2,
            )
    return 0 if same and gen_same and compiled_same else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="genie", description="Run PyTorch programs on remote GPUs."
    )
    parser.add_argument("--log-level", default="WARNING", help="logging level (DEBUG, INFO, ...)")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="capture a small GPT-2, run it, check it against eager")
    demo.add_argument("--layers", type=int, default=2)
    demo.add_argument("--width", type=int, default=128)
    demo.add_argument("--vocab", type=int, default=1000)
    demo.add_argument("--batch", type=int, default=2)
    demo.add_argument("--seq", type=int, default=32)
    demo.add_argument("--tokens", type=int, default=8, help="tokens to generate greedily")
    demo.add_argument("--json", help="also write the numbers to this file")
    demo.add_argument(
        "--remote",
        action="store_true",
        help="start a loopback `genie serve` and run the demo through it",
    )
    demo.add_argument(
        "--remote-device", default="cpu", help="the loopback server's device (cpu, cuda:0)"
    )
    demo.set_defaults(func=_demo)

    from genie.runtime.server import add_serve_arguments, serve_main

    serve = sub.add_parser("serve", help="serve remote_accelerator work on this host's device")
    add_serve_arguments(serve, log_level=False)
    serve.set_defaults(func=serve_main)

    from genie.scheduler.cli import add_schedule_arguments, schedule_command
    from genie.semantic.cli import add_analyze_arguments, analyze_command

    def analyze_and_schedule(args: argparse.Namespace) -> int:
        def then(graph, profile) -> int:
            return schedule_command(args, graph=graph, profile=profile) if args.schedule else 0

        return analyze_command(args, then=then)

    analyze = sub.add_parser(
        "analyze",
        help="profile a model (workload, phases, patterns), optionally "
        "schedule it over devices; write JSON/DOT/PNG",
    )
    add_analyze_arguments(analyze)
    add_schedule_arguments(analyze)
    analyze.set_defaults(func=analyze_and_schedule)

    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
