"""The Dynamo backend: ``torch.compile(model, backend="genie", options={...})``.

Dynamo hands the backend an FX graph of torch calls; AOT autograd (as Dynamo's own backends
use it) lowers it to functional aten and splits forward from backward; each aten graph becomes
a ``CompiledGraph``, which records one program per input shape on its first call with that
shape (Note: [Lowering by recording]) and afterwards runs it on its target
(Note: [Compiled residency]).
"""

from __future__ import annotations

import logging
import threading
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from genie import _C
from genie.compile.lower import lower
from genie.compile.targets import LocalTarget, Placed, RemoteTarget
from genie.errors import GenieError

__all__ = [
    "CompileOptions",
    "CompiledGraph",
    "genie_backend",
    "register",
    "synchronize",
    "target_for",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompileOptions:
    """What ``torch.compile(..., options={...})`` may say.

    server: where programs run. None (default): the session ``genie.connect`` opened, else this
        process. "local": this process. "host:port": a session of its own with that server
        (token from ``token`` or ``$GENIE_TOKEN``). A ``RemoteExecutor``: that session.
    device: the device of the in-process target ("cpu", "cuda"); default genie's local device.
    cuda_graphs: whether programs replay as CUDA graphs. A server decides when it starts
        (``genie serve --no-cuda-graphs``); asking for something else raises.
    defer_host_copies: on a server, floating-point arguments a program writes (parameters and
        optimizer state in a compiled optimizer step) and a backward's gradients stay there:
        the host's copies read NaN until ``genie.compile.synchronize()`` brings them back
        (Note: [Deferred host copies] in targets.py). For a compiled whole training step: an
        optimizer run outside the compiled function would read the NaN gradients.
    """

    server: Any = None
    token: str | None = None
    device: str | None = None
    cuda_graphs: bool | None = None
    defer_host_copies: bool = False

    @classmethod
    def parse(cls, options: dict | None) -> CompileOptions:
        options = dict(options or {})
        known = {"server", "token", "device", "cuda_graphs", "defer_host_copies"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise GenieError(
                f"genie.compile: unknown option(s) {unknown}; known: {', '.join(sorted(known))}"
            )
        return cls(**options)


# Note: [One target per place]
# Programs compiled for the same place share one target, so that a parameter uploaded for the
# forward graph is bound by the backward graph and by every subgraph of a graph break
# (Note: [Compiled residency]). Targets live as long as the process, or, for a session the
# caller opened, as long as that session object; sessions opened here for a "host:port" option
# stay open until the process ends.
_local: dict[str, LocalTarget] = {}
_remote: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_sessions: dict[str, Any] = {}
_targets_lock = threading.Lock()


def target_for(opts: CompileOptions) -> LocalTarget | RemoteTarget:
    """The target programs compiled with `opts` run on (Note: [One target per place])."""
    from genie.runtime.remote import RemoteExecutor
    from genie.runtime.remote.connect import active

    server = opts.server
    with _targets_lock:
        if isinstance(server, str) and server != "local":
            if server not in _sessions:
                from genie.runtime.remote import connect

                _sessions[server] = connect(server, opts.token, install=False)
            server = _sessions[server]
        elif server is None:
            server = active()
            installed = _C._executor_name()
            if server is None and installed.startswith("multi:"):
                raise NotImplementedError(
                    f"genie.compile: flushes run on several devices ({installed}); compiled "
                    "programs run on one: pass options={'server': 'host:port'} or 'local'"
                )
        if isinstance(server, RemoteExecutor):
            if opts.device is not None:
                raise GenieError(
                    "genie.compile: the device option is for the in-process target; a server "
                    "runs on the device it was started with"
                )
            if opts.cuda_graphs is not None and bool(server.info.get("cuda_graphs")) != bool(
                opts.cuda_graphs
            ):
                raise NotImplementedError(
                    f"genie.compile: the server at {server.address} runs CUDA graphs: "
                    f"{bool(server.info.get('cuda_graphs'))}; a server decides that when it "
                    "starts (genie serve --no-cuda-graphs), not per compiled model"
                )
            target = _remote.get(server)
            if target is None:
                target = _remote[server] = RemoteTarget(server)
            return target
        if server not in (None, "local"):
            raise GenieError(
                f"genie.compile: option server={server!r}: expected 'local', 'host:port' or a "
                "session from genie.connect()"
            )
        from genie import local_device

        if opts.defer_host_copies:
            raise NotImplementedError(
                "genie.compile: defer_host_copies is for a server target; programs run in "
                "this process write the host's tensors themselves"
            )
        device = opts.device or local_device() or "cpu"
        if opts.cuda_graphs:
            raise NotImplementedError(
                "genie.compile: CUDA graphs for programs run in this process are not "
                "supported yet; a genie server replays static programs as CUDA graphs"
            )
        target = _local.get(device)
        if target is None:
            target = _local[device] = LocalTarget(device)
        return target


def _symbolic(example_inputs: list[Any]) -> bool:
    for a in example_inputs:
        if isinstance(a, torch.SymInt | torch.SymFloat):
            return True
        if isinstance(a, torch.Tensor) and any(
            isinstance(s, torch.SymInt) for s in (*a.shape, *a.stride())
        ):
            return True
    return False


def _shape_key(args: list[Any]) -> tuple:
    return tuple(
        (tuple(a.shape), a.stride(), a.dtype) if isinstance(a, torch.Tensor) else a for a in args
    )


class CompiledGraph:
    """One aten graph compiled for one target: one program per input shape (a graph Dynamo
    traced with static shapes has one), recorded at its first call."""

    def __init__(
        self,
        gm: torch.fx.GraphModule,
        example_inputs: list[Any],
        target,
        keep_from: int | None = None,
        defer: bool = False,
    ):
        # AOT autograd passes the arguments as one list; an attribute of the instance, so that
        # wrappers (functools.wraps copies __dict__) keep it.
        self._boxed_call = True
        self.gm = gm
        self.target = target
        self.dynamic = _symbolic(example_inputs)
        self.keep_from = keep_from  # outputs saved for backward start here (a forward)
        self.defer = defer  # Note: [Deferred host copies] in targets.py
        self.bumped: frozenset[int] = frozenset()  # set by the backend
        self.programs: dict[tuple | None, Placed] = {}
        self._lock = threading.Lock()

    def __call__(self, args: list[Any]):
        args = list(args)
        key = _shape_key(args) if self.dynamic else None
        placed = self.programs.get(key)
        if placed is None:
            with self._lock:
                placed = self.programs.get(key)
                if placed is None:
                    kept = frozenset(
                        i
                        for i, a in enumerate(args)
                        if isinstance(a, torch.Tensor) and self.target.saved_sid(a) is not None
                    )
                    low = lower(self.gm, args, kept)
                    placed = self.target.place(low, self.keep_from, self.defer)
                    placed.bumped = self.bumped
                    self.programs[key] = placed
                    # The recording's nodes and its copies of the arguments are dead now: a
                    # flush drops them (and runs nothing of them) rather than keeping them
                    # pending (Note: [Lowering by recording]).
                    _C._flush_all()
                    logger.debug(
                        "genie.compile: program %s (%d steps) for %s",
                        placed.low.enc.key.hex()[:12],
                        len(placed.low.program.steps),
                        self.target.name,
                    )
        return placed(args)


def genie_backend(
    gm: torch.fx.GraphModule,
    example_inputs: list[Any],
    *,
    options: dict | None = None,
    mode: str | None = None,
):
    """The Dynamo backend registered as "genie" (Note: [Compiled programs])."""
    from functorch.compile import default_partition
    from torch._dynamo.backends.common import aot_autograd

    if mode not in (None, "default"):
        logger.info("genie.compile: mode=%r has no effect on this backend", mode)
    opts = CompileOptions.parse(options)
    target = target_for(opts)

    def partition(joint, joint_inputs, *, num_fwd_outputs: int, **kwargs):
        fw, bw = default_partition(joint, joint_inputs, num_fwd_outputs=num_fwd_outputs, **kwargs)
        fw.meta["genie_fwd_outputs"] = num_fwd_outputs  # the rest is saved for backward
        return fw, bw

    def compiler(graph: torch.fx.GraphModule, inputs: list[Any]) -> CompiledGraph:
        compiled = CompiledGraph(
            graph, inputs, target, graph.meta.get("genie_fwd_outputs"), opts.defer_host_copies
        )
        # The arguments whose version AOT autograd bumps at each call, for the writes the
        # graph keeps (Note: [Compiled residency]); inductor reads the same metadata. They
        # index the forward's (or inference graph's) arguments, never a backward's.
        ctx = torch._guards.TracingContext.try_get()
        meta = getattr(ctx, "fw_metadata", None)
        if meta is not None:
            compiled.bumped = frozenset(meta.mutated_graph_handled_indices_seen_by_autograd)
        return compiled

    def bw_compiler(graph: torch.fx.GraphModule, inputs: list[Any]) -> CompiledGraph:
        # Deferred, every gradient stays on the server (keep_from=0).
        defer = opts.defer_host_copies
        return CompiledGraph(graph, inputs, target, 0 if defer else None, defer)

    # An inference graph that writes an argument (a StaticCache's index_copy_) keeps the write
    # as a step of its program: the server's copy is updated in place and stays resident,
    # rather than the new value coming back as an output to be uploaded again next call.
    return aot_autograd(
        fw_compiler=compiler,
        bw_compiler=bw_compiler,
        partition_fn=partition,
        keep_inference_input_mutations=True,
    )(gm, example_inputs)


def synchronize() -> int:
    """Bring back the host copies that programs compiled with ``defer_host_copies`` left on
    their servers (parameters, optimizer state, gradients); the number of tensors brought
    back. Call it before reading them on the host: a checkpoint, an evaluation in eager mode."""
    with _targets_lock:
        targets = list(_remote.values())
    return sum(t.synchronize() for t in targets)


def register() -> None:
    """Register the backend with Dynamo under "genie" (the ``torch_dynamo_backends`` entry
    point does the same lazily, when ``torch.compile`` first asks for the name)."""
    from torch._dynamo.backends import registry

    if "genie" not in registry._COMPILER_FNS:
        registry.register_backend(compiler_fn=genie_backend, name="genie")
