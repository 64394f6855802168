"""The server's side of Note: [Programs and bindings] (program/__init__.py): program bytes
from an untrusted client -> a validated Program, or ProtocolError."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from genie.errors import ProtocolError
from genie.graph.ir import Node
from genie.runtime import protocol as P
from genie.runtime.program.encode import KIND_CODES, KIND_NAMES, program_key
from genie.runtime.program.ops import check_value_arg, resolve_op, tensor_slot

__all__ = ["Program", "Step", "decode_program", "decode_raw", "decode_node", "local_bound", "bad"]


def local_bound(nodes: int) -> int:
    """The largest storage index a program of `nodes` nodes may use (a node mentions at most
    a few storages)."""
    return 8 * nodes + 8


class Step(Node):
    """A decoded node whose ``target`` was resolved once, at validation."""

    target = None  # shadows Node.target (a property) so that each step stores its own


@dataclass
class Program:
    key: bytes
    steps: list[Step]
    nlocals: int
    inputs: list[int]  # locals read before this program writes them: must be resident
    produced: list[int]  # locals this program creates or writes
    extent: dict[int, int]  # bytes an input local's storage must hold at least
    fresh_bytes: int
    random_steps: list[int]
    nbytes: int  # size of the encoded program, for the cache's accounting
    body: bytes = b""
    meta: dict[str, Any] = field(default_factory=dict)
    native: dict[str, Any] = field(default_factory=dict)  # device -> runner or None (execute)


def decode_program(body: bytes, limits: P.Limits, key: bytes | None = None) -> Program:
    """Program bytes from an untrusted client -> a validated Program. Every op, argument,
    reference and index is checked; anything else raises ProtocolError."""
    raw = P.unpack(body, limits)
    return decode_raw(raw, limits, key if key is not None else program_key(body), body)


def bad(what: str) -> None:
    raise ProtocolError(f"genie: invalid request: {what}")


def _small_ints(xs: Any, lo: int, hi: int) -> bool:
    if type(xs) is not list or len(xs) > 4096:
        return False
    for x in xs:
        if type(x) is not int or x < lo or x > hi:
            return False
    return True


def decode_node(rn: Any, k: int, limits: P.Limits, max_local: int) -> Step:
    """One node, checked on its own: op, arguments against the op's schema, references."""
    if type(rn) is not list or len(rn) != 8:
        bad(f"node {k} must be a list of 8 fields")
    op_name, args, ins, outs, alias, writes, fresh, random = rn
    op, schema = resolve_op(op_name)
    if type(ins) is not list or type(outs) is not list or len(ins) > 4096 or len(outs) > 4096:
        bad(f"node {k} ({op_name}): inputs and outputs must be lists")
    ins_d = [P.decode_ref_extent(r, limits, max_sid=max_local) for r in ins]
    outs_d = [
        None if r is None else P.decode_ref_extent(r, limits, max_sid=max_local) for r in outs
    ]
    ins_m = [d[0] for d in ins_d]
    outs_m = [None if d is None else d[0] for d in outs_d]
    nin = len(ins_m)
    if (
        not _small_ints(alias, -2, nin - 1)
        or len(alias) != len(outs_m)
        or any((a == -2) != (m is None) for a, m in zip(alias, outs_m, strict=True))
    ):
        bad(
            f"node {k} ({op_name}): output_alias must name an input, -1 (fresh) or -2 "
            "(undefined, with a None output) per output"
        )
    if not _small_ints(writes, 0, max_local) or not _small_ints(fresh, 0, max_local):
        bad(f"node {k} ({op_name}): writes and fresh must list storage indices")
    if type(random) is not bool:
        bad(f"node {k} ({op_name}): random must be a boolean")
    sargs = schema.arguments
    if type(args) is not list or len(args) > len(sargs):
        bad(f"node {k} ({op_name}): at most {len(sargs)} arguments")
    node_args: list[tuple[str, Any]] = []
    for i, a in enumerate(args):
        if type(a) is not list or len(a) != 2 or type(a[0]) is not int or a[0] not in KIND_NAMES:
            bad(f"node {k} ({op_name}) argument {i} must be [kind, value]")
        code, v = a
        sa = sargs[i]
        slot = tensor_slot(sa.type)  # Note: [Complete argument lists]
        if code == 0:
            if slot is not None and slot[0] == 1 and v is not None:  # a wrapped scalar
                P.need(
                    type(v) in (bool, int, float, complex),
                    f"node {k} ({op_name}) argument {sa.name}: a {type(v).__name__} is not a tensor",
                )
            if slot is not None and slot[0] != 1 and v is not None:
                bad(f"node {k} ({op_name}) argument {sa.name}: tensors must be references")
            if slot is None or v is None:
                check_value_arg(v, sa, limits, f"node {k} ({op_name}) argument {sa.name}")
        else:
            if slot is None or slot[0] != code:
                bad(
                    f"node {k} ({op_name}) argument {sa.name} ({sa.type}) does not take a "
                    f"{KIND_NAMES[code]} reference"
                )
            lo = 0 if code == 2 or (code == 1 and not slot[1]) else -1
            if not (_small_ints([v], lo, nin - 1) if code == 1 else _small_ints(v, lo, nin - 1)):
                bad(f"node {k} ({op_name}) argument {sa.name}: tensor index out of range")
        node_args.append((KIND_NAMES[code], v))
    for sa in sargs[len(node_args) :]:
        if not sa.has_default_value():
            bad(f"node {k} ({op_name}): argument {sa.name} is missing and has no default")
        node_args.append(("value", sa.default_value))
    step = Step(
        id=k,
        op=op_name,
        args=node_args,
        inputs=ins_m,
        outputs=outs_m,
        output_alias=list(alias),
        writes=list(writes),
        fresh=list(fresh),
        random=random,
    )
    step.target = op
    step.plan = _plan(node_args, sargs)
    step.extents = [d[1] for d in ins_d + outs_d if d is not None]
    return step


def decode_raw(
    raw: Any, limits: P.Limits, key: bytes, body: bytes, reuse: dict[int, Step] | None = None
) -> Program:
    """Check every node (or take it from `reuse`, nodes already checked with the same
    content), then the dataflow between them."""
    nodes = P.get_list(raw, "program", limits.max_nodes)
    max_local = local_bound(len(nodes))
    reuse = reuse or {}
    steps = [
        reuse[k] if k in reuse else decode_node(rn, k, limits, max_local)
        for k, rn in enumerate(nodes)
    ]
    state: dict[int, int] = {}  # local -> declared bytes (fresh) or -1 (input)
    inputs: list[int] = []
    produced: dict[int, None] = {}
    extent: dict[int, int] = {}
    fresh_bytes = 0
    random_steps = []
    for k, step in enumerate(steps):
        ins_m, outs_m = step.inputs, step.outputs
        # What this node reads must be resident or made earlier in the program.
        for m in ins_m:
            if m.storage not in state:
                state[m.storage] = -1
                inputs.append(m.storage)
        in_locals = {m.storage for m in ins_m}
        for w in step.writes:
            if w not in in_locals:
                bad(f"node {k} ({step.op}) writes storage {w} it does not take as input")
            produced[w] = None
        fresh_set = set(step.fresh)
        if len(fresh_set) != len(step.fresh):
            bad(f"node {k} ({step.op}): repeated fresh storage")
        for m, a in zip(outs_m, step.output_alias, strict=True):
            if m is None:
                continue
            if a >= 0:
                if m.storage != ins_m[a].storage:
                    bad(f"node {k} ({step.op}): an aliasing output must view its input's storage")
            elif m.storage in fresh_set:
                if m.storage in state:
                    bad(f"node {k} ({step.op}): fresh storage {m.storage} already exists")
                state[m.storage] = m.storage_nbytes
                fresh_bytes += m.storage_nbytes
                produced[m.storage] = None
            else:
                if m.storage not in state:
                    state[m.storage] = -1
                    inputs.append(m.storage)
                produced[m.storage] = None
        for f in step.fresh:
            if state.get(f, -1) < 0 or not any(m is not None and m.storage == f for m in outs_m):
                bad(f"node {k} ({step.op}): fresh storage {f} is not an output")
        for m, need_bytes in zip(
            [m for m in ins_m + outs_m if m is not None], step.extents, strict=True
        ):
            declared = state[m.storage]
            if declared >= 0:
                if need_bytes > declared:
                    bad(f"node {k} ({step.op}): a view of storage {m.storage} exceeds its size")
            elif need_bytes > extent.get(m.storage, 0):
                extent[m.storage] = need_bytes
        if step.random:
            random_steps.append(k)
    nlocals = len(state)
    if set(state) != set(range(nlocals)):
        bad("storage indices must be numbered 0..n-1 by first use")
    return Program(
        key=key,
        body=body,
        steps=steps,
        nlocals=nlocals,
        inputs=inputs,
        produced=list(produced),
        extent=extent,
        fresh_bytes=fresh_bytes,
        random_steps=random_steps,
        nbytes=len(body),
    )


# Note: [Compiled steps] (run.py): each step carries a plan of its arguments, made here once.
REMOTE_DEVICE = object()  # a value that becomes the executor's device at run time


def _plan(node_args: list[tuple[str, Any]], sargs) -> list[tuple[str | None, int, Any]]:
    plan = []
    for (kind, v), sa in zip(node_args, sargs, strict=False):
        name = sa.name if sa.kwarg_only else None
        if kind == "value":
            if isinstance(v, torch.device) and v.type == "remote_accelerator":
                v = REMOTE_DEVICE
            plan.append((name, 0, v))
        else:
            plan.append((name, KIND_CODES[kind], v))
    return plan
