"""genie against eager PyTorch over PyTorch's own OpInfo and ModuleInfo databases.

Note: [Conformance in child processes]
A user op that kills the process must fail one entry, not the run, so every entry runs in a
worker process (``python -m genie.conformance --worker``) that reads one entry per line on
stdin and answers one JSON line on stdout. When a worker dies (a signal, an abort) or overruns
its time, the entry it held is reported as a crash or a timeout and a fresh worker takes the
next one. Entries are (kind, name, variant, dtype):

- ``op``: every sample of an OpInfo op for one dtype, eager CPU against remote_accelerator on
  the embedded executor, forward only;
- ``grad``: the same op's float32 samples with inputs that require grad: the gradients of
  the inputs for a fixed random upstream gradient;
- ``module``: a ModuleInfo module's float32 inputs, forward in ``eval`` or ``train`` mode.

Both sides seed the generator the same way before each call (genie reproduces eager CPU for a
seed), and eager runs twice: a sample whose two eager results differ (uninitialised memory) is
eager's own nondeterminism and is not counted. A result passes when it equals eager bitwise
(NaNs in the same places), or, as ``close``, within the dtype's default
``torch.testing.assert_close`` tolerances.
"""

from __future__ import annotations

import json
import logging
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field

logger = logging.getLogger(__name__)

__all__ = ["Entry", "Outcome", "entries", "run"]

REMOTE = "remote_accelerator"
DTYPES = ("float32", "float16", "bfloat16", "int64", "bool", "complex64")


@dataclass(frozen=True)
class Entry:
    kind: str  # "op" | "grad" | "module"
    name: str
    variant: str  # OpInfo variant_test_name, or "eval" / "train" for modules
    dtype: str

    @property
    def label(self) -> str:
        v = f".{self.variant}" if self.variant else ""
        return f"{self.kind}:{self.name}{v}:{self.dtype}"


@dataclass
class Outcome:
    entry: Entry
    status: str  # "pass" | "fail" | "crash" | "timeout" | "skip"
    samples: int = 0  # samples compared
    bitwise: int = 0  # of those, equal bit for bit
    reason: str = ""
    seconds: float = 0.0
    details: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        d = asdict(self)
        d["entry"] = asdict(self.entry)
        return d


# -- the parent: which entries exist, and running them in workers ------------------------------


def entries(kinds: Iterable[str] = ("op", "module", "grad")) -> list[Entry]:
    """Every entry of the databases, in a fixed order (a stride of it is a fixed sample)."""
    import torch

    out: list[Entry] = []
    kinds = set(kinds)
    if kinds & {"op", "grad"}:
        from torch.testing._internal.common_methods_invocations import op_db

        for op in op_db:
            supported = op.supported_dtypes("cpu")
            if "op" in kinds:
                for d in DTYPES:
                    if getattr(torch, d) in supported:
                        out.append(Entry("op", op.name, op.variant_test_name, d))
            if "grad" in kinds and op.supports_autograd and torch.float32 in supported:
                out.append(Entry("grad", op.name, op.variant_test_name, "float32"))
    if "module" in kinds:
        from torch.testing._internal.common_modules import module_db

        for m in module_db:
            if torch.float32 in m.dtypes:
                for mode in ("eval", "train"):
                    out.append(Entry("module", m.name, mode, "float32"))
    return out


class _Worker:
    def __init__(self):
        env = dict(os.environ, OMP_NUM_THREADS="1", GENIE_LOCAL_DEVICE="cpu")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "genie.conformance", "--worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        self._buf = b""

    def ask(self, entry: Entry, timeout: float) -> Outcome:
        start = time.monotonic()
        try:
            self.proc.stdin.write((json.dumps(asdict(entry)) + "\n").encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            return self._died(entry, start)
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = timeout - (time.monotonic() - start)
            if left <= 0:
                self.kill()
                return Outcome(
                    entry,
                    "timeout",
                    reason=f"no answer within {timeout:.0f} s",
                    seconds=time.monotonic() - start,
                )
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return self._died(entry, start)
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        d = json.loads(line)
        d["entry"] = entry
        return Outcome(**d)

    def _died(self, entry: Entry, start: float) -> Outcome:
        rc = self.proc.wait()
        how = f"signal {-rc}" if rc < 0 else f"exit status {rc}"
        return Outcome(
            entry,
            "crash",
            reason=f"the worker process died ({how})",
            seconds=time.monotonic() - start,
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        if self.alive():
            self.proc.stdin.close()
            self.proc.wait()


def run(
    todo: list[Entry], *, jobs: int = 2, timeout: float = 300.0, progress=None
) -> list[Outcome]:
    """Run entries in `jobs` worker processes (Note: [Conformance in child processes])."""
    results: dict[int, Outcome] = {}
    queue = list(enumerate(todo))
    # Workers each take every jobs-th entry; a dead one is replaced for its next entry.
    import threading

    lock = threading.Lock()

    def drive() -> None:
        worker = _Worker()
        while True:
            with lock:
                if not queue:
                    break
                i, entry = queue.pop(0)
            if not worker.alive():
                worker = _Worker()
            outcome = worker.ask(entry, timeout)
            with lock:
                results[i] = outcome
                if progress is not None:
                    progress(outcome)
        worker.close()

    threads = [threading.Thread(target=drive) for _ in range(max(1, jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [results[i] for i in range(len(todo))]


# -- the worker: one entry at a time -------------------------------------------------------------


def _to(x, device: str, requires_grad: bool = False):
    import torch

    if isinstance(x, torch.Tensor):
        # A private copy on either side: in-place ops must not change the sample.
        t = (
            x.detach().clone()
            if device == "cpu" and x.device.type == "cpu"
            else x.detach().to(device)
        )
        return t.requires_grad_(x.requires_grad) if requires_grad else t
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return type(x)(*(_to(v, device, requires_grad) for v in x))
    if isinstance(x, (list, tuple)):
        return type(x)(_to(v, device, requires_grad) for v in x)
    if isinstance(x, dict):
        return {k: _to(v, device, requires_grad) for k, v in x.items()}
    return x


def _cpu(x):
    import torch

    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if isinstance(x, list):
        return [_cpu(v) for v in x]
    if isinstance(x, tuple):
        return tuple(_cpu(v) for v in x)
    return x


def _compare(a, b) -> str:
    """ "bitwise", "close", or why not."""
    import torch

    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor):
            return f"eager gave a tensor, genie {type(b).__name__}"
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"eager {a.dtype}{list(a.shape)}, genie {b.dtype}{list(b.shape)}"
        a, b = a.resolve_conj().resolve_neg(), b.resolve_conj().resolve_neg()
        if a.is_complex() or a.is_floating_point():
            x = torch.view_as_real(a) if a.is_complex() else a
            y = torch.view_as_real(b) if b.is_complex() else b
            if torch.equal(x.isnan(), y.isnan()) and torch.equal(
                x.nan_to_num(0.0), y.nan_to_num(0.0)
            ):
                return "bitwise"
        elif torch.equal(a, b):
            return "bitwise"
        try:
            torch.testing.assert_close(b, a, equal_nan=True)
            return "close"
        except AssertionError as e:
            lines = [s for s in str(e).splitlines() if "difference" in s]
            return "values differ" + (f" ({lines[0].strip()})" if lines else "")
    if isinstance(a, (list, tuple)):
        if not isinstance(b, (list, tuple)) or len(a) != len(b):
            return "a different number of results"
        worst = "bitwise"
        for x, y in zip(a, b, strict=True):
            r = _compare(x, y)
            if r not in ("bitwise", "close"):
                return r
            if r == "close":
                worst = "close"
        return worst
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return "bitwise"
    return "bitwise" if a == b else f"eager {a!r}, genie {b!r}"


# PyTorch's words for an argument that must be a host tensor (tensor_split's indices...).
_REFUSED_AS_ON_CUDA = f"to be on cpu, but it's on {REMOTE}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


def _seeded(fn, args=(), kwargs=None, seed: int = 1234):
    """fn(*args, **kwargs) from a fixed seed: eager and genie draw the same random numbers."""
    import torch

    torch.manual_seed(seed)
    return fn(*args, **(kwargs or {}))


class _Verdicts:
    def __init__(self, entry: Entry):
        self.outcome = Outcome(entry, "pass")

    def add(self, verdict: str) -> None:
        o = self.outcome
        if verdict in ("bitwise", "close"):
            o.samples += 1
            o.bitwise += verdict == "bitwise"
            return
        o.samples += 1
        o.details.append(verdict)
        if o.status == "pass":
            o.status, o.reason = "fail", verdict

    def error(self, e: BaseException) -> None:
        if _REFUSED_AS_ON_CUDA in str(e):
            # An argument eager wants on the host was moved to the device by this check;
            # eager CUDA refuses the same call with the same words: not a sample to compare.
            self.outcome.details.append("refused as eager CUDA refuses it: " + _first_line(e))
        else:
            self.add(_first_line(e))

    def done(self) -> Outcome:
        o = self.outcome
        if o.samples == 0 and o.status == "pass":
            o.status, o.reason = (
                "skip",
                o.reason or "eager CPU runs no sample of it, or none deterministically",
            )
        o.details = o.details[:5]
        return o


def _op(entry: Entry):
    from torch.testing._internal.common_methods_invocations import op_db

    for op in op_db:
        if op.name == entry.name and op.variant_test_name == entry.variant:
            return op
    raise LookupError(entry.label)


def _check_op(entry: Entry) -> Outcome:
    import torch

    if "empty" in entry.name:
        # Uninitialised memory: eager's own values are not reproducible, and a second eager
        # run in the same process often reuses the same block, so comparing cannot tell.
        return Outcome(entry, "skip", reason="uninitialised memory (empty*): nothing to compare")
    op = _op(entry)
    dtype = getattr(torch, entry.dtype)
    v = _Verdicts(entry)
    for sample in op.sample_inputs("cpu", dtype, requires_grad=False):
        args = (sample.input, *sample.args)
        remote = _to((args, sample.kwargs), REMOTE)
        try:
            ref = _seeded(op, _to(args, "cpu"), sample.kwargs)
            again = _seeded(op, _to(args, "cpu"), sample.kwargs)
        except Exception:  # noqa: BLE001 - eager refuses this sample: nothing to match
            continue
        if _compare(ref, again) != "bitwise":
            continue  # eager's own nondeterminism
        try:
            got = _cpu(_seeded(op, *remote))
        except Exception as e:  # noqa: BLE001 - a failure, with its reason
            v.error(e)
            continue
        v.add(_compare(ref, got))
    return v.done()


def _tensors(x) -> list:
    import torch

    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for y in x for t in _tensors(y)]
    if isinstance(x, dict):
        return [t for y in x.values() for t in _tensors(y)]
    return []


def _grads(fn, args, kwargs, device: str):
    import torch

    a, k = _to((args, kwargs), device, requires_grad=True)
    out = _seeded(fn, a, k)
    outs = [
        t for t in _tensors(out) if t.requires_grad and (t.is_floating_point() or t.is_complex())
    ]
    if not outs:
        return None
    gen = torch.Generator().manual_seed(7)
    ups = [torch.randn(t.shape, dtype=t.dtype, generator=gen).to(t.device) for t in outs]
    leaves = [t for t in _tensors((a, k)) if t.requires_grad]
    grads = torch.autograd.grad(outs, leaves, ups, allow_unused=True)
    return [None if g is None else g.cpu() for g in grads]


def _check_grad(entry: Entry) -> Outcome:
    import torch

    op = _op(entry)
    v = _Verdicts(entry)
    for sample in op.sample_inputs("cpu", torch.float32, requires_grad=True):
        args = (sample.input, *sample.args)
        try:
            ref = _grads(op, args, sample.kwargs, "cpu")
            again = _grads(op, args, sample.kwargs, "cpu")
        except Exception:  # noqa: BLE001 - eager cannot differentiate this sample
            continue
        if ref is None or _compare(ref, again) != "bitwise":
            continue
        try:
            got = _grads(op, args, sample.kwargs, REMOTE)
        except Exception as e:  # noqa: BLE001
            v.error(e)
            continue
        v.add(_compare(ref, got))
    return v.done()


def _check_module(entry: Entry) -> Outcome:
    import copy

    import torch
    from torch.testing._internal.common_modules import module_db

    info = next(m for m in module_db if m.name == entry.name)
    training = entry.variant == "train"
    v = _Verdicts(entry)
    inputs = info.module_inputs_func(
        info, device="cpu", dtype=torch.float32, requires_grad=False, training=training
    )
    for mi in inputs:
        if mi.forward_input is None:
            continue
        c, f = mi.constructor_input, mi.forward_input
        try:
            m = _seeded(info.module_cls, c.args, c.kwargs)
            m.train(training)
            rm = copy.deepcopy(m)
            ref = _seeded(m, _to(f.args, "cpu"), _to(f.kwargs, "cpu"))
            again = _seeded(copy.deepcopy(rm), _to(f.args, "cpu"), _to(f.kwargs, "cpu"))
        except Exception:  # noqa: BLE001 - eager refuses this input
            continue
        if _compare(ref, again) != "bitwise":
            continue
        try:
            rm = rm.to(REMOTE)
            got = _cpu(_seeded(rm, _to(f.args, REMOTE), _to(f.kwargs, REMOTE)))
        except Exception as e:  # noqa: BLE001
            v.error(e)
            continue
        v.add(_compare(ref, got))
    return v.done()


_CHECKS = {"op": _check_op, "grad": _check_grad, "module": _check_module}


def _serve(lines: Iterator[str]) -> None:
    import warnings

    import torch

    import genie  # noqa: F401 - registers remote_accelerator

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    # Answers go to the original stdout alone; anything a kernel prints goes to stderr.
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    for line in lines:
        entry = Entry(**json.loads(line))
        start = time.monotonic()
        try:
            outcome = _CHECKS[entry.kind](entry)
        except Exception as e:  # noqa: BLE001 - the database itself failed for this entry
            outcome = Outcome(entry, "skip", reason=f"no samples: {_first_line(e)}")
        outcome.seconds = time.monotonic() - start
        d = outcome.to_json()
        del d["entry"]
        answers.write(json.dumps(d) + "\n")
        answers.flush()


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    _serve(iter(sys.stdin.readline, ""))
