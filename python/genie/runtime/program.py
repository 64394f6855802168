"""Programs on the wire: the client's encoding of a flush and the server's validated decoding.

Note: [Programs and bindings]
A flush is split into a *program* and a *binding*. The program is the node list with every
storage id replaced by a local index (its order of first appearance), so the same code run
again (the next decode step, the next batch) is the same program, byte for byte, whatever
storage ids the recorder handed out. The binding lists the real storage ids, by local index.
The server decodes and validates a program once, caches it under the hash of its bytes, and
afterwards the client sends only that 16-byte key and the binding (see Note: [Wire format]).
Because the server computes the key from the bytes it validated, one client cannot make
another run something it did not validate.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from genie import _C
from genie.errors import ExecutionError, GenieError, ProtocolError, RemoteError
from genie.graph.ir import Node, TensorMeta
from genie.runtime import protocol as P
from genie.runtime.replay import Environment, byte_view, run_node

__all__ = [
    "EncodedProgram",
    "native_runner",
    "Program",
    "ProgramCache",
    "decode_program",
    "encode_program",
    "apply_patch",
    "diff_program",
    "patch_key",
    "execute",
    "resolve_op",
]

logger = logging.getLogger(__name__)

_KIND_CODES = {"value": 0, "tensor": 1, "tensor_list": 2, "optional_tensor_list": 3}
_KIND_NAMES = {v: k for k, v in _KIND_CODES.items()}
_RNG_STATE_BYTES = torch.get_rng_state().numel()


# -- client side --------------------------------------------------------------------------
@dataclass
class EncodedProgram:
    body: bytes
    key: bytes
    binding: list[int]
    rng: list[list]
    fresh: dict[int, int]  # storage id -> bytes, for storages this flush creates
    nodes: list[list]  # the program before packing, for patches
    signature: tuple  # the op sequence: programs that share it are patched, not resent


def _key(body: bytes) -> bytes:
    return hashlib.blake2b(body, digest_size=16).digest()


def encode_program(nodes: list[dict]) -> EncodedProgram:
    """Core node dicts (the recorder's flush) -> program bytes, key and binding."""
    local: dict[int, int] = {}
    binding: list[int] = []
    dtype_names: dict[torch.dtype, str] = {}

    def loc(s: int) -> int:
        i = local.get(s)
        if i is None:
            i = local[s] = len(binding)
            binding.append(s)
        return i

    def ref(r: dict) -> list:
        dt = r["dtype"]
        name = dtype_names.get(dt)
        if name is None:
            name = dtype_names[dt] = P.dtype_name(dt)
        return [loc(r["storage"]), name, r["shape"], r["stride"], r["offset"], r["storage_nbytes"]]

    body_nodes = []
    rng: list[list] = []
    fresh: dict[int, int] = {}
    for k, d in enumerate(nodes):
        ins = [ref(r) for r in d["inputs"]]
        # An undefined tensor result (alias -2, e.g. a gradient nobody asked for) travels as None.
        outs = [
            None if a == -2 else ref(r)
            for r, a in zip(d["outputs"], d["output_alias"], strict=True)
        ]
        args = [[_KIND_CODES[kind], v] for kind, v in d["args"]]
        random = bool(d["random"])
        body_nodes.append(
            [
                d["op"],
                args,
                ins,
                outs,
                d["output_alias"],
                [loc(s) for s in d["writes"]],
                [loc(s) for s in d["fresh"]],
                random,
            ]
        )
        state = d.get("rng_state")
        if random and state is not None:
            rng.append([k, state.numpy().tobytes()])
        for r, alias in zip(d["outputs"], d["output_alias"], strict=False):
            if alias == -1:
                fresh[r["storage"]] = r["storage_nbytes"]
    body = P.pack(body_nodes)
    signature = tuple(n[0] for n in body_nodes)
    return EncodedProgram(body, _key(body), binding, rng, fresh, body_nodes, signature)


# Note: [Program patches]
# A decode step with a growing KV cache is a new program every step (its shapes change), but it
# differs from the previous step's only in a few numbers. The client sends those as a patch
# against a program the server has: [[path, value], ...] where path indexes into the nested
# program lists. The server applies it, re-encodes, and validates the result in full like any
# new program; the key the client sends must match the key of the patched bytes.
def diff_program(base: list, new: list) -> list[list]:
    out: list[list] = []

    def walk(a, b, path: list[int]) -> None:
        if type(a) is list and type(b) is list and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                if x is not y and (type(x) is not type(y) or x != y):
                    walk(x, y, [*path, i])
        else:
            out.append([path, b])

    walk(base, new, [])
    return out


def patch_key(base_key: bytes, patch: list) -> bytes:
    """The key of the program `patch` makes of the program keyed `base_key`: what a client
    names an instance of a template by (Note: [Program templates] in client.py). The server
    computes it from what it checks, like every key."""
    return hashlib.blake2b(b"genie.patch" + base_key + P.pack(patch), digest_size=16).digest()


def next_patch(before: list, last: list) -> list | None:
    """The patch the step after `last` most likely sends, when `before` and `last` are two
    consecutive patches of one base (Note: [Preparing the next instance] in server.py): each
    int moved on by its last change, as the client predicts (Note: [Program templates] in
    client.py); None unless both patch the same paths with ints."""
    if len(before) != len(last):
        return None
    out = []
    for e0, e1 in zip(before, last, strict=True):
        if type(e0) is not list or type(e1) is not list or len(e0) != 2 or len(e1) != 2:
            return None
        (p0, v0), (p1, v1) = e0, e1
        if p0 != p1 or type(v0) is not int or type(v1) is not int:
            return None
        out.append([p1, 2 * v1 - v0])
    return out


def apply_patch(base: list, patch: Any, limits: P.Limits) -> list:
    """A copy of `base` with `patch` applied; copies only the lists a patch goes through."""
    root = list(base)
    copied = {id(root)}
    for entry in P.get_list(patch, "patch", limits.max_list):
        P.need(type(entry) is list and len(entry) == 2, "a patch entry must be [path, value]")
        path = P.get_list(entry[0], "patch path", 8)
        P.need(len(path) >= 1, "a patch path cannot be empty")
        node = root
        for depth, i in enumerate(path[:-1]):
            P.need(
                type(node) is list and type(i) is int and 0 <= i < len(node),
                "patch path out of range",
            )
            child = node[i]
            P.need(type(child) is list, f"patch path goes through a leaf at depth {depth}")
            if id(child) not in copied:
                child = list(child)
                node[i] = child
                copied.add(id(child))
            node = child
        last = path[-1]
        P.need(
            type(node) is list and type(last) is int and 0 <= last < len(node),
            "patch path out of range",
        )
        node[last] = entry[1]
    return root


# -- ops ----------------------------------------------------------------------------------
_OP_RE = re.compile(r"(aten|prims)::([A-Za-z_][A-Za-z0-9_]{0,127})\.([A-Za-z_][A-Za-z0-9_]{0,127})")
# Ops that reach outside the tensors they are given: the server's files, or device asserts
# that take the whole CUDA context (every session) down with them.
_DENIED = {"aten::from_file", "aten::_assert_async"}
_op_cache: dict[str, tuple[torch._ops.OpOverload, Any]] = {}
_op_lock = threading.Lock()


def resolve_op(name: Any) -> tuple[torch._ops.OpOverload, Any]:
    """An ``aten::x.overload`` or ``prims::x.overload`` string -> (OpOverload, schema), only
    for overloads that exist; anything else raises ProtocolError."""
    hit = _op_cache.get(name) if type(name) is str else None
    if hit is not None:
        return hit
    P.need(type(name) is str, "an op name must be a string")
    m = _OP_RE.fullmatch(name)  # whole: "$" alone would let a trailing newline through
    P.need(m is not None, f"{name[:80]!r} is not an aten or prims op overload name")
    ns, base, overload = m.groups()
    P.need(f"{ns}::{base}" not in _DENIED, f"{ns}::{base} is not allowed on a genie server")
    want = "" if overload == "default" else overload
    schemas = torch._C._jit_get_schemas_for_operator(f"{ns}::{base}")
    schema = next((s for s in schemas if s.overload_name == want), None)
    P.need(schema is not None, f"{name} is not an existing op overload")
    packet = getattr(getattr(torch.ops, ns), base)
    P.need(isinstance(packet, torch._ops.OpOverloadPacket), f"{name} is not an op")
    op = getattr(packet, overload)
    P.need(isinstance(op, torch._ops.OpOverload), f"{name} is not an op overload")
    for a in op._schema.arguments:
        P.need(a.name not in ("filename", "path"), f"{name} reads files; not allowed")
    with _op_lock:
        _op_cache[name] = (op, op._schema)
    return op, op._schema


# -- argument checks ----------------------------------------------------------------------
_INT64 = (-(1 << 63), (1 << 63) - 1)
_ENUMS = (torch.dtype, torch.layout, torch.memory_format)


# Note: [Complete argument lists]
# A node's argument list must name every argument of its op's schema, each of the kind the
# schema has: a kernel called with a short stack reads past it (the C++ runner crashed on a
# one-argument aten::add), and one handed a list where it wants a tensor, or None where None
# is not allowed, dereferences what is not there. The recorder spells out every argument;
# a shorter list from the wire gets the schema's defaults filled in here, explicitly, and
# a missing argument without a default is refused. Tensor arguments come as references of
# the kind their schema type names:
#   Tensor -> 1 (an input index; -1, meaning None, only for Tensor?), also a plain number
#   (a wrapped scalar: x + 1) as a value; Tensor[] -> 2 (indices >= 0); Tensor?[] -> 3.
def _tensor_slot(t) -> tuple[int, bool] | None:
    """(argument kind code, whether None fits) for a schema type that holds tensors, else
    None."""
    optional = t.kind() == "OptionalType"
    if optional:
        t = t.getElementType()
    kind = t.kind()
    if kind == "TensorType":
        return 1, optional
    if kind == "ListType":
        elem = t.getElementType()
        if elem.kind() == "TensorType":
            return 2, optional
        if elem.kind() == "OptionalType" and elem.getElementType().kind() == "TensorType":
            return 3, optional
    return None


def _check_value(v: Any, t, limits: P.Limits, what: str, depth: int = 0) -> None:
    kind = t.kind()
    if v is None:
        # Only where the schema allows None: a kernel handed None for a Tensor or an int
        # dereferences nothing (Note: [Complete argument lists]).
        P.need(kind in ("OptionalType", "NoneType"), f"{what}: None does not fit {t}")
        return
    if kind == "OptionalType":
        return _check_value(v, t.getElementType(), limits, what, depth)
    if kind == "ListType":
        P.need(
            type(v) is list and len(v) <= limits.max_list and depth < 2, f"{what}: expected a list"
        )
        elem = t.getElementType()
        P.need(
            _tensor_slot(elem) is None,
            f"{what}: a list of tensors travels as tensor references, not as values",
        )
        for x in v:
            _check_value(x, elem, limits, what, depth + 1)
        return
    tv = type(v)
    if kind in ("IntType", "SymIntType"):
        ok = (tv is int and _INT64[0] <= v <= _INT64[1]) or tv is bool or isinstance(v, _ENUMS)
    elif kind in ("FloatType", "SymFloatType"):
        ok = tv in (int, float, bool)
    elif kind in ("BoolType", "SymBoolType"):
        ok = tv is bool
    elif kind == "NumberType":
        ok = tv in (bool, float, complex) or (tv is int and _INT64[0] <= v <= _INT64[1])
    elif kind == "StringType":
        ok = tv is str and len(v) <= limits.max_str
    elif kind == "DeviceObjType":
        ok = isinstance(v, torch.device)
    elif kind in ("ScalarTypeType", "LayoutType", "MemoryFormatType"):
        ok = isinstance(v, _ENUMS) or tv is int
    elif kind == "TensorType":
        # Tensors travel as references; a Python number here is a wrapped scalar (x + 1).
        ok = tv in (bool, int, float, complex)
    elif kind == "GeneratorType":
        ok = False  # generators travel as recorded states
    else:
        ok = tv in (bool, int, float, str) and (tv is not str or len(v) <= limits.max_str)
    P.need(ok, f"{what}: a {tv.__name__} does not fit {t}")


def _check_size_arg(v: Any, limits: P.Limits, what: str) -> None:
    if type(v) is list:
        n = 1
        for x in v:
            if type(x) is int and x > 0:
                n *= x
        P.need(n <= limits.max_storage, f"{what}: {n} elements exceed the server's storage limit")


def _check_value_arg(v: Any, sa, limits: P.Limits, what: str) -> None:
    """A plain (non-tensor) argument value against its schema argument `sa`."""
    _check_value(v, sa.type, limits, what)
    if sa.name == "size":
        _check_size_arg(v, limits, what)


def _max_local(nodes: int) -> int:
    """The largest storage index a program of `nodes` nodes may use (a node mentions at most
    a few storages)."""
    return 8 * nodes + 8


# -- server side --------------------------------------------------------------------------
class _Step(Node):
    """A decoded node whose ``target`` was resolved once, at validation."""

    target = None  # shadows Node.target (a property) so that each step stores its own


@dataclass
class Program:
    key: bytes
    steps: list[_Step]
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
    return _decode(raw, limits, key if key is not None else _key(body), body)


def _bad(what: str) -> None:
    raise ProtocolError(f"genie: invalid request: {what}")


def _small_ints(xs: Any, lo: int, hi: int) -> bool:
    if type(xs) is not list or len(xs) > 4096:
        return False
    for x in xs:
        if type(x) is not int or x < lo or x > hi:
            return False
    return True


def _decode_node(rn: Any, k: int, limits: P.Limits, max_local: int) -> _Step:
    """One node, checked on its own: op, arguments against the op's schema, references."""
    if type(rn) is not list or len(rn) != 8:
        _bad(f"node {k} must be a list of 8 fields")
    op_name, args, ins, outs, alias, writes, fresh, random = rn
    op, schema = resolve_op(op_name)
    if type(ins) is not list or type(outs) is not list or len(ins) > 4096 or len(outs) > 4096:
        _bad(f"node {k} ({op_name}): inputs and outputs must be lists")
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
        _bad(
            f"node {k} ({op_name}): output_alias must name an input, -1 (fresh) or -2 "
            "(undefined, with a None output) per output"
        )
    if not _small_ints(writes, 0, max_local) or not _small_ints(fresh, 0, max_local):
        _bad(f"node {k} ({op_name}): writes and fresh must list storage indices")
    if type(random) is not bool:
        _bad(f"node {k} ({op_name}): random must be a boolean")
    sargs = schema.arguments
    if type(args) is not list or len(args) > len(sargs):
        _bad(f"node {k} ({op_name}): at most {len(sargs)} arguments")
    node_args: list[tuple[str, Any]] = []
    for i, a in enumerate(args):
        if type(a) is not list or len(a) != 2 or type(a[0]) is not int or a[0] not in _KIND_NAMES:
            _bad(f"node {k} ({op_name}) argument {i} must be [kind, value]")
        code, v = a
        sa = sargs[i]
        slot = _tensor_slot(sa.type)  # Note: [Complete argument lists]
        if code == 0:
            if slot is not None and slot[0] == 1 and v is not None:  # a wrapped scalar
                P.need(
                    type(v) in (bool, int, float, complex),
                    f"node {k} ({op_name}) argument {sa.name}: a {type(v).__name__} is not a tensor",
                )
            if slot is not None and slot[0] != 1 and v is not None:
                _bad(f"node {k} ({op_name}) argument {sa.name}: tensors must be references")
            if slot is None or v is None:
                _check_value_arg(v, sa, limits, f"node {k} ({op_name}) argument {sa.name}")
        else:
            if slot is None or slot[0] != code:
                _bad(
                    f"node {k} ({op_name}) argument {sa.name} ({sa.type}) does not take a "
                    f"{_KIND_NAMES[code]} reference"
                )
            lo = 0 if code == 2 or (code == 1 and not slot[1]) else -1
            if not (_small_ints([v], lo, nin - 1) if code == 1 else _small_ints(v, lo, nin - 1)):
                _bad(f"node {k} ({op_name}) argument {sa.name}: tensor index out of range")
        node_args.append((_KIND_NAMES[code], v))
    for sa in sargs[len(node_args) :]:
        if not sa.has_default_value():
            _bad(f"node {k} ({op_name}): argument {sa.name} is missing and has no default")
        node_args.append(("value", sa.default_value))
    step = _Step(
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


def _decode(
    raw: Any, limits: P.Limits, key: bytes, body: bytes, reuse: dict[int, _Step] | None = None
) -> Program:
    """Check every node (or take it from `reuse`, nodes already checked with the same
    content), then the dataflow between them."""
    nodes = P.get_list(raw, "program", limits.max_nodes)
    max_local = _max_local(len(nodes))
    reuse = reuse or {}
    steps = [
        reuse[k] if k in reuse else _decode_node(rn, k, limits, max_local)
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
                _bad(f"node {k} ({step.op}) writes storage {w} it does not take as input")
            produced[w] = None
        fresh_set = set(step.fresh)
        if len(fresh_set) != len(step.fresh):
            _bad(f"node {k} ({step.op}): repeated fresh storage")
        for m, a in zip(outs_m, step.output_alias, strict=True):
            if m is None:
                continue
            if a >= 0:
                if m.storage != ins_m[a].storage:
                    _bad(f"node {k} ({step.op}): an aliasing output must view its input's storage")
            elif m.storage in fresh_set:
                if m.storage in state:
                    _bad(f"node {k} ({step.op}): fresh storage {m.storage} already exists")
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
                _bad(f"node {k} ({step.op}): fresh storage {f} is not an output")
        for m, need_bytes in zip(
            [m for m in ins_m + outs_m if m is not None], step.extents, strict=True
        ):
            declared = state[m.storage]
            if declared >= 0:
                if need_bytes > declared:
                    _bad(f"node {k} ({step.op}): a view of storage {m.storage} exceeds its size")
            elif need_bytes > extent.get(m.storage, 0):
                extent[m.storage] = need_bytes
        if step.random:
            random_steps.append(k)
    nlocals = len(state)
    if set(state) != set(range(nlocals)):
        _bad("storage indices must be numbered 0..n-1 by first use")
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


def _numeric_steps(
    base: Program, raw: list, entries: list, limits: P.Limits
) -> tuple[list[_Step], list[int]] | None:
    """The steps of `base` with `entries` applied and the indices of those replaced, or None
    unless every entry replaces an int leaf that Note: [Program instances] lets change with an
    int. Each reference or argument an entry changes is checked again as _decode_node would;
    the rest of each step is the base's, already checked."""
    refs: dict[tuple[int, int, int], list] = {}
    args: dict[tuple[int, int], Any] = {}
    n = len(raw)
    try:
        for path, value in entries:
            if type(value) is not int or type(path) is not list:
                return None
            if len(path) == 5:
                k, f, i, part, j = path
                if not 0 <= j:
                    return None
            elif len(path) == 4:
                k, f, i, part = path
                j = -1
            else:
                return None
            if not (0 <= k < n and 0 <= i):
                return None
            if f == 1:
                arg = raw[k][1][i]
                if part != 1 or arg[0] != 0:
                    return None
                cur = args.get((k, i))
                if cur is None:
                    cur = arg[1]
                    cur = list(cur) if type(cur) is list else cur
                if j < 0:
                    if type(cur) is not int:
                        return None
                    cur = value
                elif type(cur) is not list or type(cur[j]) is not int:
                    return None
                else:
                    cur[j] = value
                args[(k, i)] = cur
            elif f == 2 or f == 3:
                r = refs.get((k, f, i))
                if r is None:
                    r0 = raw[k][f][i]
                    if r0 is None:
                        return None
                    r = refs[(k, f, i)] = [r0[0], r0[1], list(r0[2]), list(r0[3]), r0[4], r0[5]]
                if part == 2 or part == 3:
                    if j < 0:
                        return None
                    r[part][j] = value
                elif (part == 4 or part == 5) and j < 0:
                    r[part] = value
                else:
                    return None
            else:
                return None
    except (TypeError, ValueError, IndexError):  # a path that does not fit the program
        return None
    steps = list(base.steps)
    max_local = _max_local(n)
    changed: dict[int, _Step] = {}
    for (k, f, i), r in refs.items():
        step = changed.get(k)
        if step is None:
            step = changed[k] = _renewed(base.steps[k])
        m, e = P.decode_ref_extent(r, limits, max_sid=max_local)
        if f == 2:
            step.inputs[i] = m
            step.extents[i] = e
        else:
            step.outputs[i] = m
            step.extents[len(step.inputs) + sum(o is not None for o in step.outputs[:i])] = e
    for (k, i), v in args.items():
        step = changed.get(k)
        if step is None:
            step = changed[k] = _renewed(base.steps[k])
        sa = step.target._schema.arguments[i]
        _check_value_arg(v, sa, limits, f"node {k} ({step.op}) argument {sa.name}")
        step.args[i] = ("value", v)
        step.plan[i] = (step.plan[i][0], 0, v)
    for k, step in changed.items():
        steps[k] = step
    return steps, list(changed)


def _renewed(step: _Step) -> _Step:
    """A copy of a checked step whose references and arguments may be replaced."""
    new = copy.copy(step)
    new.__dict__.pop("native", None)  # the C++ node has the old numbers
    new.inputs, new.outputs, new.extents = list(step.inputs), list(step.outputs), list(step.extents)
    new.args, new.plan = list(step.args), list(step.plan)
    return new


def _sizes(base: Program, steps: list[_Step], replaced: list[int]) -> tuple[dict[int, int], int]:
    """The number-decided facts of `steps`, `base`'s steps with those at `replaced` swapped
    (Note: [Program instances]): each view within its storage's declared size; returns (bytes
    each input local must hold, bytes the program creates). Only what the replaced steps can
    change is looked at again: a decode step replaces a few dozen of its hundreds."""
    layout = base.meta.get("layout")
    if layout is None:
        created: dict[int, list[tuple[int, int]]] = {}  # step -> (local, output) it creates
        sites: dict[int, list[tuple[int, int]]] = {}  # local -> (step, ref position) reading it
        declared: dict[int, int] = {}  # fresh local -> bytes its creator declares
        for k, step in enumerate(base.steps):
            metas = [m for m in step.inputs + step.outputs if m is not None]
            for pos, m in enumerate(metas):
                sites.setdefault(m.storage, []).append((k, pos))
            for j, (m, a) in enumerate(zip(step.outputs, step.output_alias, strict=True)):
                if m is not None and a < 0 and m.storage in step.fresh:
                    created.setdefault(k, []).append((m.storage, j))
                    declared[m.storage] = m.storage_nbytes
        layout = base.meta["layout"] = (created, sites, declared)
    created, sites, base_declared = layout
    declared: dict[int, int] = {}  # the fresh locals whose declared bytes the patch sets
    for k in replaced:
        for local, j in created.get(k, ()):
            declared[local] = steps[k].outputs[j].storage_nbytes
    again: set[int] = set()  # input locals whose needed bytes may have changed
    for k in replaced:
        step = steps[k]
        metas = [m for m in step.inputs + step.outputs if m is not None]
        for m, need in zip(metas, step.extents, strict=True):
            size = declared.get(m.storage, base_declared.get(m.storage))
            if size is None:
                again.add(m.storage)
            elif need > size:
                _bad(f"node {k} ({step.op}): a view of storage {m.storage} exceeds its size")
    fresh_bytes = base.fresh_bytes
    for local, size in declared.items():
        fresh_bytes += size - base_declared[local]
        if size < base_declared[local]:  # untouched steps' views must still fit
            for k, pos in sites[local]:
                if steps[k].extents[pos] > size:
                    _bad(f"node {k} ({steps[k].op}): a view of storage {local} exceeds its size")
    extent = base.extent
    if again:
        extent = dict(extent)
        for local in again:
            extent[local] = max(steps[k].extents[pos] for k, pos in sites[local])
    return extent, fresh_bytes


class ProgramCache:
    """Validated programs by key, shared by all sessions of a server (LRU, bounded bytes)."""

    def __init__(self, max_bytes: int = 256 << 20):
        self._items: OrderedDict[bytes, Program] = OrderedDict()
        self._raws: OrderedDict[bytes, list] = OrderedDict()  # patch bases, unpacked
        self._bytes = 0
        self._max = max_bytes
        self._lock = threading.Lock()
        self.hits = 0
        self.prepared = 0  # instances checked ahead by prepare()
        self.misses = 0

    def get(self, key: bytes) -> Program | None:
        with self._lock:
            p = self._items.get(key)
            if p is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return p

    def add(self, body: bytes, limits: P.Limits) -> Program:
        key = _key(body)
        with self._lock:
            p = self._items.get(key)
        if p is not None:
            return p
        raw = P.unpack(body, limits)
        p = self._insert(_decode(raw, limits, key, body))
        self._remember_raw(key, raw)
        return p

    def patched(self, base: Program, patch: Any, limits: P.Limits) -> Program:
        """The program `patch` makes of `base` (Note: [Program patches]), validated and cached.
        Nodes the patch does not touch keep their checked form from `base`; the dataflow of
        the whole program is checked again."""
        raw = apply_patch(self._raw(base, limits), patch, limits)
        body = P.pack(raw)
        P.need(len(body) <= limits.max_header, "the patched program is too large")
        key = _key(body)
        with self._lock:
            p = self._items.get(key)
        if p is not None:
            return p
        touched = {entry[0][0] for entry in patch}
        reuse = {k: s for k, s in enumerate(base.steps) if k not in touched}
        # `raw` is what unpacking `body` would give: the base's values and the patch's, both
        # decoded by the same unpacker.
        p = self._insert(_decode(raw, limits, key, body, reuse))
        self._remember_raw(key, raw)
        return p

    def _raw(self, program: Program, limits: P.Limits) -> list | None:
        """The decoded-but-unchecked program lists, kept for the last few patch bases; None
        for an instance (Note: [Program instances]), which keeps no body to patch."""
        with self._lock:
            raw = self._raws.get(program.key)
        if raw is None:
            if not program.body:
                return None
            raw = P.unpack(program.body, limits)
            self._remember_raw(program.key, raw)
        return raw

    # Note: [Program instances]
    # A client that knows a program's structure (Note: [Program templates] in client.py)
    # names the next decode step as base key + a patch of numbers; its key is
    # patch_key(base, patch), computed here. When every patch entry replaces an int leaf
    # that a structure leaves out (a size, stride, offset or storage size of a reference, an
    # int value argument), the ops, wiring, aliasing and creations are the base's, already
    # checked: each reference or argument a patch changes is checked again in full (as
    # _decode_node would), and then the only facts of the whole program that numbers
    # decide: every view within its storage's declared size, the bytes each input must
    # hold, and the bytes the program creates.
    # Any other patch is checked like a new program. Instances keep no body: they are never
    # a patch base, and a client that lost track sends its program in full.
    def instance(self, base: Program, patch: Any, key: bytes, limits: P.Limits) -> Program | None:
        """The program keyed `key` = patch_key(base.key, patch), checked and cached; None when
        `base` cannot be patched here (the client then sends its program in full)."""
        with self._lock:
            p = self._items.get(key)
        if p is not None:
            return p
        raw_base = self._raw(base, limits)
        if raw_base is None:
            return None
        entries = P.get_list(patch, "patch", limits.max_list)
        numeric = _numeric_steps(base, raw_base, entries, limits)
        if numeric is None:  # not numbers only: checked like a new program
            raw = apply_patch(raw_base, entries, limits)
            touched = {e[0][0] for e in entries}
            reuse = {k: s for k, s in enumerate(base.steps) if k not in touched}
            return self._insert(_decode(raw, limits, key, b"", reuse))
        steps, replaced = numeric
        extent, fresh_bytes = _sizes(base, steps, replaced)
        return self._insert(
            Program(
                key=key,
                steps=steps,
                nlocals=base.nlocals,
                inputs=base.inputs,
                produced=base.produced,
                extent=extent,
                fresh_bytes=fresh_bytes,
                random_steps=base.random_steps,
                nbytes=base.nbytes,
            )
        )

    def prepare(self, base: Program, patch: list, limits: P.Limits, device: torch.device) -> None:
        """Check and cache the instance `patch` makes of `base` and build its C++ runner, so
        that a request naming it later finds both ready (raises what the check raises)."""
        key = patch_key(base.key, patch)
        with self._lock:
            program = self._items.get(key)
        if program is None:
            program = self.instance(base, patch, key, limits)
            if program is None:
                return
            program.meta["prepared"] = True
            self.prepared += 1
        native_runner(program, device)

    def _remember_raw(self, key: bytes, raw: list) -> None:
        with self._lock:
            self._raws[key] = raw
            self._raws.move_to_end(key)
            while len(self._raws) > 16:
                self._raws.popitem(last=False)

    def _insert(self, p: Program) -> Program:
        with self._lock:
            self._items[p.key] = p
            self._bytes += p.nbytes
            while self._bytes > self._max and len(self._items) > 1:
                _, old = self._items.popitem(last=False)
                self._bytes -= old.nbytes
        return p

    def __len__(self) -> int:
        return len(self._items)


# -- execution ----------------------------------------------------------------------------
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


# Note: [Compiled steps]
# replay.run_node is general (host fallback, random ops, any argument layout) and costs about
# 25 us of Python per node; on a GPU that is the whole cost of a small op. A decoded step also
# carries a plan: for each schema argument, whether it is passed by keyword and where its value
# comes from, worked out once per program. run_step follows the plan (a few us per node) and
# hands anything unusual (random ops, an op with no kernel on this device) to run_node, so
# both paths compute the same thing.
_REMOTE_DEVICE = object()  # a value that becomes the executor's device at run time


def _plan(node_args: list[tuple[str, Any]], sargs) -> list[tuple[str | None, int, Any]]:
    plan = []
    for (kind, v), sa in zip(node_args, sargs, strict=False):
        name = sa.name if sa.kwarg_only else None
        if kind == "value":
            if isinstance(v, torch.device) and v.type == "remote_accelerator":
                v = _REMOTE_DEVICE
            plan.append((name, 0, v))
        else:
            plan.append((name, _KIND_CODES[kind], v))
    return plan


def run_step(step: _Step, frame: Environment, *, bind: bool = True) -> list[Any]:
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
            if alias == -1 and k < len(flat) and flat[k] is not None:
                bind_result(frame, out, flat[k], step.op)
    return results


def _call_step(step: _Step, frame: Environment) -> list[Any]:
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
            value = frame.device if v is _REMOTE_DEVICE else v
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
    return list(result) if isinstance(result, (tuple, list)) else [result]


# Note: [Binding a result on a server]
# A server binds what a kernel returned under the geometry the client declared, and later
# steps, programs and fetches address that storage by declared geometries that validation
# checked against the *declared* storage size. So the bound storage must really hold the
# declared bytes, and no byte of it may be one this session did not write:
# - a result of another shape or dtype than declared is never bound (as Note: [Checked
#   results] in csrc/capture/executor.h has it for every executor): a client that declares
#   f32[16384] where the kernel returns f32[] does not get a 4-byte storage that later views
#   address as 64 KiB; a step or fetch that reads it gets an error reply instead. (CPU batch
#   norm in eval mode returns empty saved statistics that its meta kernel sizes by channel:
#   nothing reads them, so honest programs are unaffected.)
# - a result of the declared shape whose storage is not exactly the declared size or whose
#   layout differs is copied into a zeroed storage of the declared size.
# The C++ runner (csrc/capture/program_runner.cpp) follows the same rules.
def bind_result(env: Environment, meta: TensorMeta, value: torch.Tensor, op: str) -> None:
    """Make `value` (what `op` returned) the content of `meta.storage` on a server."""
    if tuple(value.shape) != meta.shape or value.dtype != meta.dtype:
        logger.debug(
            "genie: %s returned %s%s for a declared %s%s; left unbound",
            op,
            value.dtype,
            list(value.shape),
            meta.dtype,
            list(meta.shape),
        )
        return
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
    dst.set_(new.untyped_storage(), meta.offset, meta.shape, meta.stride).copy_(value)
    env.storages[meta.storage] = new.untyped_storage()


# Note: [No uninitialized bytes]
# Storages on a server are reused memory: what a kernel allocates without writing may hold
# bytes another session uploaded and released. The ops whose results start uninitialized
# (the empty family: empty, empty_like, empty_strided, new_empty, ...) get their results
# zeroed on a server, and a step that grows a storage it writes (resize_, an out= argument
# too small) has the grown tail zeroed (the C++ runner does the same). Uploads that do not
# cover their storage are zero-filled (server.py).
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
_NATIVE = os.environ.get("GENIE_PY_STEPS", "") != "1"


def _native_node(step: _Step):
    node = getattr(step, "native", None)
    if node is None:

        def ref(m: TensorMeta | None):
            if m is None:
                return None
            return (m.storage, m.dtype, m.shape, m.stride, m.offset, m.storage_nbytes)

        node = step.native = _C._program_node(
            step.op,
            [(_KIND_CODES[kind], v) for kind, v in step.args],
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


def encoded_meta(m: TensorMeta) -> list:
    return [
        m.storage,
        P.dtype_name(m.dtype),
        list(m.shape),
        list(m.stride),
        m.offset,
        m.storage_nbytes,
    ]
