"""Replay of recorded nodes in Python: the engine under every Python executor.

The compiled local executor (csrc/capture/executor.cpp) does the same in C++ for the embedded
default; this one serves executors written in Python (the remote server, multi-device plans).
Tensors are addressed as views of storages (Note: [Storage identity]), so an environment
maps storage id -> ``torch.UntypedStorage`` on the executor's device.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from genie.errors import ExecutionError
from genie.graph.ir import Node, TensorMeta

logger = logging.getLogger(__name__)

__all__ = ["Environment", "byte_view", "host_bytes", "result_mismatch", "run_node", "run_nodes"]

_REMOTE = "remote_accelerator"


def byte_view(st: torch.UntypedStorage) -> torch.Tensor:
    """All of a storage's bytes as a flat uint8 tensor on its own device."""
    return torch.empty(0, dtype=torch.uint8, device=st.device).set_(st)


def host_bytes(values: list[torch.Tensor]) -> list[memoryview]:
    """The bytes of each dense tensor of `values`, in host memory, in order: CPU tensors as they
    are, device tensors copied into one pinned buffer with one wait for all the copies."""
    flats = [
        # Dense, but a size-1 dimension may keep any stride: address the elements directly.
        v.as_strided((v.numel(),), (1,)).view(torch.uint8)
        for v in values
        if v.numel()
    ]
    on_device = [f for f in flats if f.device.type != "cpu"]
    if on_device:
        total = sum(f.numel() for f in on_device)
        pinned = on_device[0].device.type == "cuda"
        buf = torch.empty(total, dtype=torch.uint8, pin_memory=pinned)
        at, placed = 0, {}
        for f in on_device:
            placed[id(f)] = dst = buf[at : at + f.numel()]
            dst.copy_(f, non_blocking=pinned)
            at += f.numel()
        if pinned:
            torch.cuda.current_stream(on_device[0].device).synchronize()
        flats = [placed.get(id(f), f) for f in flats]
    return [memoryview(f.numpy()) for f in flats]


class Environment:
    """Resident storages of one executor on one device."""

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.storages: dict[int, torch.UntypedStorage] = {}
        # Outputs whose results could not be bound (Note: [Checked results] in
        # csrc/capture/executor.h): why, the kernel's own result, the recorded output.
        self.broken: dict[int, tuple[str, torch.Tensor | None, TensorMeta]] = {}

    def __contains__(self, storage: int) -> bool:
        return storage in self.storages

    def view(self, meta: TensorMeta) -> torch.Tensor:
        try:
            st = self.storages[meta.storage]
        except KeyError:
            if meta.storage in self.broken:
                raise ExecutionError(self.broken[meta.storage][0]) from None
            raise ExecutionError(
                f"genie: storage {meta.storage} is not resident on {self.device} "
                "(it was never produced, or it was released)"
            ) from None
        needed = _view_nbytes(meta)
        if needed > st.nbytes():
            raise ExecutionError(
                f"genie: a {_geometry(meta.dtype, meta.shape)} view needs {needed} bytes of storage "
                f"{meta.storage}, which holds {st.nbytes()} (Note: [Checked results])"
            )
        t = torch.empty(0, dtype=meta.dtype, device=st.device)
        return t.set_(st, meta.offset, meta.shape, meta.stride)

    def put_constant(self, storage: int, tensor: torch.Tensor) -> None:
        """Make a host tensor resident, byte for byte, so its recorded geometry stays valid."""
        st = tensor.untyped_storage()
        if st.device != self.device:
            st = byte_view(st).to(self.device).untyped_storage()
        self.storages[storage] = st

    def bind(self, meta: TensorMeta, value: torch.Tensor) -> None:
        """Make `value` the content of `meta.storage`, keeping the recorded geometry."""
        if value._is_zerotensor():
            # No memory behind it (see storage_for in executor.cpp): bind real zeros.
            value = torch.zeros(value.shape, dtype=value.dtype, device=self.device)
        if value.is_conj() or value.is_neg():
            # The storage holds the values without the bit (see storage_for in executor.cpp).
            value = value.resolve_conj().resolve_neg()
        if (
            value.device == self.device
            and tuple(value.shape) == meta.shape
            and tuple(value.stride()) == meta.stride
            and value.storage_offset() == meta.offset
            and value.dtype == meta.dtype
        ):
            self.storages[meta.storage] = value.untyped_storage()
            return
        if tuple(value.shape) != meta.shape and _same_but_unit_dims(tuple(value.shape), meta.shape):
            value = value.reshape(meta.shape)
        if tuple(value.shape) != meta.shape or value.dtype != meta.dtype:
            raise ExecutionError(
                f"genie: a {_geometry(value.dtype, value.shape)} result cannot stand for a "
                f"recorded {_geometry(meta.dtype, meta.shape)} (Note: [Checked results])"
            )
        nbytes = max(meta.storage_nbytes, 1)
        st = torch.empty(nbytes, dtype=torch.uint8, device=self.device).untyped_storage()
        dst = torch.empty(0, dtype=meta.dtype, device=self.device).set_(
            st, meta.offset, meta.shape, meta.stride
        )
        dst.copy_(value)
        self.storages[meta.storage] = st

    def input_view(self, meta: TensorMeta) -> torch.Tensor:
        """What an op reads: as view(), except that an op reading a whole disagreeing output,
        as recorded, gets the kernel's own result (Note: [Checked results])."""
        if self.broken and meta.storage in self.broken:
            _, value, recorded = self.broken[meta.storage]
            same = (meta.dtype, meta.shape, meta.stride, meta.offset) == (
                recorded.dtype,
                recorded.shape,
                recorded.stride,
                recorded.offset,
            )
            if value is not None and same:
                return value
        return self.view(meta)

    def mark_broken(self, out: TensorMeta, why: str, value: torch.Tensor | None) -> None:
        self.storages.pop(out.storage, None)
        self.broken[out.storage] = (why, value, out)

    def release(self, ids) -> None:
        pop = self.storages.pop
        for i in ids:
            pop(i, None)
        if self.broken:
            for i in ids:
                self.broken.pop(i, None)

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.storages.values())


def _view_nbytes(meta: TensorMeta) -> int:
    if any(n == 0 for n in meta.shape):
        return 0
    last = meta.offset + sum((n - 1) * st for n, st in zip(meta.shape, meta.stride, strict=True))
    return (last + 1) * meta.dtype.itemsize


_SHORT = {
    torch.float32: "f32",
    torch.float64: "f64",
    torch.float16: "f16",
    torch.bfloat16: "bf16",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.bool: "bool",
}


def _geometry(dtype: torch.dtype, shape) -> str:
    """As the compiled core writes a geometry in its errors: f32[2, 3]."""
    return f"{_SHORT.get(dtype, str(dtype).removeprefix('torch.'))}{list(shape)}"


def _same_but_unit_dims(a: tuple, b: tuple) -> bool:
    """The same elements in the same order (see same_but_unit_dims in executor.cpp)."""
    return a == b or [n for n in a if n != 1] == [n for n in b if n != 1]


def result_mismatch(node: Node, k: int, value: torch.Tensor | None, device, got: int) -> str:
    """Why a kernel's k-th tensor result cannot stand for the recorded output k ("" if it can)."""
    out = node.outputs[k]
    head = f"genie: {node.op} on {device} returned "
    tail = (
        f" for its output {k}, where capture recorded {_geometry(out.dtype, out.shape)} "
        "(its meta kernel and this kernel disagree); that output cannot be read"
    )
    if got != len(node.outputs):
        return f"{head}{got} tensors where capture recorded {len(node.outputs)}; its results cannot be read"
    if value is None:
        return head + "no tensor" + tail
    if value.dtype != out.dtype or not _same_but_unit_dims(tuple(value.shape), out.shape):
        return f"{head}{_geometry(value.dtype, value.shape)}{tail}"
    return ""


def _swap_device(v: Any, device: torch.device) -> Any:
    if isinstance(v, torch.device) and v.type == _REMOTE:
        return device
    if isinstance(v, torch.Generator):
        return None
    return v


def _build_args(node: Node, env: Environment, device: torch.device, host: bool):
    cache: dict[int, torch.Tensor] = {}
    real: dict[int, torch.Tensor] = {}

    def tensor(i: int):
        if i < 0:
            return None
        if i not in cache:
            real[i] = env.input_view(node.inputs[i])
            cache[i] = real[i].cpu() if host else real[i]
        return cache[i]

    args = []
    for kind, v in node.args:
        if kind == "value":
            args.append(_swap_device(v, device))
        elif kind == "tensor":
            args.append(tensor(v))
        else:
            args.append([tensor(i) for i in v])
    return args, cache, real


def _call(node: Node, args: list, rng_state: torch.Tensor | None):
    op = node.target
    schema_args = op._schema.arguments
    gen: torch.Generator | None = None
    if rng_state is not None:
        gen = torch.Generator()
        gen.set_state(rng_state)
    positional, kwargs = [], {}
    has_slot = False
    for a, v in zip(schema_args, args, strict=False):
        if gen is not None and "Generator" in str(a.type):
            v, has_slot = gen, True
        if a.kwarg_only:
            kwargs[a.name] = v
        else:
            positional.append(v)
    if gen is None or has_slot:
        return op(*positional, **kwargs)
    # The op draws from the CPU default generator (native_dropout): lend it the state.
    saved = torch.get_rng_state()
    torch.set_rng_state(rng_state)
    try:
        return op(*positional, **kwargs)
    finally:
        torch.set_rng_state(saved)


def _call_on(node: Node, env: Environment, rng_state, host: bool):
    device = torch.device("cpu") if host else env.device
    args, used, real = _build_args(node, env, device, host)
    result = _call(node, args, rng_state)
    if host:
        for i, t in used.items():
            if node.inputs[i].storage in node.writes:
                real[i].copy_(t)
    return result


def run_node(node: Node, env: Environment, *, bind: bool = True):
    """Run one node against `env`; binds fresh outputs unless bind=False. Returns the results."""
    rng_state = node.rng_state
    host = rng_state is not None and env.device.type != "cpu"
    try:
        try:
            result = _call_on(node, env, rng_state, host)
        except NotImplementedError:
            if host or env.device.type == "cpu":
                raise
            # See Note: [Host fallback] in csrc/capture/executor.cpp.
            logger.warning(
                "genie: %s has no kernel for %s; running it on the host CPU", node.op, env.device
            )
            host = True
            result = _call_on(node, env, rng_state, host)
    except Exception as e:  # noqa: BLE001 - re-raised with the op and shapes named
        device = "cpu" if host else env.device
        shapes = ", ".join(
            f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}" for t in node.inputs
        )
        raise ExecutionError(
            f"genie: {node.op} failed on {device} for inputs [{shapes}]: {e}"
        ) from e
    results = list(result) if isinstance(result, (tuple, list)) else [result]
    if bind:
        # Tensor returns, flattened in order; None stands for an undefined tensor.
        flat: list[torch.Tensor | None] = []
        for r in results:
            if r is None or isinstance(r, torch.Tensor):
                flat.append(r)
            elif isinstance(r, (list, tuple)):
                flat.extend(x for x in r if x is None or isinstance(x, torch.Tensor))
        # Note: [Checked results] in csrc/capture/executor.h.
        for k, (out, alias) in enumerate(zip(node.outputs, node.output_alias, strict=True)):
            if alias != -1:
                continue
            value = flat[k] if k < len(flat) else None
            why = result_mismatch(node, k, value, env.device, len(flat))
            if why:
                env.mark_broken(out, why, value if len(flat) == len(node.outputs) else None)
            else:
                env.bind(out, value)
    return results


def run_nodes(nodes: list[Node], env: Environment) -> None:
    for n in nodes:
        run_node(n, env)
