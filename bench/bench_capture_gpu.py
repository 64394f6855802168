"""GPU check of the capture core: the embedded executor on CUDA against eager CUDA.

For GPT-2 (12 layers), BERT-base and a ResNet-style CNN at batch 8 (sequence 128, 32x32 images
for the CNN here; ResNet-50 is in bench_remote_gpu.py), it captures on remote_accelerator with the
local executor on cuda:0, checks the result against eager CUDA (same kernels: equal bits
expected) and times eager CUDA forward vs capture + replay. Skips cleanly without CUDA.

    GENIE_LOCAL_DEVICE=cuda python bench/bench_capture_gpu.py

Prints a table and writes bench/results/capture_gpu.json.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def timed(fn, repeats=10) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def models():
    from transformers import BertConfig, BertModel, GPT2Config, GPT2Model

    sys.path.insert(0, str(ROOT / "tests"))
    from fakes import resnet  # the test suite's ResNet-style CNN

    torch.manual_seed(0)
    ids = torch.randint(0, 30000, (8, 128), generator=torch.Generator().manual_seed(1))
    yield (
        "GPT-2 12L",
        GPT2Model(GPT2Config(bos_token_id=0, eos_token_id=0)).eval(),
        (ids,),
        lambda o: o.last_hidden_state,
    )
    yield "BERT-base", BertModel(BertConfig()).eval(), (ids,), lambda o: o.last_hidden_state
    yield "ResNet-style CNN", resnet(), (torch.randn(8, 3, 32, 32),), lambda o: o


def main() -> int:
    if not torch.cuda.is_available():
        print("bench_capture_gpu: no CUDA device; skipped")
        return 0
    import genie

    genie.configure(local_device="cuda:0")
    rows = []
    for name, model, inputs, pick in models():
        with torch.no_grad():
            cmodel = model.to("cuda")
            cin = [x.to("cuda") for x in inputs]
            ref = pick(cmodel(*cin))
            eager = timed(lambda cmodel=cmodel, cin=cin: cmodel(*cin))
            rmodel = model.to(genie.BACKEND)
            rin = [x.to(genie.BACKEND) for x in inputs]
            out = pick(rmodel(*rin)).cpu()
            equal = torch.equal(out, ref.cpu())
            maxdiff = (out - ref.cpu()).abs().max().item()

            def capture_and_run(pick=pick, rmodel=rmodel, rin=rin):
                pick(rmodel(*rin)).to("cuda")  # fetch stays on the GPU's side of the copy

            total = timed(capture_and_run)
            model.to("cpu")
        rows.append(
            {
                "model": name,
                "eager_cuda_ms": eager,
                "capture_plus_replay_ms": total,
                "ratio": total / eager,
                "equal_to_eager_cuda": equal,
                "max_abs_diff": maxdiff,
            }
        )
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    print(f"{'model':<18}{'eager ms':>10}{'genie ms':>10}{'ratio':>8}  equal  max|diff|")
    for r in rows:
        print(
            f"{r['model']:<18}{r['eager_cuda_ms']:>10.2f}{r['capture_plus_replay_ms']:>10.2f}"
            f"{r['ratio']:>8.2f}  {str(r['equal_to_eager_cuda']):<6} {r['max_abs_diff']:.2e}"
        )
    out = ROOT / "bench" / "results" / "capture_gpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": rows},
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
