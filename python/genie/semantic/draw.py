"""A picture of an annotated graph, for a person: ``genie analyze ... --draw graph.svg``.

One column per layer (nodes with the same ``layer_index``; nodes outside any numbered layer
are grouped by execution phase: embedding before the layers, the head after), top to bottom
in program order. Consecutive ops of one role in a column are one box (``ffn_up x2``), so a
transformer layer reads as a dozen boxes, not two hundred ops. Colour is the execution phase
(or the semantic role, ``color_by="role"``) with a legend; a red border marks a fusion point
(where modalities meet), a ``KV`` badge a stateful KV-cache value, a dashed border ops that
read resident weights only through views. Lines join boxes of different columns that
exchange data -- what would travel if the columns ran on different devices. Plain SVG: no
plotting library needed.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from html import escape
from typing import TYPE_CHECKING

from genie.semantic.graph_utils import GraphView, OpClass
from genie.semantic.vocab import Residency

if TYPE_CHECKING:
    from genie.semantic.profile import WorkloadProfile

__all__ = ["layout", "render_svg", "write_svg"]

_PALETTE = (
    "#4e79a7",
    "#f28e2b",
    "#59a14f",
    "#e15759",
    "#76b7b2",
    "#edc948",
    "#b07aa1",
    "#ff9da7",
    "#9c755f",
    "#bab0ac",
    "#86bcb6",
    "#d37295",
    "#a0cbe8",
    "#ffbe7d",
    "#8cd17d",
    "#f1ce63",
    "#499894",
    "#d4a6c8",
    "#fabfd2",
    "#79706e",
)
_BOX_W, _BOX_H, _GAP_Y, _COL_GAP, _TOP = 132, 18, 4, 46, 64
_SKIP = {OpClass.VIEW}


@dataclass
class _Box:
    label: str  # the role (or phase) shown
    color_key: str
    nodes: list[int] = field(default_factory=list)
    fusion: bool = False
    kv: bool = False
    col: int = 0
    row: int = 0


def _group_of(meta: dict, seen_layers: bool) -> str:
    li = meta.get("layer_index")
    if li is not None:
        return f"layer {li}"
    phase = meta.get("execution_phase", "forward")
    if phase in ("embedding", "setup"):
        return phase
    return ("after layers: " if seen_layers else "") + phase


def layout(
    profile: WorkloadProfile, color_by: str = "phase"
) -> tuple[list[str], list[_Box], list[tuple[int, int]]]:
    """(column titles, boxes, links between boxes of different columns) of the graph."""
    graph = profile.graph
    gv = GraphView(graph)
    columns: OrderedDict[str, list[_Box]] = OrderedDict()
    box_of: dict[int, _Box] = {}
    seen_layers = False
    fusion = set(profile.metadata.get("fusion_points", ()))
    for n in graph.nodes:
        if gv.cls[n.id] in _SKIP or n.id in gv.views:
            continue
        meta = n.meta
        seen_layers = seen_layers or meta.get("layer_index") is not None
        col = _group_of(meta, seen_layers)
        role = meta.get("semantic_role", gv.cls[n.id])
        key = meta.get("execution_phase", "forward") if color_by == "phase" else role
        boxes = columns.setdefault(col, [])
        last = boxes[-1] if boxes else None
        if last is None or last.label != role or last.color_key != key or n.id in fusion:
            last = _Box(role, key)
            boxes.append(last)
        last.nodes.append(n.id)
        last.fusion = last.fusion or n.id in fusion
        last.kv = last.kv or meta.get("data_residency") == Residency.STATEFUL_KV_CACHE
        box_of[n.id] = last
    out: list[_Box] = []
    for c, boxes in enumerate(columns.values()):
        for r, b in enumerate(boxes):
            b.col, b.row = c, r
            out.append(b)
    # edges between boxes of different columns
    links: set[tuple[int, int]] = set()
    index = {id(b): i for i, b in enumerate(out)}
    for p, c in gv.edges:
        bp, bc = box_of.get(p), box_of.get(c)
        if bp is not None and bc is not None and bp.col != bc.col:
            links.add((index[id(bp)], index[id(bc)]))
    return list(columns), out, sorted(links)


def render_svg(profile: WorkloadProfile, title: str = "", color_by: str = "phase") -> str:
    """The picture as SVG text."""
    titles, boxes, links = layout(profile, color_by)
    keys = list(OrderedDict.fromkeys(b.color_key for b in boxes))
    color = {k: _PALETTE[i % len(_PALETTE)] for i, k in enumerate(keys)}
    rows = max((b.row for b in boxes), default=0) + 1
    legend_w = 190
    width = max(len(titles), 1) * (_BOX_W + _COL_GAP) + legend_w + 20
    height = max(_TOP + rows * (_BOX_H + _GAP_Y) + 20, _TOP + 24 * (len(keys) + 4))

    def xy(b: _Box) -> tuple[int, int]:
        return 10 + b.col * (_BOX_W + _COL_GAP), _TOP + b.row * (_BOX_H + _GAP_Y)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="10">',
        '<rect width="100%" height="100%" fill="white"/>',
        f'<text x="10" y="18" font-size="14" font-weight="bold">{escape(title)}</text>',
        f'<text x="10" y="34" fill="#555">{escape(_subtitle(profile))}</text>',
    ]
    for c, t in enumerate(titles):
        x = 10 + c * (_BOX_W + _COL_GAP)
        out.append(f'<text x="{x}" y="{_TOP - 8}" font-weight="bold">{escape(t)}</text>')
    for a, b in links:
        (x1, y1), (x2, y2) = xy(boxes[a]), xy(boxes[b])
        if boxes[a].col < boxes[b].col:
            x1 += _BOX_W
        else:
            x2 += _BOX_W
        y1 += _BOX_H // 2
        y2 += _BOX_H // 2
        mx = (x1 + x2) // 2
        out.append(
            f'<path d="M{x1},{y1} C{mx},{y1} {mx},{y2} {x2},{y2}" fill="none" '
            f'stroke="#999" stroke-width="0.8" opacity="0.7"/>'
        )
    for b in boxes:
        x, y = xy(b)
        stroke = (
            ' stroke="#d00" stroke-width="2.5"' if b.fusion else ' stroke="#333" stroke-width="0.5"'
        )
        n = len(b.nodes)
        label = b.label + (f" x{n}" if n > 1 else "")
        out.append(
            f"<g><title>{escape(b.label)}: nodes {b.nodes[:12]}</title>"
            f'<rect x="{x}" y="{y}" width="{_BOX_W}" height="{_BOX_H}" rx="3" '
            f'fill="{color[b.color_key]}"{stroke}/>'
            f'<text x="{x + 4}" y="{y + 12}" fill="white">{escape(label[:24])}</text>'
        )
        if b.kv:
            out.append(
                f'<text x="{x + _BOX_W - 18}" y="{y + 12}" fill="#ff0" font-weight="bold">KV</text>'
            )
        if b.fusion:
            out.append(f'<text x="{x + _BOX_W + 3}" y="{y + 12}" fill="#d00">fusion</text>')
        out.append("</g>")
    lx = width - legend_w
    out.append(f'<text x="{lx}" y="{_TOP - 8}" font-weight="bold">colour = {color_by}</text>')
    for i, k in enumerate(keys):
        y = _TOP + i * 20
        out.append(
            f'<rect x="{lx}" y="{y}" width="14" height="14" fill="{color[k]}"/>'
            f'<text x="{lx + 20}" y="{y + 11}">{escape(k)}</text>'
        )
    y = _TOP + len(keys) * 20 + 10
    out.append(
        f'<rect x="{lx}" y="{y}" width="14" height="14" fill="white" stroke="#d00" '
        f'stroke-width="2.5"/><text x="{lx + 20}" y="{y + 11}">fusion point</text>'
    )
    out.append(
        f'<text x="{lx}" y="{y + 32}" fill="#c90" font-weight="bold">KV</text>'
        f'<text x="{lx + 20}" y="{y + 32}">stateful KV cache</text>'
    )
    out.append(
        f'<path d="M{lx},{y + 50} L{lx + 14},{y + 50}" stroke="#999"/>'
        f'<text x="{lx + 20}" y="{y + 53}">data between layers</text>'
    )
    out.append("</svg>")
    return "\n".join(out)


def _subtitle(profile: WorkloadProfile) -> str:
    md = profile.metadata
    return (
        f"{profile.workload_type} ({profile.confidence:.2f}), call phase {profile.call_phase}, "
        f"{md.get('nodes', 0)} nodes, architecture {md.get('architecture')}, "
        f"weights {md.get('weight_bytes', 0) / 1e6:.2f} MB"
    )


def write_svg(
    profile: WorkloadProfile, path: str, title: str = "", color_by: str = "phase"
) -> None:
    """Write the picture of ``profile``'s annotated graph to ``path`` (SVG)."""
    with open(path, "w") as f:
        f.write(render_svg(profile, title, color_by))
