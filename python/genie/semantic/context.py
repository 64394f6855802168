"""Tier 3 plumbing: which module was running when each op was recorded.

Note: [Module context ids]
The C++ recorder stamps every node with one process-wide integer, the current context id
(``genie._C._set_context`` / ``_current_context``); it never calls back into Python per op.
ModuleContextTracker installs forward pre/post hooks that push and pop a stack of module
invocations and set that integer on entry and restore the caller's on exit, so a hook costs
two Python calls per *module call*, not per op. The meaning of each id -- module path, type,
depth, call index -- lives here, in the process-wide ContextTable.

Ids are interned: the same module reached the same way (same root, path, type, depth, call
index within the top-level call and parent) gets the same id every time, so recording the
same model twice yields identical context columns and the table stays as small as the set
of distinct module invocations. Id 0 means "no module".
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass

import torch

from genie import _C

logger = logging.getLogger(__name__)

__all__ = ["ModuleContext", "ContextTable", "ModuleContextTracker", "context_table"]

_LAYER_INDEX = re.compile(r"\.(\d+)(?:\.|$)")


@dataclass(frozen=True)
class ModuleContext:
    """One module invocation as the recorder saw it."""

    id: int
    path: str  # dotted path from the tracked root; "" is the root itself
    type: str  # the module's class name
    depth: int  # 0 for the root, 1 for its children...
    call_index: int  # how many times this path ran before, within the same top-level call
    parent: int  # the enclosing context id (0 at the root)
    root: str  # label of the tracked root (its class name unless given)

    @property
    def layer_index(self) -> int | None:
        """The index of the innermost repeated block on the path (``h.3.attn`` -> 3)."""
        found = _LAYER_INDEX.findall(self.path)
        return int(found[-1]) if found else None

    @property
    def name(self) -> str:
        """The last component of the path (the attribute name in the parent module)."""
        return self.path.rsplit(".", 1)[-1]


class ContextTable:
    """Process-wide map from context id to ModuleContext.

    Lifetime: one per process (``context_table()``), created at first use and never cleared,
    because ids already stamped on pending nodes must keep their meaning. It grows only with
    the number of distinct module invocations, not with the number of calls.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_key: dict[tuple, int] = {}
        self._by_id: dict[int, ModuleContext] = {}

    def intern(
        self, root: str, path: str, type_name: str, depth: int, call_index: int, parent: int
    ) -> int:
        key = (root, path, type_name, depth, call_index, parent)
        cid = self._by_key.get(key)
        if cid is not None:
            return cid
        with self._lock:
            cid = self._by_key.get(key)
            if cid is None:
                cid = len(self._by_id) + 1
                self._by_id[cid] = ModuleContext(
                    cid, path, type_name, depth, call_index, parent, root
                )
                self._by_key[key] = cid
        return cid

    def get(self, cid: int) -> ModuleContext | None:
        return self._by_id.get(cid)

    def chain(self, cid: int) -> list[ModuleContext]:
        """The context and its ancestors, innermost first."""
        out = []
        ctx = self._by_id.get(cid)
        while ctx is not None:
            out.append(ctx)
            ctx = self._by_id.get(ctx.parent)
        return out

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, cid: int) -> bool:
        return cid in self._by_id


_TABLE = ContextTable()


def context_table() -> ContextTable:
    """The process-wide ContextTable (see Note: [Module context ids])."""
    return _TABLE


class ModuleContextTracker:
    """Stamps recorded ops with the module that issued them.

    ::

        with ModuleContextTracker(model):
            out = model(x)                # every node recorded now carries node.context
        graph = genie.get_graph()

    The tracker keeps a stack of module invocations; entering a module sets the recorder's
    context to that invocation's id and leaving restores whatever was current before, so
    contexts nest and survive exceptions. Context is process-wide: do not run two tracked
    forwards concurrently on different threads.
    """

    def __init__(
        self, model: torch.nn.Module, name: str | None = None, table: ContextTable | None = None
    ):
        self.model = model
        self.root = name or type(model).__name__
        self.table = table or _TABLE
        self._handles: list = []
        self._stack: list[tuple[int, int]] = []  # (context id, context to restore)
        self._calls: dict[str, int] = {}
        self.contexts: set[int] = set()
        self.calls = 0  # top-level calls seen

    # -- installation -----------------------------------------------------------------------
    def install(self) -> ModuleContextTracker:
        if self._handles:
            return self
        for path, module in self.model.named_modules():
            depth = 0 if not path else path.count(".") + 1
            pre, post = self._make_hooks(path, type(module).__name__, depth)
            self._handles.append(module.register_forward_pre_hook(pre))
            self._handles.append(module.register_forward_hook(post, always_call=True))
        logger.debug(
            "context tracker: hooks on %d modules of %s", len(self._handles) // 2, self.root
        )
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        while self._stack:  # a forward interrupted between hooks: restore the outer context
            _C._set_context(self._stack.pop()[1])

    @property
    def installed(self) -> bool:
        return bool(self._handles)

    def __enter__(self) -> ModuleContextTracker:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.remove()

    # -- hooks --------------------------------------------------------------------------------
    def _make_hooks(self, path: str, type_name: str, depth: int):
        stack = self._stack
        calls = self._calls
        intern = self.table.intern
        root = self.root
        contexts = self.contexts
        set_context = _C._set_context
        current = _C._current_context

        def pre(module, args):
            if not stack:
                calls.clear()
                self.calls += 1
            index = calls.get(path, 0)
            calls[path] = index + 1
            parent = stack[-1][0] if stack else 0
            cid = intern(root, path, type_name, depth, index, parent)
            contexts.add(cid)
            stack.append((cid, current()))
            set_context(cid)

        def post(module, args, output):
            if stack:
                set_context(stack.pop()[1])

        return pre, post

    def __repr__(self) -> str:
        state = "installed" if self._handles else "idle"
        return f"ModuleContextTracker({self.root}, {state}, contexts={len(self.contexts)})"
