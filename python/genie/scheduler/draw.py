"""Pictures of a schedule: a Gantt chart of stages per device (servers named by their
endpoints), the plan's transfers between them with their sizes, and the placed graph (PNG).

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
        _draw_transfers(ax, schedule, plan, ypos, scale)
    ax.set_yticks(range(len(devices)))
    ax.set_yticklabels([_device_label(schedule, d) for d in devices])
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
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    logger.info("genie: schedule drawn to %s", path)
    return path


def _device_label(schedule: ExecutionSchedule, name: str) -> str:
    """A device's name, and the server answering for it when the topology has one."""
    topo = schedule.topology
    dev = topo.devices.get(name) if topo is not None else None
    endpoint = getattr(dev, "endpoint", None)
    return f"{name}\n{endpoint.removeprefix('tcp://')}" if endpoint else name


def _draw_transfers(ax, schedule: ExecutionSchedule, plan, ypos: dict, scale: float) -> None:
    """The transfers that leave one fragment for one device as one arrow, drawn when the
    fragment ends and labelled with their total size (the largest arrows when there are
    many), and what crosses each link in total (uploads from the client too) in a box."""
    from genie.scheduler.placement import format_bytes

    node_end = {nid: t[1] for nid, t in schedule.node_times.items()}
    arrows: dict[tuple, list[int]] = {}  # (source fragment, source, destination) -> [n, bytes]
    for t in plan.transfers:
        a = arrows.setdefault((t.src_fragment, t.src_device, t.dst_device), [0, 0])
        a[0] += 1
        a[1] += t.nbytes
    labelled = set(sorted(arrows, key=lambda k: -arrows[k][1])[:_MAX_LABELS])
    for key, (count, nbytes) in arrows.items():
        frag, src, dst = key
        x = 0.0  # a resident input, moved before anything runs
        if frag is not None:
            src_nodes = plan.fragments[frag].node_ids
            x = max((node_end.get(n, 0.0) for n in src_nodes), default=0.0) * scale
        y0, y1 = ypos[src], ypos[dst]
        ax.annotate(
            "",
            xy=(x, y1),
            xytext=(x, y0),
            arrowprops={"arrowstyle": "->", "color": "red", "lw": 0.8},
        )
        if key in labelled:
            ax.annotate(
                format_bytes(nbytes, 1) + (f" ({count})" if count > 1 else ""),
                xy=(x, (y0 + y1) / 2),
                xytext=(3, 0),
                textcoords="offset points",
                fontsize=7,
                color="red",
                va="center",
            )
    moves = plan.moves()
    if moves:
        text = "\n".join(
            f"{m['src']} \u2192 {m['dst']}: {m['count']} "
            f"{'upload' if m['src'] == 'client' else 'transfer'}{'s' if m['count'] != 1 else ''}, "
            f"{format_bytes(m['bytes'], 1)}"
            for m in moves
        )
        ax.text(
            1.01,
            1.0,
            text,
            transform=ax.transAxes,
            fontsize=8,
            va="top",
            ha="left",
            family="monospace",
            bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": "0.6"},
        )


_MAX_LABELS = 24  # arrows labelled with their size; the box has every link's total


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
