"""CUDA graph replay of cached programs on a server's GPU.

Note: [CUDA graphs on the server]
A program (Note: [Programs and bindings]) has static shapes by construction: the same key means
the same ops on the same geometries. After it has run plainly a few times (the warm-up CUDA
graphs need: lazy cuBLAS/cuDNN state), the server captures its replay into a
``torch.cuda.CUDAGraph`` and replays that instead, which removes the per-op launch cost.

A graph reads and writes fixed addresses, so:
- Inputs whose storage was the same object on the last two runs (weights, a static KV cache)
  are captured in place: the graph reads (and, for in-place ops, writes) the session's own
  storage. If such a storage changes later, the graph is dropped and the program runs plainly.
- Other inputs (this step's token ids, last step's activations) get private static copies;
  their current value is copied in before each replay, and copied back out when the program
  writes them.
- Outputs live in the graph's memory pool and are handed to the session. Before the next
  replay overwrites them, any the session still holds are cloned away (copy on replay), so a
  value the user kept from an earlier step never changes under them.
Programs with random ops (replayed on the host) never become graphs. Any failure to capture
marks the program as not capturable and it keeps running plainly.
"""

from __future__ import annotations

import logging
import operator
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from genie.runtime.program import Program, execute, run_step
from genie.runtime.replay import Environment

logger = logging.getLogger(__name__)

__all__ = ["GraphRunner"]

# One capture at a time per process: capture switches the allocator of the capturing stream
# into a private pool, and concurrent captures from several sessions buy nothing.
_capture_lock = threading.Lock()


def _bytes(st: torch.UntypedStorage) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=st.device).set_(st)


def _clone(st: torch.UntypedStorage) -> torch.UntypedStorage:
    return _bytes(st).clone().untyped_storage()


@dataclass
class _Entry:
    runs: int = 0
    failed: bool = False
    graph: torch.cuda.CUDAGraph | None = None
    static: dict[int, torch.UntypedStorage] = field(default_factory=dict)
    stable: set[int] = field(default_factory=set)
    outputs: dict[int, torch.UntypedStorage] = field(default_factory=dict)
    handed: list[tuple[int, torch.UntypedStorage]] = field(default_factory=list)
    written: list[int] = field(default_factory=list)  # inputs the program writes in place
    last_inputs: dict[int, int] = field(default_factory=dict)  # local -> id() of its storage object
    static_list: list[torch.UntypedStorage] | None = None  # static, in program.inputs order


class GraphRunner:
    """Per session: decides, per program, between plain replay and CUDA graph replay."""

    def __init__(self, device: torch.device, *, enabled: bool, warmup: int = 2, capacity: int = 32):
        self.device = torch.device(device)
        self.enabled = enabled and self.device.type == "cuda" and torch.cuda.is_available()
        self.warmup = warmup
        self.capacity = capacity
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        cuda = self.device.type == "cuda" and torch.cuda.is_available()
        self.stream = torch.cuda.Stream(self.device) if cuda else None
        self.replays = 0
        self.captures = 0
        self.capture_failures = 0

    def run(self, program: Program, binding: list[int], states: dict, env: Environment) -> None:
        """Run `program` (binding already checked), through a graph when that is possible."""
        if not self.enabled or program.random_steps:
            execute(program, binding, states, env)
            return
        e = self._entries.get(program.key)
        if e is None:
            e = self._entries[program.key] = _Entry()
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        self._entries.move_to_end(program.key)
        e.runs += 1
        if e.graph is None:
            current = {local: id(env.storages[binding[local]]) for local in program.inputs}
            if e.failed or e.runs <= self.warmup:
                e.last_inputs = current
                execute(program, binding, states, env)
                return
            if not self._capture(e, program, binding, env, current):
                execute(program, binding, states, env)
                return
        if not self._replay(e, program, binding, env):
            execute(program, binding, states, env)

    # -- capture and replay ---------------------------------------------------------------
    def _capture(
        self, e: _Entry, program: Program, binding: list[int], env: Environment, current: dict
    ) -> bool:
        e.stable = {local for local, ident in current.items() if e.last_inputs.get(local) == ident}
        static: dict[int, torch.UntypedStorage] = {}
        for local in program.inputs:
            st = env.storages[binding[local]]
            static[local] = st if local in e.stable else _clone(st)
        frame = Environment(env.device)
        frame.storages = dict(static)
        graph = torch.cuda.CUDAGraph()
        try:
            with _capture_lock:
                with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
                    for step in program.steps:
                        run_step(step, frame)
        except Exception as err:  # noqa: BLE001 - any capture failure means "run it plainly"
            e.failed = True
            self.capture_failures += 1
            logger.info(
                "genie: program %s cannot be captured as a CUDA graph: %s",
                program.key.hex()[:12],
                err,
            )
            try:
                torch.cuda.synchronize(self.device)
            except Exception:  # noqa: BLE001
                logger.exception("genie: CUDA state after a failed capture")
            return False
        e.graph = graph
        e.static = static
        e.static_list = None
        e.outputs = {
            local: frame.storages[local]
            for local in program.produced
            if local in frame.storages and local not in static
        }
        e.written = [local for local in program.inputs if local in set(program.produced)]
        self.captures += 1
        logger.debug("genie: captured program %s as a CUDA graph", program.key.hex()[:12])
        return True

    def _drop(self, e: _Entry) -> None:
        e.graph = None
        e.static_list = None
        e.static, e.outputs, e.handed, e.written = {}, {}, [], []
        e.runs = 0

    def _replay(self, e: _Entry, program: Program, binding: list[int], env: Environment) -> bool:
        # The loops below run before the GPU gets the graph: common cases take C-level paths.
        storages = env.storages
        # 1. Values handed out by the previous replay must not change under their holders.
        if e.handed:
            held = list(map(storages.get, [sid for sid, _ in e.handed]))
            if any(map(operator.is_, held, [st for _, st in e.handed])):
                for (sid, st), cur in zip(e.handed, held, strict=True):
                    if cur is st:
                        storages[sid] = _clone(st)
        e.handed = []
        # 2. Inputs: in place when they are the captured storage, else copied in.
        copied = []
        inputs = program.inputs
        if e.static_list is None:
            e.static_list = [e.static[local] for local in inputs]
        current = list(map(storages.__getitem__, [binding[local] for local in inputs]))
        if all(map(operator.is_, current, e.static_list)):
            inputs = []  # every input is the captured storage itself
        for local in inputs:
            cur = env.storages[binding[local]]
            st = e.static[local]
            if cur is st:
                continue
            if local in e.stable or cur.nbytes() != st.nbytes():
                logger.debug(
                    "genie: program %s: a captured input changed; dropping its graph",
                    program.key.hex()[:12],
                )
                self._drop(e)
                return False
            _bytes(st).copy_(_bytes(cur))
            copied.append(local)
        e.graph.replay()
        self.replays += 1
        # 3. In-place writes to private copies go back to the session's storages.
        for local in copied:
            if local in e.written:
                _bytes(env.storages[binding[local]]).copy_(_bytes(e.static[local]))
        # 4. Outputs.
        e.handed = [(binding[local], st) for local, st in e.outputs.items()]
        storages.update(e.handed)
        return True

    # -- speculative runs (Note: [Speculative runs] in genie/runtime/server.py) --------------
    def rename(self, mapping: dict[int, int]) -> None:
        """Storages handed out under the ids in `mapping` are now held under the ids it maps
        them to (a speculative run's temporaries adopted by the run that confirmed it)."""
        for e in self._entries.values():
            if e.handed:
                e.handed = [(mapping.get(sid, sid), st) for sid, st in e.handed]

    def handed(self, key: bytes) -> list[tuple[int, torch.UntypedStorage]]:
        """The outputs the last replay of program `key` handed out (a copy)."""
        e = self._entries.get(key)
        return list(e.handed) if e is not None else []

    def restore_handed(self, key: bytes, handed: list[tuple[int, torch.UntypedStorage]]) -> None:
        """Undo a run of program `key`: its record of handed-out outputs becomes `handed`
        again. The undone run's outputs are gone from the session; outputs of earlier replays
        the undo put back under their ids must be copied away before the next replay."""
        e = self._entries.get(key)
        if e is not None:
            e.handed = list(handed)

    def clear(self) -> None:
        """Drop every graph (and the memory its pool holds)."""
        self._entries.clear()

    def stats(self) -> dict[str, int]:
        return {
            "cuda_graphs": len([e for e in self._entries.values() if e.graph is not None]),
            "cuda_graph_replays": self.replays,
            "cuda_graph_captures": self.captures,
            "cuda_graph_capture_failures": self.capture_failures,
        }
