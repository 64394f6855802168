"""Running a checked program on a server's device: the binding check, the Python steps,
the C++ runner, and how results are bound (Note: [Binding a result on a server])."""

from __future__ import annotations

import copy
import logging
import operator
from typing import Any

import torch

from genie import _C
from genie.envflags import env_flag
from genie.errors import ExecutionError, GenieError, ProtocolError, RemoteError
from genie.graph.ir import TensorMeta
from genie.runtime import protocol as P
from genie.runtime.program.decode import REMOTE_DEVICE, Program, Step
from genie.runtime.program.encode import KIND_CODES
from genie.runtime.replay import Environment, byte_view, result_mismatch, run_node

__all__ = ["bind_result", "check_binding", "execute", "native_runner", "run_step"]

logger = logging.getLogger(__name__)

_RNG_STATE_BYTES = torch.get_rng_state().numel()


def check_binding(
    program: Program,
    binding: Any,
    rng: Any,
    env: Environment,
    incoming: dict[int, int] | None = None,
) -> dict[int, torch.Tensor]:
    """Validate a binding and the random states for `program` in `env`, where `incoming`
    (storage id -> bytes) arrive with this request; returns the states by step index."""
    incoming = incoming or {}
    binding = P.get_list(binding, "binding", program.nlocals)
    P.need(
        len(binding) == program.nlocals,
        f"binding has {len(binding)} ids for {program.nlocals} storages",
    )
    P.get_sids(binding, "binding", program.nlocals)
    P.need(len(set(binding)) == len(binding), "a storage id is bound twice")
    if not _inputs_fit(program, binding, env, incoming):
        _check_inputs(program, binding, env, incoming)
    states: dict[int, torch.Tensor] = {}
    for entry in P.get_list(rng or [], "rng", len(program.random_steps)):
        P.need(type(entry) is list and len(entry) == 2, "an rng entry must be [step, state]")
        k = P.get_int(entry[0], 0, len(program.steps) - 1, "rng step")
        P.need(program.steps[k].random, "an rng state for a step that draws no random numbers")
        b = P.get_bytes(entry[1], "rng state", _RNG_STATE_BYTES)
        P.need(len(b) == _RNG_STATE_BYTES, "an rng state has the wrong size")
        states[k] = torch.frombuffer(bytearray(b), dtype=torch.uint8)
    P.need(len(states) == len(program.random_steps), "every random step needs its generator state")
    return states


def _inputs_fit(
    program: Program, binding: list[int], env: Environment, incoming: dict[int, int]
) -> bool:
    """The common case of ``_check_inputs`` in C-level passes: every input's storage is
    resident and holds what the program reads, and a storage arriving with the request will.
    False means "not shown": ``_check_inputs`` then finds the input at fault (or passes)."""
    getter, needs = program.meta.get("input_check") or _input_check(program)
    sids = getter(binding)
    sts = list(map(env.storages.get, sids))
    if not all(sts):  # not resident (None) or empty: the slow path says which
        return False
    if not all(map(operator.ge, map(torch.UntypedStorage.nbytes, sts), needs)):
        return False
    # An arriving storage is read at its new size (binding.index: its local; ids are unique).
    extent = program.extent
    return all(
        size >= extent.get(binding.index(sid), 0)
        for sid, size in incoming.items()
        if sid in binding
    )


def _input_check(program: Program) -> tuple:
    """What ``_inputs_fit`` reads of `program`, made once: a function from a binding to the
    inputs' storage ids, and the bytes each must hold."""
    inputs = program.inputs
    if len(inputs) > 1:
        getter = operator.itemgetter(*inputs)
    else:
        getter = lambda b: [b[k] for k in inputs]  # noqa: E731 - itemgetter of one is no tuple
    check = (getter, [program.extent.get(local, 0) for local in inputs])
    program.meta["input_check"] = check
    return check


def _check_inputs(
    program: Program, binding: list[int], env: Environment, incoming: dict[int, int]
) -> None:
    """Each input's storage resident (or arriving with the request) and large enough."""
    for local in program.inputs:
        sid = binding[local]
        st = env.storages.get(sid)
        size = incoming[sid] if sid in incoming else (st.nbytes() if st is not None else -1)
        if size < 0:
            raise RemoteError(
                f"genie: storage {sid} is not resident in this session (never uploaded or "
                "produced here, or already released)"
            )
        need = program.extent.get(local, 0)
        if size < need:
            raise ProtocolError(
                f"genie: invalid request: storage {sid} holds {size} bytes, the program reads {need}"
            )


# Note: [Compiled steps]
# replay.run_node is general (host fallback, random ops, any argument layout) and costs about
# 25 us of Python per node; on a GPU that is the whole cost of a small op. A decoded step also
# carries a plan: for each schema argument, whether it is passed by keyword and where its value
# comes from, worked out once per program. run_step follows the plan (a few us per node) and
# hands anything unusual (random ops, an op with no kernel on this device) to run_node, so


def run_step(step: Step, frame: Environment, *, bind: bool = True) -> list[Any]:
    """One decoded step against `frame` (Note: [Compiled steps]); returns the op's results."""
    storages = frame.storages
    grows = [(w, storages[w].nbytes()) for w in step.writes if w in storages]
    results = _call_step(step, frame)
    flat: list[Any] = []
    for r in results:
        if r is None or isinstance(r, torch.Tensor):
            flat.append(r)
        elif isinstance(r, (list, tuple)):
            flat.extend(x for x in r if x is None or isinstance(x, torch.Tensor))
    # Note: [No uninitialized bytes]
    if step.op in _UNINITIALIZED:
        for t in flat:
            if t is not None:
                byte_view(t.untyped_storage()).zero_()
    for w, before in grows:
        st = storages.get(w)
        if st is not None and st.nbytes() > before:
            byte_view(st)[before:].zero_()
    if bind:
        for k, (out, alias) in enumerate(zip(step.outputs, step.output_alias, strict=False)):
            if alias != -1:
                continue
            value = flat[k] if k < len(flat) else None
            if result_mismatch(step, k, value, frame.device, len(flat)):
                continue  # never bound (Note: [Binding a result on a server])
            bind_result(frame, out, value)
    return results


def _call_step(step: Step, frame: Environment) -> list[Any]:
    """What `step`'s op returns on `frame`, nothing bound."""
    if step.rng_state is not None:
        return run_node(step, frame, bind=False)
    storages = frame.storages
    metas = step.inputs
    views: dict[int, torch.Tensor] = {}

    def view(i: int):
        if i < 0:
            return None
        t = views.get(i)
        if t is None:
            m = metas[i]
            st = storages.get(m.storage)
            if st is None:
                frame.view(m)  # raises the executor's "not resident" error
            # set_ refuses a view past the storage's end.
            t = views[i] = torch.empty(0, dtype=m.dtype, device=st.device).set_(
                st, m.offset, m.shape, m.stride
            )
        return t

    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for name, kind, v in step.plan:
        if kind == 0:
            value = frame.device if v is REMOTE_DEVICE else v
        elif kind == 1:
            value = view(v)
        else:
            value = [view(i) for i in v]
        if name is None:
            args.append(value)
        else:
            kwargs[name] = value
    try:
        result = step.target(*args, **kwargs)
    except NotImplementedError:
        return run_node(step, frame, bind=False)  # no kernel here: replay's host fallback
    except Exception as e:  # noqa: BLE001 - the message replay.run_node would give
        shapes = ", ".join(f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}" for t in metas)
        raise ExecutionError(
            f"genie: {step.op} failed on {frame.device} for inputs [{shapes}]: {e}"
        ) from e
    # One result per schema return: an op that returns one Tensor[] gives one list.
    if len(step.target._schema.returns) == 1:
        return [result]
    return list(result) if isinstance(result, (tuple, list)) else [result]


# Note: [Binding a result on a server]
# A server binds what a kernel returned under the geometry the client declared, and later
# steps, programs and fetches address that storage by declared geometries that validation
# checked against the *declared* storage size. So the bound storage must really hold the
# declared bytes, and no byte of it may be one this session did not write:
# - a result of another dtype or shape (beyond dimensions of size 1) than declared is never
#   bound: the one check of Note: [Checked results] (executor.h; replay.result_mismatch in
#   Python) decides for every executor, this one included. A client that declares
#   f32[16384] where the kernel returns f32[] does not get a 4-byte storage that later views
#   address as 64 KiB; a step or fetch that reads it gets an error reply instead. (CPU batch
#   norm in eval mode returns empty saved statistics that its meta kernel sizes by channel:
#   nothing reads them, so honest programs are unaffected.)
# - a result whose storage is not exactly the declared size, whose layout differs, or whose
#   sizes differ only in dimensions of size 1, is copied into a zeroed storage of the
#   declared size, in the declared geometry.
# The C++ runner (csrc/capture/program_runner.cpp) follows the same rules.
def bind_result(env: Environment, meta: TensorMeta, value: torch.Tensor) -> None:
    """Make `value` the content of `meta.storage` on a server. `value` already passed
    replay.result_mismatch: its dtype is the declared one and its sizes are, up to dimensions
    of size 1."""
    st = value.untyped_storage()
    if (
        value.device == env.device
        and tuple(value.stride()) == meta.stride
        and value.storage_offset() == meta.offset
        and st.nbytes() == meta.storage_nbytes
    ):
        env.storages[meta.storage] = st
        return
    new = torch.zeros(max(meta.storage_nbytes, 1), dtype=torch.uint8, device=env.device)
    dst = torch.empty(0, dtype=meta.dtype, device=env.device)
    dst.set_(new.untyped_storage(), meta.offset, meta.shape, meta.stride).copy_(
        value.reshape(meta.shape)
    )
    env.storages[meta.storage] = new.untyped_storage()


# Note: [No uninitialized bytes]
# Storages on a server are reused memory: what a kernel allocates without writing may hold
# bytes another session uploaded and released. The ops whose results start uninitialized
# (the empty family: empty, empty_like, empty_strided, new_empty, ...) get their results
# zeroed on a server, and a step that grows a storage it writes (resize_, an out= argument
# too small) has the grown tail zeroed (the C++ runner does the same). Uploads that do not
# cover their storage are zero-filled (server/session.py).
def _uninitialized_ops() -> frozenset[str]:
    names = set()
    for name in torch._C._dispatch_get_all_op_names():  # "ns::base" or "ns::base.overload"
        ns, _, rest = name.partition("::")
        base, _, overload = rest.partition(".")
        if ns in ("aten", "prims") and base.lstrip("_").removeprefix("new_").startswith("empty"):
            names.add(f"{ns}::{base}.{overload or 'default'}")
    return frozenset(names)


_UNINITIALIZED = _uninitialized_ops()


# Note: [Running programs in C++] (csrc/capture/program_runner.h) says why; GENIE_PY_STEPS=1
# keeps every run in Python (to compare the two).
_NATIVE = not env_flag("GENIE_PY_STEPS", False)


def _native_node(step: Step):
    node = getattr(step, "native", None)
    if node is None:

        def ref(m: TensorMeta | None):
            if m is None:
                return None
            return (m.storage, m.dtype, m.shape, m.stride, m.offset, m.storage_nbytes)

        node = step.native = _C._program_node(
            step.op,
            [(KIND_CODES[kind], v) for kind, v in step.args],
            [ref(m) for m in step.inputs],
            [ref(m) for m in step.outputs],
            step.output_alias,
        )
    return node


def native_runner(program: Program, device: torch.device):
    """The C++ runner of `program` on `device` (built once), or None where the program must
    run in Python: random steps, or a value the C++ conversion does not take."""
    key = str(device)
    try:
        return program.native[key]
    except KeyError:
        pass
    runner = None
    if _NATIVE and not program.random_steps:
        try:
            runner = _C._ProgramRunner(
                key,
                [_native_node(step) for step in program.steps],
                program.nlocals,
                program.inputs,
                program.produced,
                [k for k, step in enumerate(program.steps) if step.op in _UNINITIALIZED],
            )
        except Exception as e:  # noqa: BLE001 - the Python steps run it instead
            logger.debug("genie: program %s runs in Python: %s", program.key.hex()[:12], e)
    program.native[key] = runner
    return runner


def execute(
    program: Program,
    binding: list[int],
    states: dict[int, torch.Tensor],
    env: Environment,
    *,
    keep_last: bool = False,
) -> list[Any] | None:
    """Run `program` with its storages bound to `env` by `binding` (already checked). With
    `keep_last`, the last step's results are returned unbound (run_eager)."""
    if not keep_last and not states:
        runner = native_runner(program, env.device)
        if runner is not None:
            storages = env.storages
            produced = runner.run([storages[binding[local]] for local in program.inputs])
            for local, st in zip(program.produced, produced, strict=True):
                if st is not None:
                    storages[binding[local]] = st
            return None
    frame = Environment(env.device)
    frame.storages = {local: env.storages[binding[local]] for local in program.inputs}
    results = None
    last = len(program.steps) - 1
    for k, step in enumerate(program.steps):
        if k in states:
            step = copy.copy(step)
            step.rng_state = states[k]
        try:
            if keep_last and k == last:
                results = run_step(step, frame, bind=False)
            else:
                run_step(step, frame)
        except GenieError:
            raise
        except Exception as e:  # noqa: BLE001 - binding a result the recording did not predict
            raise ExecutionError(
                f"genie: {step.op} (node {k}) failed: {type(e).__name__}: {e}"
            ) from e
    for local in program.produced:
        st = frame.storages.get(local)
        if st is not None:
            env.storages[binding[local]] = st
    return results
