"""``genie analyze``: profile a model and write its annotated graph.

    genie analyze examples/gpt2.py              # the file's build() returns (model, inputs)
    genie analyze my_pkg.models:make_vqa --json vqa.json --dot vqa.dot
    python -m genie.semantic.cli path.py:make_model

The target is a Python file (``path.py`` or ``path.py:callable``) or ``module:callable``.
The callable takes no arguments and returns ``(model, example_inputs)``: a tensor, a
tuple/list of positional inputs, a dict of keyword inputs, or ``(args, kwargs)``. A file
without a callable named after ``:`` may define ``build()`` or the globals ``model`` and
``example_inputs``. The model stays where it is; CPU inputs are moved to
``remote_accelerator:0`` and the call is recorded, not run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import runpy
import sys
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["add_analyze_arguments", "analyze_command", "load_target", "main"]


def add_analyze_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``genie analyze``'s arguments to ``parser`` (a subcommand parser)."""
    parser.add_argument(
        "target",
        help="path.py[:callable] or module:callable returning (model, example_inputs)",
    )
    parser.add_argument("--json", metavar="PATH", help="write the profile and annotated graph as JSON")
    parser.add_argument("--dot", metavar="PATH", help="write the annotated graph as Graphviz DOT")
    parser.add_argument("--fast-patterns", action="store_true",
                        help="skip NetworkX subgraph matching (as GENIE_FAST_PATTERNS=1)")
    parser.add_argument("--hints", action="store_true", help="print every pattern's hints")
    return parser


def load_target(spec: str) -> tuple[Any, tuple, dict]:
    """(model, args, kwargs) from a ``path.py[:callable]`` or ``module:callable`` target."""
    path, _, name = spec.partition(":") if not _is_windows_drive(spec) else (spec, "", "")
    if path.endswith(".py") or os.path.sep in path or os.path.exists(path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"genie analyze: no such file: {path}")
        namespace = runpy.run_path(path, run_name="__genie_analyze__")
        if name:
            if name not in namespace:
                raise LookupError(f"genie analyze: {path} defines no {name!r}")
            built = namespace[name]()
        elif callable(namespace.get("build")):
            built = namespace["build"]()
        elif "model" in namespace and "example_inputs" in namespace:
            built = (namespace["model"], namespace["example_inputs"])
        else:
            raise LookupError(
                f"genie analyze: {path} defines neither build() nor model and example_inputs; "
                f"name a callable as {path}:callable")
    else:
        if not name:
            raise ValueError(f"genie analyze: expected path.py or module:callable, got {spec!r}")
        obj: Any = importlib.import_module(path)
        for part in name.split("."):
            obj = getattr(obj, part)
        built = obj()
    if not isinstance(built, (tuple, list)) or len(built) != 2:
        raise TypeError("genie analyze: the target must return (model, example_inputs)")
    model, inputs = built
    return (model, *_split_inputs(inputs))


def _is_windows_drive(spec: str) -> bool:
    return len(spec) > 2 and spec[1] == ":" and spec[2] in "\\/"


def _split_inputs(inputs: Any) -> tuple[tuple, dict]:
    import torch

    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    if isinstance(inputs, dict):
        return (), dict(inputs)
    if (isinstance(inputs, tuple) and len(inputs) == 2 and isinstance(inputs[0], (tuple, list))
            and isinstance(inputs[1], dict)):
        return tuple(inputs[0]), dict(inputs[1])
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    return (inputs,), {}


def analyze_command(args: argparse.Namespace, then: Any = None) -> int:
    """Run ``genie analyze``: print the profile; write JSON / DOT when asked. Returns the exit
    status (0, or 2 when the target cannot be loaded). ``then(graph, profile) -> int``, when
    given, runs on the analysed graph before it is released (the CLI schedules it there; this
    layer does not import the scheduler)."""
    import genie
    from genie.semantic.analyzer import SemanticAnalyzer
    from genie.semantic.config import AnalyzerConfig

    try:
        model, call_args, call_kwargs = load_target(args.target)
    except (OSError, LookupError, ValueError, TypeError, ImportError, AttributeError) as exc:
        print(str(exc), file=sys.stderr)
        return 2
    config = AnalyzerConfig.from_env()
    if getattr(args, "fast_patterns", False):
        config.fast_patterns = True
    analyzer = SemanticAnalyzer(config)
    profile = analyzer.analyze(model, *call_args, **call_kwargs)
    graph = profile.graph
    print(f"genie analyze {args.target}: {type(model).__name__}")
    print(profile.format())
    if getattr(args, "hints", False):
        for p in profile.patterns:
            print(f"  {p.name}: {json.dumps(p.hints, default=str)}")
    if args.json:
        doc = {"profile": profile.to_dict(), "graph": graph.to_json()}
        for entry, node in zip(doc["graph"]["nodes"], graph.nodes, strict=True):
            entry["meta"] = _jsonable(node.meta)  # nested dicts (lineage) kept as objects
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1, default=str)
        print(f"wrote {args.json}")
    if args.dot:
        with open(args.dot, "w") as f:
            f.write(graph.to_dot(label=type(model).__name__))
        print(f"wrote {args.dot}")
    status = then(graph, profile) if then is not None else 0
    genie.synchronize()
    return status


def _jsonable(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set, frozenset)):
        return [_jsonable(x) for x in v]
    return str(v)


def main(argv: list[str] | None = None) -> int:
    parser = add_analyze_arguments(argparse.ArgumentParser(
        prog="genie analyze", description="Profile a model's recorded graph."))
    return analyze_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
