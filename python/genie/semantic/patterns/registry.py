"""One registry for every pattern: built-ins, entry-point plugins, environment plugins.

Like vLLM's connector factory, the registry loads lazily -- built-ins and plugins are
imported the first time patterns are asked for -- and refuses a second pattern under a name
already taken. Plugins come from the ``genie.patterns`` entry-point group and from
``GENIE_PATTERN_PLUGINS="pkg.mod:Class,pkg.mod:factory"``. An entry may name a pattern
class (instantiated without arguments), a pattern instance, or a factory returning a pattern
or an iterable of patterns. A plugin that fails to import, to build, or that collides with a
registered name is logged, recorded in ``plugin_errors`` and skipped; the rest still load.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from genie.semantic.patterns.base import FunctionPattern, MatchedPattern, Pattern, PatternContext
from genie.semantic.vocab import WorkloadType

logger = logging.getLogger(__name__)

__all__ = [
    "PatternRegistry",
    "PluginError",
    "default_registry",
    "register_pattern",
    "ENTRY_POINT_GROUP",
    "PLUGINS_ENV",
]

ENTRY_POINT_GROUP = "genie.patterns"
PLUGINS_ENV = "GENIE_PATTERN_PLUGINS"


@dataclass(frozen=True)
class PluginError:
    """A plugin that was skipped: where it came from, what it named, why."""

    source: str  # "entry_point" | "env" | "match"
    target: str
    error: str

    def __str__(self) -> str:
        return f"{self.source} {self.target}: {self.error}"


class PatternRegistry:
    """Named patterns, loaded on first use.

    ``builtins`` and ``plugins`` choose what the first use loads; ``env`` (default
    ``os.environ``) is where ``GENIE_PATTERN_PLUGINS`` is read.
    """

    def __init__(
        self, builtins: bool = True, plugins: bool = True, env: dict[str, str] | None = None
    ):
        self._lock = threading.RLock()
        self._patterns: dict[str, Any] = {}
        self._origin: dict[str, str] = {}
        self._want_builtins = builtins
        self._want_plugins = plugins
        self._env = env
        self._loaded = False
        self.plugin_errors: list[PluginError] = []

    # -- registration ---------------------------------------------------------------------------
    def register(self, pattern: Any, *, origin: str = "user") -> Any:
        """Add a pattern; ValueError if its name is taken or it is not a pattern."""
        _check(pattern)
        self._ensure_loaded()
        with self._lock:
            if pattern.name in self._patterns:
                raise ValueError(
                    f"genie: a pattern named {pattern.name!r} is already registered "
                    f"(from {self._origin[pattern.name]}); pick another name"
                )
            self._patterns[pattern.name] = pattern
            self._origin[pattern.name] = origin
        return pattern

    def unregister(self, name: str) -> None:
        with self._lock:
            self._patterns.pop(name, None)
            self._origin.pop(name, None)

    def get(self, name: str) -> Any:
        self._ensure_loaded()
        return self._patterns[name]

    def __contains__(self, name: str) -> bool:
        self._ensure_loaded()
        return name in self._patterns

    def names(self) -> list[str]:
        self._ensure_loaded()
        return list(self._patterns)

    def patterns(self) -> list[Any]:
        self._ensure_loaded()
        with self._lock:
            return list(self._patterns.values())

    def origin(self, name: str) -> str:
        return self._origin[name]

    # -- loading ----------------------------------------------------------------------------------
    def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        with self._lock:
            if self._loaded:
                return
            self._loaded = True
            if self._want_builtins:
                from genie.semantic.patterns.builtin import builtin_patterns

                for p in builtin_patterns():
                    if p.name not in self._patterns:
                        self.register(p, origin="builtin")
            if self._want_plugins:
                self.load_plugins()

    def load_plugins(self) -> list[str]:
        """Load entry-point and environment plugins now; returns the names registered."""
        added: list[str] = []
        for source, target, loader in self._plugin_sources():
            try:
                obj = loader()
                found = _instantiate(obj)
            except Exception as exc:  # noqa: BLE001 - a broken plugin must not stop analysis
                self._skip(source, target, f"{type(exc).__name__}: {exc}")
                continue
            for p in found:
                try:
                    self.register(p, origin=f"{source} {target}")
                    added.append(p.name)
                except (ValueError, TypeError) as exc:
                    self._skip(source, target, str(exc))
        if added:
            logger.info("genie: pattern plugins loaded: %s", ", ".join(added))
        return added

    def _plugin_sources(self) -> Iterable[tuple[str, str, Callable[[], Any]]]:
        from importlib.metadata import entry_points

        try:
            eps = list(entry_points(group=ENTRY_POINT_GROUP))
        except Exception as exc:  # noqa: BLE001 - broken metadata on sys.path
            self._skip("entry_point", ENTRY_POINT_GROUP, f"{type(exc).__name__}: {exc}")
            eps = []
        for ep in eps:
            yield "entry_point", f"{ep.name}={ep.value}", ep.load
        env = os.environ if self._env is None else self._env
        spec = env.get(PLUGINS_ENV, "")
        for item in (s.strip() for s in spec.split(",")):
            if item:
                yield "env", item, (lambda item=item: _load_spec(item))

    def _skip(self, source: str, target: str, error: str) -> None:
        err = PluginError(source, target, error)
        self.plugin_errors.append(err)
        logger.warning("genie: pattern plugin skipped: %s", err)

    # -- matching ---------------------------------------------------------------------------------
    def match_all(
        self, ctx: PatternContext, timings: dict[str, float] | None = None
    ) -> list[MatchedPattern]:
        """Run every pattern; sorted by confidence. A pattern that raises is reported in
        ``plugin_errors`` (source "match") and skipped. ``timings``, when given, receives
        each pattern's time in ms."""
        out: list[MatchedPattern] = []
        for p in self.patterns():
            t0 = time.perf_counter() if timings is not None else 0.0
            try:
                m = p.match(ctx)
            except Exception as exc:  # noqa: BLE001 - one bad pattern must not stop analysis
                err = f"{type(exc).__name__}: {exc}"
                if not any(
                    e.source == "match" and e.target == p.name and e.error == err
                    for e in self.plugin_errors
                ):
                    self._skip("match", p.name, err)
                continue
            finally:
                if timings is not None:
                    timings[p.name] = (time.perf_counter() - t0) * 1e3
            if m is not None:
                if m.workload is None and getattr(p, "workload", None) is not None:
                    m.workload = p.workload
                out.append(m)
        out.sort(key=lambda m: -m.confidence)
        return out

    def __repr__(self) -> str:
        state = f"{len(self._patterns)} patterns" if self._loaded else "not loaded"
        return f"PatternRegistry({state})"


def _check(pattern: Any) -> None:
    if not isinstance(getattr(pattern, "name", None), str) or not pattern.name:
        raise TypeError(f"genie: {pattern!r} is not a pattern: it needs a non-empty str .name")
    if not callable(getattr(pattern, "match", None)):
        raise TypeError(f"genie: pattern {pattern.name!r} has no match(ctx) method")


def _instantiate(obj: Any) -> list[Any]:
    """Turn what a plugin entry names into patterns."""
    if isinstance(obj, type):
        obj = obj()
    elif not isinstance(obj, Pattern) and callable(obj):
        obj = obj()
    if isinstance(obj, Pattern) or (hasattr(obj, "name") and hasattr(obj, "match")):
        return [obj]
    if isinstance(obj, Iterable) and not isinstance(obj, (str, bytes)):
        items = list(obj)
        for it in items:
            _check(it)
        return items
    raise TypeError(f"plugin produced {type(obj).__name__}, not a pattern")


def _load_spec(spec: str) -> Any:
    if ":" not in spec:
        raise ValueError(f"expected 'module:attribute', got {spec!r}")
    mod, _, attr = spec.partition(":")
    obj: Any = importlib.import_module(mod)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


_DEFAULT: PatternRegistry | None = None
_DEFAULT_LOCK = threading.Lock()


def default_registry() -> PatternRegistry:
    """The process-wide registry ``SemanticAnalyzer()`` uses unless given another; created on
    first use, lives for the process."""
    global _DEFAULT
    if _DEFAULT is None:
        with _DEFAULT_LOCK:
            if _DEFAULT is None:
                _DEFAULT = PatternRegistry()
    return _DEFAULT


def register_pattern(
    pattern: Any = None,
    *,
    name: str | None = None,
    workload: WorkloadType | None = None,
    registry: PatternRegistry | None = None,
) -> Any:
    """Register a pattern in the default registry (or ``registry``).

    Accepts a pattern instance, a pattern class (instantiated without arguments) or a plain
    function ``fn(ctx) -> MatchedPattern | float | None`` (named ``name`` or its own name);
    usable as a decorator with or without arguments. Duplicate names raise ValueError.
    """

    def do(obj: Any) -> Any:
        reg = registry or default_registry()
        if isinstance(obj, type):
            reg.register(obj())
        elif hasattr(obj, "match") and hasattr(obj, "name"):
            reg.register(obj)
        elif callable(obj):
            reg.register(FunctionPattern(name or obj.__name__, obj, workload))
        else:
            raise TypeError(f"genie: cannot register {obj!r} as a pattern")
        return obj

    if pattern is None:
        return do
    return do(pattern)
