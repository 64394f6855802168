"""``genie analyze``: profile a model and write its annotated graph.

    genie analyze examples/gpt2.py              # the file's build() returns (model, inputs)
    genie analyze my_pkg.models:make_vqa --json vqa.json --dot vqa.dot
    genie analyze --hf MistralForCausalLM --draw mistral.svg   # a tiny random-weight model
    python -m genie.semantic.cli path.py:make_model

``--hf NAME`` takes a transformers model class (``MistralForCausalLM``) or config name
(``mistral``) instead of a target: the model is built from its config at a tiny size with
random weights (nothing is downloaded; genie.semantic.hf_models) and called on generic inputs
of its task. ``--draw PATH`` writes the annotated graph as an SVG picture (genie.semantic.draw;
with ``--schedule`` the scheduler's charts are drawn instead).

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
        nargs="?",
        help="path.py[:callable] or module:callable returning (model, example_inputs)",
    )
    parser.add_argument(
        "--hf",
        metavar="NAME",
        help="a transformers model class or config name, built tiny with random "
        "weights (no download), instead of a target",
    )
    parser.add_argument(
        "--json", metavar="PATH", help="write the profile and annotated graph as JSON"
    )
    parser.add_argument("--dot", metavar="PATH", help="write the annotated graph as Graphviz DOT")
    parser.add_argument(
        "--fast-patterns",
        action="store_true",
        help="skip NetworkX subgraph matching (as GENIE_FAST_PATTERNS=1)",
    )
    parser.add_argument("--hints", action="store_true", help="print every pattern's hints")
    parser.add_argument(
        "--color-by",
        choices=("phase", "role"),
        default="phase",
        help="what the colours of --draw's picture show",
    )
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
                f"name a callable as {path}:callable"
            )
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
    if (
        isinstance(inputs, tuple)
        and len(inputs) == 2
        and isinstance(inputs[0], (tuple, list))
        and isinstance(inputs[1], dict)
    ):
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

    hf_name = getattr(args, "hf", None)
    if bool(hf_name) == bool(args.target):
        print("genie analyze: give a target or --hf NAME (one of them)", file=sys.stderr)
        return 2
    try:
        if hf_name:
            from genie.semantic import hf_models

            model, call_args, call_kwargs = hf_models.build(hf_name)
        else:
            model, call_args, call_kwargs = load_target(args.target)
    except (OSError, LookupError, ValueError, TypeError, ImportError, AttributeError) as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - a transformers model that cannot be built tiny
        print(
            f"genie analyze: cannot build {hf_name or args.target}: {type(exc).__name__}: {exc}",
            file=sys.stderr,
        )
        return 2
    label = f"--hf {hf_name}" if hf_name else args.target
    config = AnalyzerConfig.from_env()
    if getattr(args, "fast_patterns", False):
        config.fast_patterns = True
    analyzer = SemanticAnalyzer(config)
    profile = analyzer.analyze(model, *call_args, **call_kwargs)
    graph = profile.graph
    print(f"genie analyze {label}: {type(model).__name__}")
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
    draw = getattr(args, "draw", None)
    if draw and not getattr(args, "schedule", False):
        from genie.semantic.draw import write_svg

        write_svg(
            profile,
            draw,
            title=f"{type(model).__name__}: {profile.workload_type}",
            color_by=getattr(args, "color_by", "phase"),
        )
        print(f"wrote {draw}")
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
    parser = add_analyze_arguments(
        argparse.ArgumentParser(
            prog="genie analyze", description="Profile a model's recorded graph."
        )
    )
    parser.add_argument("--draw", metavar="SVG", help="write a picture of the annotated graph")
    return analyze_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
