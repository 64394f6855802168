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
- Outputs live in the graph's memory pool and are handed to the session. A value the user kept
  from an earlier run must never change under them, so when a replay would overwrite outputs
  the session still holds, the program is captured a second time (its own memory pool) and
  the two graphs take turns: a serving or decode loop that holds the last step's outputs while
  it records the next one (HF's output objects often linger until Python's cycle collector
  runs) costs no copies. Outputs held across two runs, or a second capture that failed, are
  cloned away before the replay (copy on replay).
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

from genie.runtime.program.decode import Program
from genie.runtime.program.run import execute, run_step
from genie.runtime.replay import Environment
from genie.runtime.replay import byte_view as _bytes

logger = logging.getLogger(__name__)

__all__ = ["GraphRunner"]

# One capture at a time per process: capture switches the allocator of the capturing stream
# into a private pool, and concurrent captures from several sessions buy nothing.
_capture_lock = threading.Lock()


def _clone(st: torch.UntypedStorage) -> torch.UntypedStorage:
    return _bytes(st).clone().untyped_storage()


@dataclass
class _Slot:
    """One capture of a program: its graph, the storages it reads, the outputs it makes."""

    graph: torch.cuda.CUDAGraph
    static: dict[int, torch.UntypedStorage]  # input local -> the storage the graph reads
    fixed: list[int]  # inputs read in place (the session's own storage), in program.inputs order
    fixed_list: list[torch.UntypedStorage]  # their storages, in the same order
    loose: list[int]  # inputs read from a private copy the current value is copied into
    outputs: dict[int, torch.UntypedStorage]
    handed: list[tuple[int, torch.UntypedStorage]] = field(default_factory=list)


@dataclass
class _Entry:
    runs: int = 0
    failed: bool = False
    slots: list[_Slot] = field(default_factory=list)  # one capture, or two taking turns
    next: int = 0  # the slot the next replay uses
    no_spare: bool = False  # a second capture failed: held outputs are copied instead
    stable: set[int] = field(default_factory=set)
    written: list[int] = field(default_factory=list)  # inputs the program writes in place
    last_inputs: dict[int, int] = field(default_factory=dict)  # local -> id() of its storage object


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
        self.spares = 0  # second captures (Note: [CUDA graphs on the server])
        self.output_copies = 0  # held outputs cloned away before a replay

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
        if not e.slots:
            current = {local: id(env.storages[binding[local]]) for local in program.inputs}
            if e.failed or e.runs <= self.warmup:
                e.last_inputs = current
                execute(program, binding, states, env)
                return
            e.stable = {
                local for local, ident in current.items() if e.last_inputs.get(local) == ident
            }
            e.written = [local for local in program.inputs if local in set(program.produced)]
            slot = self._capture(program, binding, env, e.stable)
            if slot is None:
                e.failed = True
                execute(program, binding, states, env)
                return
            e.slots, e.next = [slot], 0
        if not self._replay(e, program, binding, env):
            execute(program, binding, states, env)

    # -- capture and replay ---------------------------------------------------------------
    def _capture(
        self, program: Program, binding: list[int], env: Environment, stable: set[int]
    ) -> _Slot | None:
        """Capture `program` as a CUDA graph reading the session's own storages for `stable`
        inputs and private copies for the others; None if it cannot be captured."""
        static: dict[int, torch.UntypedStorage] = {}
        for local in program.inputs:
            st = env.storages[binding[local]]
            static[local] = st if local in stable else _clone(st)
        frame = Environment(env.device)
        frame.storages = dict(static)
        graph = torch.cuda.CUDAGraph()
        try:
            with _capture_lock:
                with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
                    for step in program.steps:
                        run_step(step, frame)
        except Exception as err:  # noqa: BLE001 - any capture failure means "run it plainly"
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
            return None
        self.captures += 1
        logger.debug("genie: captured program %s as a CUDA graph", program.key.hex()[:12])
        return _Slot(
            graph=graph,
            static=static,
            fixed=[local for local in program.inputs if local in stable],
            fixed_list=[static[local] for local in program.inputs if local in stable],
            loose=[local for local in program.inputs if local not in stable],
            outputs={
                local: frame.storages[local]
                for local in program.produced
                if local in frame.storages and local not in static
            },
        )

    def _drop(self, e: _Entry) -> None:
        e.slots, e.next, e.written, e.no_spare = [], 0, [], False
        e.runs = 0

    def _replay(self, e: _Entry, program: Program, binding: list[int], env: Environment) -> bool:
        # The loops below run before the GPU gets the graph: common cases take C-level paths.
        storages = env.storages
        index = e.next
        slot = e.slots[index]
        # 1. Values handed out by this slot's last replay must not change under their holders:
        #    a second capture takes turns with the first, else they are copied away.
        if slot.handed:
            held = list(map(storages.get, [sid for sid, _ in slot.handed]))
            if any(map(operator.is_, held, [st for _, st in slot.handed])):
                spare = None
                if len(e.slots) == 1 and not e.no_spare:
                    spare = self._capture(program, binding, env, e.stable)
                    if spare is None:
                        e.no_spare = True
                    else:
                        self.spares += 1
                        e.slots.append(spare)
                        index, slot = 1, spare
                if spare is None:
                    for (sid, st), cur in zip(slot.handed, held, strict=True):
                        if cur is st:
                            storages[sid] = _clone(st)
                            self.output_copies += 1
            slot.handed = []
        # 2. Inputs: those captured in place must still be the captured storage; the others'
        #    values are copied into the graph's private copies (nothing to copy for an empty
        #    one: HF's DynamicCache uploads 24 of them per GPT-2 forward).
        copied = []
        current = list(map(storages.__getitem__, [binding[local] for local in slot.fixed]))
        changed = not all(map(operator.is_, current, slot.fixed_list))
        for local in () if changed else slot.loose:
            cur = storages[binding[local]]
            st = slot.static[local]
            n = st.nbytes()
            if cur.nbytes() != n:
                changed = True
                break
            if n:
                _bytes(st).copy_(_bytes(cur))
                copied.append(local)
        if changed:
            logger.debug(
                "genie: program %s: a captured input changed; dropping its graph",
                program.key.hex()[:12],
            )
            self._drop(e)
            return False
        slot.graph.replay()
        self.replays += 1
        e.next = (index + 1) % len(e.slots)
        # 3. In-place writes to private copies go back to the session's storages.
        for local in copied:
            if local in e.written:
                _bytes(storages[binding[local]]).copy_(_bytes(slot.static[local]))
        # 4. Outputs.
        slot.handed = [(binding[local], st) for local, st in slot.outputs.items()]
        storages.update(slot.handed)
        return True

    # -- speculative runs (Note: [Speculative runs] in genie/runtime/server/speculation.py) --------------
    def rename(self, mapping: dict[int, int]) -> None:
        """Storages handed out under the ids in `mapping` are now held under the ids it maps
        them to (a speculative run's temporaries adopted by the run that confirmed it)."""
        for e in self._entries.values():
            for slot in e.slots:
                if slot.handed:
                    slot.handed = [(mapping.get(sid, sid), st) for sid, st in slot.handed]

    def handed(self, key: bytes) -> tuple:
        """What program `key`'s graphs have handed out, and whose turn is next (a snapshot for
        restore_handed)."""
        e = self._entries.get(key)
        if e is None:
            return (0, [])
        return (e.next, [list(slot.handed) for slot in e.slots])

    def restore_handed(self, key: bytes, handed: tuple) -> None:
        """Undo a run of program `key`: its record of handed-out outputs becomes `handed` (a
        snapshot from ``handed``) again. The undone run's outputs are gone from the session;
        outputs of earlier replays the undo put back under their ids must be copied away (or
        left to the other graph) before the next replay."""
        e = self._entries.get(key)
        if e is None:
            return
        turn, lists = handed
        for i, slot in enumerate(e.slots):
            slot.handed = list(lists[i]) if i < len(lists) else []
        e.next = turn if turn < len(e.slots) else 0

    def clear(self) -> None:
        """Drop every graph (and the memory its pool holds)."""
        self._entries.clear()

    def stats(self) -> dict[str, int]:
        return {
            "cuda_graphs": len([e for e in self._entries.values() if e.slots]),
            "cuda_graph_replays": self.replays,
            "cuda_graph_captures": self.captures,
            "cuda_graph_capture_failures": self.capture_failures,
            "cuda_graph_spares": self.spares,
            "cuda_graph_output_copies": self.output_copies,
        }
