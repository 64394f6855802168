"""The cost model: roofline time of a node's cost (genie.graph.ops: FLOPs and bytes per op
family) on a DeviceSpec, transfer time over the topology, queueing delay, and calibration
from measured times.

Note: [Roofline]
time = max(flops / (peak * efficiency), bytes / (bandwidth * efficiency)) + launch overhead,
with the matrix-unit peak for the dtype (matmul, conv, attention) or the vector peak for the
rest. ``GraphCostEstimator.observe`` folds measured times back in as a per (device, family)
factor, so the same roofline becomes the measured figure after a few runs (the adaptive path).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterable

from genie.graph.ir import Graph, Node
from genie.graph.ops import (
    FAMILIES,
    MATRIX_FAMILIES,
    VIEW,
    NodeCost,
    is_view,
    node_cost,
    op_family,
)
from genie.scheduler.devices import DeviceSpec

logger = logging.getLogger(__name__)

__all__ = [
    "FAMILIES",
    "MATRIX_FAMILIES",
    "NodeCost",
    "GraphCostEstimator",
    "op_family",
    "is_view",
    "node_cost",
]


class GraphCostEstimator:
    """Roofline estimates per node and device, transfer and queueing times, and calibration
    factors learnt from measured execution times (see Note: [Roofline])."""

    def __init__(
        self, calibration: dict[tuple[str, str], float] | None = None, smoothing: float = 0.5
    ):
        if not 0.0 < smoothing <= 1.0:
            raise ValueError("genie: smoothing must be in (0, 1]")
        self.smoothing = smoothing
        self._factors: dict[tuple[str, str], float] = dict(calibration or {})
        self._observations: dict[tuple[str, str], int] = {}
        self._version = 0
        self._lock = threading.Lock()

    # -- per node ------------------------------------------------------------------------
    def node_cost(self, node: Node) -> NodeCost:
        return node_cost(node)

    def roofline(self, cost: NodeCost, spec: DeviceSpec) -> float:
        """Uncalibrated roofline time of a node cost on a device, in seconds."""
        if cost.family == VIEW or (cost.flops == 0 and cost.bytes == 0):
            return 0.0  # nothing to launch (a view, an uninitialised ``empty``)
        if cost.family in MATRIX_FAMILIES:
            rate = spec.matmul_flops(cost.dtype) * spec.matmul_efficiency
        else:
            rate = spec.vector_rate() * spec.vector_efficiency
        compute = cost.flops / rate if rate > 0 else 0.0
        memory = cost.bytes / (spec.memory_bandwidth * spec.memory_efficiency)
        return max(compute, memory) + spec.launch_overhead_s

    def time(self, cost: NodeCost, spec: DeviceSpec) -> float:
        """Calibrated time of a node cost on a device, in seconds."""
        t = self.roofline(cost, spec)
        if t and self._factors:
            t *= self._factors.get((spec.name, cost.family), 1.0)
        return t

    def node_time(self, node: Node, spec: DeviceSpec) -> float:
        return self.time(node_cost(node), spec)

    # -- per graph -----------------------------------------------------------------------
    def graph_costs(self, graph: Graph) -> dict[int, NodeCost]:
        return {n.id: node_cost(n) for n in graph.nodes}

    def estimate(self, graph: Graph, spec: DeviceSpec) -> dict[str, float]:
        """Totals for running the whole graph on one device: seconds per family and overall."""
        out: dict[str, float] = {}
        for n in graph.nodes:
            c = node_cost(n)
            if c.family == VIEW:
                continue
            out[c.family] = out.get(c.family, 0.0) + self.time(c, spec)
        out["total"] = sum(out.values())
        return out

    def flops_by_family(self, graph: Graph) -> dict[str, float]:
        out: dict[str, float] = {}
        for n in graph.nodes:
            c = node_cost(n)
            out[c.family] = out.get(c.family, 0.0) + c.flops
        return out

    # -- network and queues --------------------------------------------------------------
    def transfer_time(self, nbytes: int, src: str, dst: str, topology) -> float:
        """Bytes / bandwidth + latency (+ queueing on busy links) along the topology's path."""
        return topology.transfer_time(nbytes, src, dst)

    def queueing_delay(self, device) -> float:
        """Seconds a device's known backlog delays new work (``Device.queued_s``)."""
        return float(getattr(device, "queued_s", 0.0))

    # -- calibration (the adaptive path) -------------------------------------------------
    def calibration_factor(self, spec: DeviceSpec | str, family: str) -> float:
        name = spec if isinstance(spec, str) else spec.name
        return self._factors.get((name, family), 1.0)

    @property
    def calibration(self) -> dict[tuple[str, str], float]:
        return dict(self._factors)

    @property
    def version(self) -> int:
        """Changes whenever calibration changes (part of schedule cache keys)."""
        return self._version

    def observe(
        self, family: str, spec: DeviceSpec | str, predicted_s: float, measured_s: float
    ) -> float:
        """Fold one measurement into the (device, family) factor; returns the new factor.
        `predicted_s` is the uncalibrated roofline time of the same work."""
        if predicted_s <= 0 or measured_s <= 0:
            return self.calibration_factor(spec, family)
        name = spec if isinstance(spec, str) else spec.name
        ratio = measured_s / predicted_s
        with self._lock:
            key = (name, family)
            old = self._factors.get(key)
            new = (
                ratio
                if old is None
                else math.exp(
                    (1 - self.smoothing) * math.log(old) + self.smoothing * math.log(ratio)
                )
            )
            self._factors[key] = new
            self._observations[key] = self._observations.get(key, 0) + 1
            self._version += 1
        return new

    def observe_nodes(self, nodes: Iterable[Node], spec: DeviceSpec, measured_s: float) -> None:
        """Calibrate from the measured time of several nodes run together (a fragment): the
        time is shared among families in proportion to their predicted share."""
        by_family: dict[str, float] = {}
        for n in nodes:
            c = node_cost(n)
            if c.family != VIEW:
                by_family[c.family] = by_family.get(c.family, 0.0) + self.roofline(c, spec)
        total = sum(by_family.values())
        if total <= 0:
            return
        for fam, pred in by_family.items():
            self.observe(fam, spec, pred, measured_s * pred / total)

    def calibrate(
        self, graph: Graph, measured: dict[int, float], spec: DeviceSpec
    ) -> dict[str, float]:
        """Calibrate from per-node measured seconds (node id -> s); returns the new factors
        per family for this device."""
        pred: dict[str, float] = {}
        meas: dict[str, float] = {}
        for n in graph.nodes:
            if n.id not in measured:
                continue
            c = node_cost(n)
            if c.family == VIEW:
                continue
            pred[c.family] = pred.get(c.family, 0.0) + self.roofline(c, spec)
            meas[c.family] = meas.get(c.family, 0.0) + measured[n.id]
        return {fam: self.observe(fam, spec, pred[fam], meas[fam]) for fam in pred}

    def reset_calibration(self) -> None:
        with self._lock:
            self._factors.clear()
            self._observations.clear()
            self._version += 1
