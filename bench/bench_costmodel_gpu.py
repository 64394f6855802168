"""The cost model against a real GPU: predicted vs measured time per op family.

For BERT-base, GPT-2 (124M) and a ResNet-50 (torchvision's when installed, else the same
architecture built here), all from configs with random weights, at batch 8 / sequence 128 /
224x224 images, in fp32 and fp16:

* measured: the model runs eagerly on the device under torch.profiler; each aten op's own
  kernel time (self device time, so nested ops are not counted twice) is summed by family;
* predicted: the same forward recorded by genie (nothing runs), every node costed by
  GraphCostEstimator against the device's DeviceSpec (H100 preset figures when it is one),
  summed by family -- with and without the per-op launch overhead the roofline adds;
* cross-calibrated: factors learnt from the other models' measurements applied to this one
  (the adaptive path, judged on data it did not see).

    python bench/bench_costmodel_gpu.py [--device cuda:0] [--dtypes fp32,fp16] [--iters 5]

Prints a table and writes bench/results/costmodel_gpu.json. Without CUDA it says so and
exits 0 (``--device cpu`` runs the same path on the CPU, as a smoke test).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "costmodel_gpu.json"


# -- models from configs ------------------------------------------------------------------------
class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        idt = x if self.down is None else self.down(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + idt)


class ResNet50(nn.Module):
    """ResNet-50's architecture (torchvision's layout) for machines without torchvision."""

    def __init__(self, layers=(3, 4, 6, 3), classes: int = 1000):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 7, 2, 3, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
        blocks, cin = [], 64
        for i, (n, width) in enumerate(zip(layers, (64, 128, 256, 512), strict=True)):
            for j in range(n):
                blocks.append(Bottleneck(cin, width, 2 if (j == 0 and i > 0) else 1))
                cin = width * 4
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


def build(name: str, batch: int, seq: int, image: int):
    """(model, inputs) on the CPU, random weights from a config."""
    torch.manual_seed(0)
    if name == "bert-base":
        from transformers import BertConfig, BertModel

        return BertModel(BertConfig()).eval(), (torch.randint(0, 30522, (batch, seq)),)
    if name == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        return GPT2LMHeadModel(GPT2Config()).eval(), (torch.randint(0, 50257, (batch, seq)),)
    if name == "resnet50":
        try:
            import torchvision

            model = torchvision.models.resnet50(weights=None)
        except ImportError:
            model = ResNet50()
        return model.eval(), (torch.randn(batch, 3, image, image),)
    raise ValueError(name)


# -- measuring ----------------------------------------------------------------------------------
def measure(model, inputs, device: torch.device, iters: int) -> tuple[dict[str, float], float]:
    """Seconds per forward by family (self device time of each aten op), and wall time."""
    from torch.profiler import ProfilerActivity, profile

    from genie.scheduler import op_family

    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with torch.no_grad():
        for _ in range(3):
            model(*inputs)
        sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            model(*inputs)
        sync()
        wall = (time.perf_counter() - t0) / iters
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            for _ in range(iters):
                model(*inputs)
            sync()
    fams: dict[str, float] = {}
    for evt in prof.key_averages():
        if not evt.key.startswith("aten::"):
            continue
        if cuda:
            us = getattr(evt, "self_device_time_total", None)
            if us is None:
                us = evt.self_cuda_time_total
        else:
            us = evt.self_cpu_time_total
        if us <= 0:
            continue
        fam = op_family(evt.key)
        fams[fam] = fams.get(fam, 0.0) + us * 1e-6 / iters
    fams.pop("view", None)
    return fams, wall


def predict(model, inputs, spec, est) -> tuple[dict[str, float], dict[str, float], dict]:
    """Predicted seconds per family, with and without launch overhead, and the graph's
    uncalibrated roofline per family (for calibration)."""
    import genie
    from genie.scheduler.cost_model import node_cost

    genie.synchronize()
    remote = copy.deepcopy(model).to("remote_accelerator:0")
    with torch.no_grad():
        out = remote(*[x.to("remote_accelerator:0") for x in inputs])
    graph = genie.get_graph()
    with_launch: dict[str, float] = {}
    kernels: dict[str, float] = {}
    roofline: dict[str, float] = {}
    for n in graph.nodes:
        c = node_cost(n)
        t = est.time(c, spec)
        if t <= 0:
            continue
        with_launch[c.family] = with_launch.get(c.family, 0.0) + t
        kernels[c.family] = kernels.get(c.family, 0.0) + max(
            0.0, t - spec.launch_overhead_s * est.calibration_factor(spec, c.family)
        )
        roofline[c.family] = roofline.get(c.family, 0.0) + est.roofline(c, spec)
    del out, remote
    genie.synchronize()
    return with_launch, kernels, {"roofline": roofline, "nodes": len(graph.nodes)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--dtypes", default="fp32,fp16")
    ap.add_argument("--models", default="bert-base,gpt2,resnet50")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--image", type=int, default=224)
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_costmodel_gpu: skipped, no CUDA device on this machine")
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(
            json.dumps(
                {"benchmark": "costmodel_gpu", "skipped": True, "reason": "no CUDA device"},
                indent=2,
            )
        )
        return 0

    import genie  # noqa: F401  (registers remote_accelerator)
    from genie.scheduler import DeviceSpec, GraphCostEstimator

    spec = DeviceSpec.detect(device) if device.type == "cuda" else DeviceSpec.cpu()
    names = [m for m in args.models.split(",") if m]
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    rows = []
    meas_all: dict[tuple[str, str], dict[str, float]] = {}
    roof_all: dict[tuple[str, str], dict[str, float]] = {}
    for dname in [d for d in args.dtypes.split(",") if d]:
        dtype = dtypes[dname]
        if device.type == "cpu" and dtype == torch.float16:
            continue
        for name in names:
            model, inputs = build(name, args.batch, args.seq, args.image)
            model = model.to(dtype)
            inputs = tuple(x.to(dtype) if x.is_floating_point() else x for x in inputs)
            est = GraphCostEstimator()
            pred, pred_kernels, info = predict(model, inputs, spec, est)
            dev_model = copy.deepcopy(model).to(device)
            dev_inputs = tuple(x.to(device) for x in inputs)
            meas, wall = measure(dev_model, dev_inputs, device, args.iters)
            del dev_model
            if device.type == "cuda":
                torch.cuda.empty_cache()
            meas_all[(dname, name)] = meas
            roof_all[(dname, name)] = info["roofline"]
            for fam in sorted(set(meas) | set(pred)):
                rows.append(
                    {
                        "dtype": dname,
                        "model": name,
                        "family": fam,
                        "measured_ms": meas.get(fam, 0.0) * 1e3,
                        "predicted_ms": pred.get(fam, 0.0) * 1e3,
                        "predicted_kernels_ms": pred_kernels.get(fam, 0.0) * 1e3,
                    }
                )
            rows.append(
                {
                    "dtype": dname,
                    "model": name,
                    "family": "TOTAL (wall)",
                    "measured_ms": wall * 1e3,
                    "predicted_ms": sum(pred.values()) * 1e3,
                    "predicted_kernels_ms": sum(pred_kernels.values()) * 1e3,
                    "nodes": info["nodes"],
                }
            )
    # Cross-calibration: learn factors from the other models (same dtype), apply to this one.
    for r in rows:
        if r["family"].startswith("TOTAL"):
            continue
        est = GraphCostEstimator(smoothing=1.0)
        pred_sum = meas_sum = 0.0
        for (dname, name), meas in meas_all.items():
            if dname == r["dtype"] and name != r["model"]:
                pred_sum += roof_all[(dname, name)].get(r["family"], 0.0)
                meas_sum += meas.get(r["family"], 0.0)
        if pred_sum > 0 and meas_sum > 0:
            est.observe(r["family"], spec, pred_sum, meas_sum)
        factor = est.calibration_factor(spec, r["family"])
        r["cross_calibrated_ms"] = (
            roof_all[(r["dtype"], r["model"])].get(r["family"], 0.0) * factor * 1e3
        )
    header = (
        f"{'dtype':<6}{'model':<11}{'family':<15}{'measured':>10}{'predicted':>11}{'kernels':>9}"
        f"{'x-calib':>9}{'ratio':>7}"
    )
    print(
        f"device {device} ({spec.name}): ms per forward, batch {args.batch}, seq {args.seq}, "
        f"image {args.image}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        ratio = r["predicted_kernels_ms"] / r["measured_ms"] if r["measured_ms"] else float("nan")
        r["kernel_ratio"] = ratio
        xc = r.get("cross_calibrated_ms")
        print(
            f"{r['dtype']:<6}{r['model']:<11}{r['family']:<15}{r['measured_ms']:>10.3f}"
            f"{r['predicted_ms']:>11.3f}{r['predicted_kernels_ms']:>9.3f}"
            f"{(f'{xc:.3f}' if xc is not None else '-'):>9}{ratio:>7.2f}"
        )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(
        json.dumps(
            {
                "benchmark": "costmodel_gpu",
                "device": str(device),
                "spec": spec.to_dict(),
                "settings": vars(args),
                "columns": {
                    "measured_ms": "sum of self kernel time per family, per forward",
                    "predicted_ms": "GraphCostEstimator.time summed per family (roofline + launch)",
                    "predicted_kernels_ms": "the same without launch overhead",
                    "cross_calibrated_ms": "roofline x factor learnt from the other models",
                    "kernel_ratio": "predicted_kernels / measured",
                },
                "rows": rows,
                "machine": {
                    "python": platform.python_version(),
                    "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                    "cpus": os.cpu_count(),
                },
            },
            indent=2,
            default=float,
        )
    )
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
