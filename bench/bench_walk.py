"""The walk of one materialization: which of Genie's Python modules one ``y.cpu()`` passes
through, client and server, and how often it moves from one module to another.

    python bench/bench_walk.py                 # this checkout
    python bench/bench_walk.py --tree OLD/python   # another checkout's python/ (same _C)

A server runs in a thread of this process (its requests go over TCP on 127.0.0.1) and a
profile hook on every thread records each call into a file under genie/. A *hop* is a call
whose callee lives in another module than its caller. The second forward of a small MLP is
traced (the first teaches the client and server the program), then a second one with
speculation off, so both the reuse path and the plain path are shown. Prints a table and
writes JSON to bench/results/walk.json. C++ frames are not seen: the recorder and the C++
runner appear as the Python calls around them.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import threading
from pathlib import Path


def _use_tree(tree: str) -> None:
    """Import genie's Python files from `tree`, keeping the installed genie._C."""
    import glob
    import importlib.util
    import site

    pattern = os.path.join(site.getsitepackages()[0], "genie", "_C*.so")
    installed = glob.glob(pattern)[0]
    sys.meta_path[:] = [f for f in sys.meta_path if "ScikitBuild" not in type(f).__name__]
    sys.path.insert(0, tree)
    import torch  # noqa: F401  (the extension needs it loaded)

    spec = importlib.util.spec_from_file_location("genie._C", installed)
    sys.modules["genie._C"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sys.modules["genie._C"])
    import genie  # noqa: F401  (the tree's package, over the installed extension)


def trace(speculate: bool) -> dict:
    import torch

    import genie
    from genie.runtime.server import Server, ServerConfig

    os.environ["GENIE_SPECULATE"] = "1" if speculate else "0"
    active = False
    # Installed before the server's threads start, so that they are traced too; counting only
    # while `active`.
    threading.setprofile(lambda *a: hook(*a) if active else None)
    server = Server(ServerConfig(host="127.0.0.1", port=0, token=b"walk"))
    host, port = server.start()
    client = genie.connect(f"{host}:{port}", token=b"walk")
    root = os.path.dirname(genie.__file__)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    x = torch.randn(2, 16)
    expected = model(x).detach()
    rmodel = model.to("remote_accelerator:0")  # in place: `model` is remote from here on
    rmodel(x.to("remote_accelerator:0")).cpu()  # the first materialization teaches both sides
    hops: collections.Counter = collections.Counter()
    modules: set[str] = set()

    def name(path: str) -> str | None:
        if not path.startswith(root):
            return None
        rel = os.path.relpath(path, os.path.dirname(root))
        return rel.removesuffix(".py").replace(os.sep, ".").removesuffix(".__init__")

    def hook(frame, event, arg):
        if not active or event != "call":
            return
        callee = name(frame.f_code.co_filename)
        if callee is None:
            return
        modules.add(callee)
        back = frame.f_back
        while back is not None and name(back.f_code.co_filename) is None:
            back = back.f_back
        caller = name(back.f_code.co_filename) if back is not None else None
        if caller is not None and caller != callee:
            hops[(caller, callee)] += 1

    active = True
    sys.setprofile(hook)
    try:
        y = rmodel(x.to("remote_accelerator:0")).cpu()
    finally:
        sys.setprofile(None)
        active = False
        threading.setprofile(None)
    assert torch.equal(y, expected)
    genie.disconnect()
    server.shutdown(grace=2.0)
    del client
    return {
        "speculate": speculate,
        "hops": sum(hops.values()),
        "distinct_edges": len(hops),
        "modules": sorted(modules),
        "edges": sorted(f"{a} -> {b} x{n}" for (a, b), n in hops.items()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tree", help="a checkout's python/ folder to import genie from")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "walk.json"))
    args = p.parse_args()
    if args.tree:
        _use_tree(args.tree)
    rows = [trace(True), trace(False)]
    print(f"{'path':<28}{'hops':>6}{'edges':>7}{'modules':>9}")
    for r in rows:
        label = "reuse (speculation on)" if r["speculate"] else "plain (speculation off)"
        print(f"{label:<28}{r['hops']:>6}{r['distinct_edges']:>7}{len(r['modules']):>9}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"tree": args.tree or "installed", "runs": rows}, indent=1))


if __name__ == "__main__":
    main()
