"""Pictures of a schedule: a Gantt chart of stages per device and the placed graph (PNG).

Needs matplotlib (an optional dependency); without it ``draw_schedule`` raises a
SchedulingError that says so.
"""

from __future__ import annotations

import logging
import os

from genie.graph.ir import Graph
from genie.scheduler.errors import SchedulingError
from genie.scheduler.schedule import ExecutionSchedule

logger = logging.getLogger(__name__)

__all__ = ["draw_schedule"]


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        raise SchedulingError(
            "genie: drawing a schedule needs matplotlib, which is not installed "
            "(pip install matplotlib)"
        ) from None
    return plt


def draw_schedule(
    schedule: ExecutionSchedule,
    path: str | os.PathLike,
    graph: Graph | None = None,
    *,
    plan=None,
    max_nodes: int = 2000,
) -> str:
    """Write a PNG: on top, each device's groups over estimated time, coloured by stage
    (transfers of `plan`, when given, as arrows); below, when `graph` is given, the graph
    laid out by dependency level with nodes coloured by device. Returns the path."""
    plt = _pyplot()
    import matplotlib

    rows = 2 if graph is not None else 1
    fig, axes = plt.subplots(rows, 1, figsize=(12, 4 + 4 * (rows - 1)), squeeze=False)
    ax = axes[0][0]
    devices = schedule.devices
    ypos = {d: i for i, d in enumerate(devices)}
    cmap = matplotlib.colormaps["tab20"]
    scale = 1e3  # ms
    for g in schedule.groups:
        if not g.node_ids:
            continue
        width = max((g.end - g.start) * scale, 1e-6)
        ax.barh(
            ypos[g.device],
            width,
            left=g.start * scale,
            height=0.6,
            color=cmap(g.stage % 20),
            edgecolor="black",
            linewidth=0.3,
        )
    if plan is not None:
        frag_dev = {f.id: f.device for f in plan.fragments}
        node_end = {nid: t[1] for nid, t in schedule.node_times.items()}
        for t in plan.transfers:
            if t.src_fragment is None:
                continue
            src_nodes = plan.fragments[t.src_fragment].node_ids
            x = max((node_end.get(n, 0.0) for n in src_nodes), default=0.0) * scale
            ax.annotate(
                "",
                xy=(x, ypos[t.dst_device]),
                xytext=(x, ypos[frag_dev[t.src_fragment]]),
                arrowprops={"arrowstyle": "->", "color": "red", "lw": 0.6},
            )
    ax.set_yticks(range(len(devices)))
    ax.set_yticklabels(devices)
    ax.set_xlabel("estimated time (ms)")
    ax.set_title(
        f"strategy {schedule.strategy}: {len(schedule.stages)} stages, "
        f"estimated {schedule.makespan * 1e3:.3f} ms"
    )
    ax.set_xlim(left=0)
    ax.invert_yaxis()
    if graph is not None:
        _draw_graph(axes[1][0], schedule, graph, max_nodes)
    fig.tight_layout()
    path = os.fspath(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    logger.info("genie: schedule drawn to %s", path)
    return path


def _draw_graph(ax, schedule: ExecutionSchedule, graph: Graph, max_nodes: int) -> None:
    import matplotlib

    from genie.scheduler.analysis import GraphAnalysis

    A = GraphAnalysis.of(graph)
    n = min(len(A.cnodes), max_nodes)
    tab10 = matplotlib.colormaps["tab10"]
    colors = {d: tab10(i % 10) for i, d in enumerate(schedule.devices)}
    per_level: dict[int, int] = {}
    xy = []
    for ci in range(n):
        lv = A.level[ci]
        k = per_level.get(lv, 0)
        per_level[lv] = k + 1
        xy.append((lv, k))
    for ci in range(n):
        for p in A.preds[ci]:
            if p < n:
                ax.plot([xy[p][0], xy[ci][0]], [xy[p][1], xy[ci][1]], color="0.8", lw=0.4, zorder=1)
    for d in schedule.devices:
        pts = [xy[ci] for ci in range(n) if schedule.placement.get(A.cnodes[ci].id) == d]
        if pts:
            ax.scatter(
                [p[0] for p in pts], [p[1] for p in pts], s=12, color=colors[d], label=d, zorder=2
            )
    rec = [ci for ci in range(n) if A.cnodes[ci].id in schedule.recompute]
    if rec:
        ax.scatter(
            [xy[c][0] for c in rec],
            [xy[c][1] for c in rec],
            s=40,
            facecolors="none",
            edgecolors="red",
            label="recomputed",
            zorder=3,
        )
    ax.set_xlabel("dependency level")
    ax.set_yticks([])
    ax.set_title(f"placed graph ({n} computing nodes)")
    ax.legend(loc="upper right", fontsize=8)
