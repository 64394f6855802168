"""``torch.compile(model, backend="genie")``: Dynamo's graphs as Genie programs.

    import torch, genie
    compiled = torch.compile(model, backend="genie")                  # in this process
    compiled = torch.compile(model, backend="genie", options={"server": "gpuhost:7070"})
    y = compiled(x)                                                  # CPU in, CPU out

Note: [Compiled programs]
Lazy capture pays for every aten op of every call in the client (recording, digests,
templates) and rediscovers the program each time. Dynamo hands a backend the whole graph once,
with guards, so the compile path turns it into a program once: AOT autograd lowers the graph
to functional aten (forward and backward separately), the graph is recorded once per input
shape into the wire program the recorder would produce (Note: [Lowering by recording] in
lower.py), checked against the op allow-list here and again by the server, which caches it
by the hash of its bytes. Each call then sends the program's 16-byte key, a binding, the
arguments the server does not hold yet, and fetches the outputs, in one exchange
(Note: [Compiled residency] in residency.py). Without a server the same checked program runs in
this process with the C++ program runner.

  backend.py  the Dynamo backend, its options, one CompiledGraph per aten graph
  lower.py    an aten graph + arguments -> a recorded, encoded, checked program
  targets.py  where programs run (in process, on a server)
  residency.py  what a target already holds of the caller's tensors

Registered with Dynamo through the ``torch_dynamo_backends`` entry point (pyproject.toml),
which Dynamo loads when ``torch.compile`` first asks for "genie"; by ``import genie`` when
``torch._dynamo`` is already imported (so that ``import genie`` does not import it); and by
``import genie.compile``, which a checkout used from ``PYTHONPATH`` (no entry point
installed) needs.
"""

from genie.compile.backend import (
    CompiledGraph,
    CompileOptions,
    genie_backend,
    register,
    synchronize,
)

__all__ = ["CompileOptions", "CompiledGraph", "genie_backend", "register", "synchronize"]


def _installed_entry_point() -> bool:
    from importlib.metadata import entry_points

    return any(ep.name == "genie" for ep in entry_points(group="torch_dynamo_backends"))


# Where the entry point is installed, Dynamo registers the name itself when it loads this
# module through it (registering here first would make that a duplicate).
if not _installed_entry_point():
    register()
