"""python/genie/_C.pyi names exactly what the built genie._C has, so editors and type
checkers see the core as it is."""

from __future__ import annotations

import ast
from pathlib import Path

import genie


def _stub_names() -> tuple[set[str], dict[str, set[str]]]:
    tree = ast.parse((Path(genie.__file__).parent / "_C.pyi").read_text())
    names, members = set(), {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            members[node.name] = {n.name for n in node.body if isinstance(n, ast.FunctionDef)}
    return names, members


def test_the_stub_names_every_function_and_class_of_the_module():
    from genie import _C

    names, members = _stub_names()
    built = {n for n in dir(_C) if not n.startswith("__")}
    assert names == built, {"missing": built - names, "extra": names - built}
    for cls, stubbed in members.items():
        # pybind11 gives every class an __init__, callable or not: compare the rest.
        real = {n for n in vars(getattr(_C, cls)) if not n.startswith("_") or n == "__len__"}
        assert stubbed - {"__init__"} == real, (cls, real ^ (stubbed - {"__init__"}))
