"""Programs named by how they differ from one the server has: patches (Note: [Program
patches]) and the numbers-only instances of a template (Note: [Program instances] in
cache.py)."""

from __future__ import annotations

import copy
import hashlib
from typing import Any

from genie.runtime import protocol as P
from genie.runtime.program.decode import Program, Step, bad, local_bound
from genie.runtime.program.ops import check_value_arg

__all__ = ["apply_patch", "diff_program", "next_patch", "numeric_steps", "patch_key", "sizes"]


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
    names an instance of a template by (Note: [Program templates] in remote/namer.py). The server
    computes it from what it checks, like every key."""
    return hashlib.blake2b(b"genie.patch" + base_key + P.pack(patch), digest_size=16).digest()


def next_patch(before: list, last: list) -> list | None:
    """The patch the step after `last` most likely sends, when `before` and `last` are two
    consecutive patches of one base (Note: [Preparing the next instance] in server/resolver.py): each
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


def numeric_steps(
    base: Program, raw: list, entries: list, limits: P.Limits
) -> tuple[list[Step], list[int]] | None:
    """The steps of `base` with `entries` applied and the indices of those replaced, or None
    unless every entry replaces an int leaf that Note: [Program instances] lets change with an
    int. Each reference or argument an entry changes is checked again as decode_node would;
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
    max_local = local_bound(n)
    changed: dict[int, Step] = {}
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
        check_value_arg(v, sa, limits, f"node {k} ({step.op}) argument {sa.name}")
        step.args[i] = ("value", v)
        step.plan[i] = (step.plan[i][0], 0, v)
    for k, step in changed.items():
        steps[k] = step
    return steps, list(changed)


def _renewed(step: Step) -> Step:
    """A copy of a checked step whose references and arguments may be replaced."""
    new = copy.copy(step)
    new.__dict__.pop("native", None)  # the C++ node has the old numbers
    new.inputs, new.outputs, new.extents = list(step.inputs), list(step.outputs), list(step.extents)
    new.args, new.plan = list(step.args), list(step.plan)
    return new


def sizes(base: Program, steps: list[Step], replaced: list[int]) -> tuple[dict[int, int], int]:
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
                bad(f"node {k} ({step.op}): a view of storage {m.storage} exceeds its size")
    fresh_bytes = base.fresh_bytes
    for local, size in declared.items():
        fresh_bytes += size - base_declared[local]
        if size < base_declared[local]:  # untouched steps' views must still fit
            for k, pos in sites[local]:
                if steps[k].extents[pos] > size:
                    bad(f"node {k} ({steps[k].op}): a view of storage {local} exceeds its size")
    extent = base.extent
    if again:
        extent = dict(extent)
        for local in again:
            extent[local] = max(steps[k].extents[pos] for k, pos in sites[local])
    return extent, fresh_bytes
