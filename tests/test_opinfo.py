"""A sample of PyTorch's OpInfo database run on remote_accelerator and compared with eager CPU.

Each op's first float32 sample runs eagerly on the CPU and again captured on the remote device
(flushed to the embedded executor); results must match exactly (NaNs in the same places).
The pass rate is printed; the test fails if it drops below the floor below.
"""

from __future__ import annotations

import pytest
import torch

from fakes import REMOTE, to_remote

PASS_RATE_FLOOR = 0.90
# Uninitialised memory or randomness that eager CPU itself does not reproduce run to run.
SKIP_WORDS = ("empty", "rand", "normal", "bernoulli", "dropout", "multinomial", "uniform",
              "exponential", "cauchy", "geometric", "log_normal", "poisson", "randint", "randn")


def _to_cpu(x):
    if isinstance(x, torch.Tensor):
        return x.cpu() if x.device.type == "remote_accelerator" else x
    if isinstance(x, (list, tuple)):
        return type(x)(_to_cpu(v) for v in x) if not hasattr(x, "_fields") else type(x)(*(_to_cpu(v) for v in x))
    return x


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor) or a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.is_complex() or a.is_floating_point():
            return bool(torch.equal(torch.nan_to_num(a, 0.0, 1.0, -1.0), torch.nan_to_num(b, 0.0, 1.0, -1.0))
                        and torch.equal(a.isnan(), b.isnan()))
        return bool(torch.equal(a, b))
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.slow
def test_opinfo_sample_pass_rate(capsys):
    from torch.testing._internal.common_methods_invocations import op_db

    ops = [op for op in op_db if not any(w in op.name for w in SKIP_WORDS)]
    tried, passed, failures = 0, 0, []
    for op in ops:
        if torch.float32 not in op.supported_dtypes("cpu"):
            continue
        try:
            sample = next(iter(op.sample_inputs("cpu", torch.float32, requires_grad=False)))
        except Exception:  # noqa: BLE001 - the database cannot produce a sample here
            continue
        try:
            ref = op(sample.input, *sample.args, **sample.kwargs)
        except Exception:  # noqa: BLE001 - eager itself refuses this sample
            continue
        tried += 1
        try:
            rin = to_remote(sample.input)
            rargs = to_remote(list(sample.args))
            rkw = {k: to_remote(v) for k, v in sample.kwargs.items()}
            out = _to_cpu(op(rin, *rargs, **rkw))
            if _same(ref, out):
                passed += 1
            else:
                failures.append(f"{op.name}: values differ")
        except Exception as e:  # noqa: BLE001 - counted as a failure with its reason
            failures.append(f"{op.name}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
    rate = passed / max(tried, 1)
    with capsys.disabled():
        print(f"\nOpInfo sample on {REMOTE}: {passed}/{tried} ops match eager CPU ({rate:.1%})")
        for f in failures[:25]:
            print("  FAIL", f)
    assert tried >= 300
    assert rate >= PASS_RATE_FLOOR, failures
