"""What a pattern is: a small predicate over an analysed graph that answers with a confidence
and hints for the scheduler.

Patterns compose the way ``torch.fx.passes.operator_support`` does: each check is a
``Predicate`` (a callable on the PatternContext returning bool) and ``chain`` / ``any_chain`` /
``negate`` combine them. Structural checks are NetworkX subgraph matches (``Template``:
a tiny DiGraph of op classes, matched as a monomorphism into the compute graph with
``DiGraphMatcher``); ``GENIE_FAST_PATTERNS=1`` replaces them by their cheap fallbacks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from genie.semantic.vocab import WorkloadType

if TYPE_CHECKING:
    import networkx as nx

    from genie.graph import Graph
    from genie.semantic.annotate import Annotations
    from genie.semantic.graph_utils import GraphView
    from genie.semantic.op_stats import OpStreamStats
    from genie.semantic.structure import ModelStructure

logger = logging.getLogger(__name__)

__all__ = [
    "MatchedPattern",
    "Pattern",
    "PatternContext",
    "Predicate",
    "PredicatePattern",
    "FunctionPattern",
    "Template",
    "chain",
    "any_chain",
    "negate",
    "has_op_class",
    "has_role",
    "has_modality",
    "architecture_in",
    "has_subgraph",
]

Predicate = Callable[["PatternContext"], bool]


@dataclass
class MatchedPattern:
    """A pattern found in a graph: ``MatchedPattern("llm", 0.94, {"kv_cache": True})``."""

    name: str
    confidence: float
    hints: dict[str, Any] = field(default_factory=dict)
    workload: WorkloadType | None = None  # the workload this pattern votes for, if any
    nodes: list[int] = field(default_factory=list)  # node ids that anchor the matches
    matches: int = 0  # subgraph instances found
    evidence: list[str] = field(default_factory=list)  # which checks held

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "confidence": round(float(self.confidence), 4),
            "workload": None if self.workload is None else str(self.workload),
            "matches": self.matches,
            "nodes": list(self.nodes[:64]),
            "evidence": list(self.evidence),
            "hints": self.hints,
        }

    def __repr__(self) -> str:
        return f"MatchedPattern({self.name!r}, {self.confidence:.2f}, {self.hints!r})"


@runtime_checkable
class Pattern(Protocol):
    """Anything with a unique ``name`` and ``match(ctx) -> MatchedPattern | None``."""

    name: str

    def match(self, ctx: PatternContext) -> MatchedPattern | None: ...


# -- templates: NetworkX subgraph matches ------------------------------------------------------


@dataclass(frozen=True)
class Template:
    """A small dataflow shape to find: vertices carry the op classes they accept (and
    optionally a modality), edges are direct producer -> consumer dependencies."""

    name: str
    nodes: Mapping[str, frozenset[str] | str]  # vertex -> accepted op class(es)
    edges: tuple[tuple[str, str], ...]
    anchor: str  # the vertex whose graph node identifies a match (reported in .nodes)
    modality: Mapping[str, str] = field(default_factory=dict)  # vertex -> required modality

    def digraph(self) -> nx.DiGraph:
        import networkx as nx

        g = nx.DiGraph()
        for v, cls in self.nodes.items():
            accepted = frozenset([cls]) if isinstance(cls, str) else frozenset(cls)
            g.add_node(v, vertex=v, accept=accepted, mod=self.modality.get(v))
        g.add_edges_from(self.edges)
        return g

    @property
    def classes(self) -> frozenset[str]:
        out: set[str] = set()
        for cls in self.nodes.values():
            out.update([cls] if isinstance(cls, str) else cls)
        return frozenset(out)


def _in_domain(g_attrs: dict, t_attrs: dict) -> bool:
    return t_attrs["vertex"] in g_attrs["dom"]


# -- what patterns see ---------------------------------------------------------------------------


class PatternContext:
    """The analysed graph as patterns see it: tiers 1-3 results plus cached helpers."""

    def __init__(
        self,
        graph: Graph,
        view: GraphView,
        stats: OpStreamStats,
        structure: ModelStructure,
        annotations: Annotations,
        fast: bool = False,
        max_matches: int = 256,
    ):
        self.graph = graph
        self.view = view
        self.stats = stats
        self.structure = structure
        self.annotations = annotations
        self.fast = fast
        self.max_matches = max_matches
        self._templates: dict[str, tuple[int, list[int]]] = {}
        self._by_class: dict[str, list[int]] | None = None
        self._metas: dict[int, dict] | None = None
        self._roles: dict[str, list[int]] | None = None

    # op classes, roles, modalities
    def count_class(self, *classes: str) -> int:
        h = self.stats.class_histogram
        return sum(h.get(c, 0) for c in classes)

    def nodes_with_role(self, *roles: str) -> list[int]:
        if self._roles is None:
            by: dict[str, list[int]] = {}
            for n in self.graph.nodes:
                by.setdefault(n.meta.get("semantic_role", ""), []).append(n.id)
            self._roles = by
        out: list[int] = []
        for r in roles:
            out.extend(self._roles.get(r, ()))
        return out

    def count_role(self, *roles: str) -> int:
        return len(self.nodes_with_role(*roles))

    def count_modality(self, modality: str) -> int:
        return self.annotations.modalities.get(modality, 0)

    @property
    def architecture(self) -> str:
        return self.structure.architecture

    # subgraph matching
    def find(self, template: Template) -> tuple[int, list[int]]:
        """(number of matches, up to ``max_matches``; anchor node ids) of a template.

        Note: [Template matching]
        Matching the template with ``DiGraphMatcher`` against the whole compute graph makes
        VF2 try every host vertex (syntactic checks run before ``node_match``), tens of ms
        on a 12-layer GPT-2. So candidates are narrowed first: each template vertex starts
        with the nodes of its op classes (and modality), then arc consistency removes nodes
        lacking a neighbour in the domain an edge requires, until nothing changes. VF2 then
        runs on the few candidates left, each allowed only the template vertices whose
        domain holds it. Cached per template within one analysis."""
        hit = self._templates.get(template.name)
        if hit is not None:
            return hit
        result = self._match(template)
        self._templates[template.name] = result
        return result

    def _match(self, template: Template) -> tuple[int, list[int]]:
        import networkx as nx
        from networkx.algorithms.isomorphism import DiGraphMatcher

        gv = self.view
        if self._by_class is None:
            by: dict[str, list[int]] = {}
            for nid, c in gv.cls.items():
                by.setdefault(c, []).append(nid)
            self._by_class = by
        meta = self._meta()
        domains: dict[str, set[int]] = {}
        for v, cls in template.nodes.items():
            accepted = [cls] if isinstance(cls, str) else cls
            dom = {n for c in accepted for n in self._by_class.get(c, ())}
            mod = template.modality.get(v)
            if mod is not None:
                dom = {n for n in dom if meta[n].get("modality") == mod}
            if not dom:
                return 0, []
            domains[v] = dom
        succs, preds = gv.succs, gv.preds
        changed = True
        while changed:
            changed = False
            for u, v in template.edges:
                du, dv = domains[u], domains[v]
                nu = {x for x in du if any(y in dv for y in succs[x])}
                nv = {y for y in dv if any(x in nu for x in preds[y])}
                if not nu or not nv:
                    return 0, []
                if len(nu) != len(du) or len(nv) != len(dv):
                    domains[u], domains[v] = nu, nv
                    changed = True
        allowed: dict[int, set[str]] = {}
        for v, dom in domains.items():
            for n in dom:
                allowed.setdefault(n, set()).add(v)
        host = nx.DiGraph()
        host.add_nodes_from((n, {"dom": vs}) for n, vs in allowed.items())
        host.add_edges_from((x, y) for x in allowed for y in succs[x] if y in allowed)
        count = 0
        anchors: dict[int, None] = {}
        anchor = template.anchor
        matcher = DiGraphMatcher(host, _template_graph(template), node_match=_in_domain)
        for mapping in matcher.subgraph_monomorphisms_iter():
            a = next(g for g, t in mapping.items() if t == anchor)
            if a not in anchors:
                anchors[a] = None
                count += 1
                if count >= self.max_matches:
                    break
        return count, sorted(anchors)

    def _meta(self) -> dict[int, dict]:
        if self._metas is None:
            self._metas = {n.id: n.meta for n in self.graph.nodes}
        return self._metas


_TEMPLATE_GRAPHS: dict[str, Any] = {}


def _template_graph(t: Template):
    g = _TEMPLATE_GRAPHS.get(t.name)
    if g is None:
        g = _TEMPLATE_GRAPHS[t.name] = t.digraph()
    return g


# -- predicates and combinators ------------------------------------------------------------------


def chain(*preds: Predicate) -> Predicate:
    """All of ``preds`` hold (short-circuits, like operator_support.chain)."""

    def _all(ctx: PatternContext) -> bool:
        return all(p(ctx) for p in preds)

    _all.__name__ = "chain(" + ", ".join(getattr(p, "__name__", "?") for p in preds) + ")"
    return _all


def any_chain(*preds: Predicate) -> Predicate:
    """Any of ``preds`` holds."""

    def _any(ctx: PatternContext) -> bool:
        return any(p(ctx) for p in preds)

    _any.__name__ = "any_chain(" + ", ".join(getattr(p, "__name__", "?") for p in preds) + ")"
    return _any


def negate(pred: Predicate) -> Predicate:
    def _not(ctx: PatternContext) -> bool:
        return not pred(ctx)

    _not.__name__ = f"not {getattr(pred, '__name__', '?')}"
    return _not


def has_op_class(*classes: str, at_least: int = 1) -> Predicate:
    def p(ctx: PatternContext) -> bool:
        return ctx.count_class(*classes) >= at_least

    p.__name__ = f"ops[{'|'.join(classes)}]>={at_least}"
    return p


def has_role(*roles: str, at_least: int = 1) -> Predicate:
    def p(ctx: PatternContext) -> bool:
        return ctx.count_role(*roles) >= at_least

    p.__name__ = f"roles[{'|'.join(roles)}]>={at_least}"
    return p


def has_modality(modality: str, at_least: int = 1) -> Predicate:
    def p(ctx: PatternContext) -> bool:
        return ctx.count_modality(modality) >= at_least

    p.__name__ = f"modality[{modality}]>={at_least}"
    return p


def architecture_in(*archs: str) -> Predicate:
    def p(ctx: PatternContext) -> bool:
        return ctx.architecture in archs

    p.__name__ = f"architecture in {'|'.join(archs)}"
    return p


def has_subgraph(
    *templates: Template, at_least: int = 1, fallback: Predicate | None = None
) -> Predicate:
    """Some template matches at least ``at_least`` times. Under GENIE_FAST_PATTERNS the
    ``fallback`` predicate answers instead (False when there is none)."""

    def p(ctx: PatternContext) -> bool:
        if ctx.fast:
            return fallback(ctx) if fallback is not None else False
        return sum(ctx.find(t)[0] for t in templates) >= at_least

    p.__name__ = f"subgraph[{'|'.join(t.name for t in templates)}]>={at_least}"
    return p


# -- pattern classes ---------------------------------------------------------------------------


class PredicatePattern:
    """A pattern made of predicates: ``requires`` must hold; each satisfied ``evidence``
    (predicate, weight) adds its weight to ``base``; confidence is capped at 0.99.
    ``templates`` are matched (outside fast mode) to report where the pattern occurs;
    ``hints`` maps the context to scheduler hints."""

    def __init__(
        self,
        name: str,
        requires: Predicate,
        evidence: Iterable[tuple[Predicate, float]] = (),
        base: float = 0.5,
        workload: WorkloadType | None = None,
        templates: Iterable[Template] = (),
        hints: Callable[[PatternContext], dict[str, Any]] | None = None,
        anchor_roles: Iterable[str] = (),
        anchors: Callable[[PatternContext], list[int]] | None = None,
        description: str = "",
    ):
        self.name = name
        self.requires = requires
        self.evidence = list(evidence)
        self.base = base
        self.workload = workload
        self.templates = list(templates)
        self.hints = hints
        self.anchor_roles = tuple(anchor_roles)
        self.anchors = anchors
        self.description = description

    def match(self, ctx: PatternContext) -> MatchedPattern | None:
        if not self.requires(ctx):
            return None
        conf = self.base
        held = [getattr(self.requires, "__name__", "requires")]
        for pred, weight in self.evidence:
            if pred(ctx):
                conf += weight
                held.append(getattr(pred, "__name__", "?"))
        count, nodes = 0, []
        if not ctx.fast:
            for t in self.templates:
                c, ids = ctx.find(t)
                count += c
                nodes.extend(ids)
        if not nodes and self.anchors is not None:
            nodes = list(self.anchors(ctx))
            count = count or len(nodes)
        if not nodes and self.anchor_roles:
            nodes = ctx.nodes_with_role(*self.anchor_roles)
            count = count or len(nodes)
        hints = self.hints(ctx) if self.hints is not None else {}
        return MatchedPattern(
            self.name, min(conf, 0.99), hints, self.workload, sorted(nodes), count, held
        )

    def __repr__(self) -> str:
        return f"PredicatePattern({self.name!r})"


class FunctionPattern:
    """Wraps ``fn(ctx) -> MatchedPattern | float | None`` as a pattern (a float is the
    confidence; 0 or None means no match)."""

    def __init__(
        self, name: str, fn: Callable[[PatternContext], Any], workload: WorkloadType | None = None
    ):
        self.name = name
        self.fn = fn
        self.workload = workload

    def match(self, ctx: PatternContext) -> MatchedPattern | None:
        out = self.fn(ctx)
        if out is None or out is False:
            return None
        if isinstance(out, MatchedPattern):
            return out
        conf = float(out)
        return MatchedPattern(self.name, conf, {}, self.workload) if conf > 0 else None

    def __repr__(self) -> str:
        return f"FunctionPattern({self.name!r})"
