"""The op allow-list of a genie server and the checks of plain argument values against an
op's schema (Note: [Complete argument lists])."""

from __future__ import annotations

import re
import threading
from typing import Any

import torch

from genie.runtime import protocol as P

__all__ = ["resolve_op", "tensor_slot", "check_value_arg"]

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
def tensor_slot(t) -> tuple[int, bool] | None:
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
            tensor_slot(elem) is None,
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


def check_value_arg(v: Any, sa, limits: P.Limits, what: str) -> None:
    """A plain (non-tensor) argument value against its schema argument `sa`."""
    _check_value(v, sa.type, limits, what)
    if sa.name == "size":
        _check_size_arg(v, limits, what)
