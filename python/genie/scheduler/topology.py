"""The network: devices (and the client) as nodes, links with bandwidth and latency as edges.

A topology comes from code (``add_device`` / ``add_link``), a dict, or a TOML file (the
format: topology_file.py).

Transfers between nodes without a direct link follow the fastest path (networkx Dijkstra);
their bandwidth is the path's bottleneck and their latency the sum over hops.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Any

from genie.scheduler.devices import GIGA, DeviceSpec
from genie.scheduler.errors import TopologyError
from genie.scheduler.topology_file import (
    apply_overrides,
    topology_from_dict,
    topology_from_file,
    topology_to_dict,
)

logger = logging.getLogger(__name__)

__all__ = ["Device", "Link", "NetworkTopology", "PathInfo", "LINK_PRESETS"]

#: Typical links: (bandwidth bytes/s per direction, latency s).
LINK_PRESETS: dict[str, tuple[float, float]] = {
    # Latencies include what one device-to-device copy costs end to end (launch, event,
    # synchronisation), not only the wire: a few microseconds more than the datasheet.
    "nvlink4": (450 * GIGA, 8e-6),  # H100 NVLink: 900 GB/s total, 450 each way
    "nvlink3": (300 * GIGA, 8e-6),  # A100 NVLink
    "pcie5": (64 * GIGA, 10e-6),
    "pcie4": (32 * GIGA, 10e-6),
    "ib400": (50 * GIGA, 10e-6),  # 400 Gb/s InfiniBand / RoCE
    "eth100": (12.5 * GIGA, 25e-6),
    "eth25": (3.125 * GIGA, 30e-6),
    "eth10": (1.25 * GIGA, 50e-6),
    "loopback": (3 * GIGA, 50e-6),  # TCP loopback as measured (FIELD-NOTES)
}

# Dijkstra weight: time to move this many bytes, so paths favour bandwidth for real tensors
# and latency for tiny ones in proportion.
_REF_BYTES = 1 << 20


@dataclass
class Device:
    """A compute node of the topology."""

    name: str
    spec: DeviceSpec
    host: str = "localhost"
    endpoint: str | None = None
    torch_device: str | None = None
    queued_s: float = 0.0  # known backlog: queueing delay before new work starts
    token_file: str | None = None  # for an endpoint: the genie serve token


@dataclass
class Link:
    """A link between two nodes; bandwidth in bytes/s per direction, latency in seconds."""

    a: str
    b: str
    bandwidth: float
    latency: float
    utilization: float = 0.0
    kind: str = "network"

    @property
    def effective_bandwidth(self) -> float:
        return self.bandwidth * max(1e-3, 1.0 - self.utilization)


@dataclass(frozen=True)
class PathInfo:
    """The route between two nodes as a transfer sees it."""

    hops: tuple[str, ...]
    bandwidth: float  # bottleneck bandwidth, bytes/s (idle link)
    latency: float  # seconds, summed over hops
    utilization: float  # the highest utilization on the route (background load)

    def time(self, nbytes: int) -> float:
        """Latency + service time, with M/M/1 queueing on the busiest link:
        a transfer waits rho/(1-rho) service times behind background traffic."""
        if nbytes <= 0 or len(self.hops) < 2:
            return 0.0
        rho = min(self.utilization, 0.99)
        service = nbytes / self.bandwidth
        return self.latency + service + service * rho / (1.0 - rho)


@dataclass
class _Defaults:
    bandwidth: float = 12.5 * GIGA
    latency: float = 20e-6


class NetworkTopology:
    """Devices and links. The client (where user code runs and uploads come from) is a node."""

    def __init__(self, client: str = "client"):
        self.client = client
        self.devices: dict[str, Device] = {}
        self.links: dict[frozenset, Link] = {}
        self.defaults = _Defaults()
        self._paths: dict[tuple[str, str], PathInfo] = {}
        self._signature: str | None = None
        self._nx = None

    # -- building ----------------------------------------------------------------------------
    def add_device(
        self,
        name: str,
        spec: DeviceSpec | str = "H100",
        *,
        host: str = "localhost",
        endpoint: str | None = None,
        torch_device: str | None = None,
        token_file: str | None = None,
        **overrides: Any,
    ) -> Device:
        """Add a compute device; `spec` is a DeviceSpec or a preset name. Keyword overrides
        (``memory_gb``, ``memory_bandwidth_gb_s``, ``tflops_fp32``...) adjust the preset."""
        if name == self.client:
            raise TopologyError(f"genie: device name {name!r} is the client's name")
        if isinstance(spec, str):
            try:
                spec = DeviceSpec.preset(spec)
            except ValueError as e:
                raise TopologyError(str(e)) from None
        spec = apply_overrides(spec, overrides)
        dev = Device(
            name,
            spec,
            host=host,
            endpoint=endpoint,
            torch_device=torch_device,
            token_file=token_file,
        )
        self.devices[name] = dev
        self._changed()
        return dev

    def add_link(
        self,
        a: str,
        b: str,
        bandwidth: float | None = None,
        latency: float | None = None,
        *,
        kind: str | None = None,
        bandwidth_gbps: float | None = None,
        bandwidth_gb_s: float | None = None,
        latency_us: float | None = None,
        utilization: float = 0.0,
    ) -> Link:
        """Connect two nodes (both directions). Bandwidth in bytes/s, or ``bandwidth_gbps``
        (gigabits/s) or ``bandwidth_gb_s`` (gigabytes/s), or from a preset ``kind``
        (``nvlink4``, ``pcie5``, ``ib400``, ``eth100``...)."""
        for n in (a, b):
            if n != self.client and n not in self.devices:
                raise TopologyError(f"genie: link {a!r}-{b!r} names unknown node {n!r}")
        bw, lat = LINK_PRESETS.get(kind or "", (None, None))
        if kind and bw is None:
            raise TopologyError(f"genie: unknown link kind {kind!r}; known: {sorted(LINK_PRESETS)}")
        if bandwidth is not None:
            bw = float(bandwidth)
        elif bandwidth_gbps is not None:
            bw = bandwidth_gbps * GIGA / 8
        elif bandwidth_gb_s is not None:
            bw = bandwidth_gb_s * GIGA
        if latency is not None:
            lat = float(latency)
        elif latency_us is not None:
            lat = latency_us * 1e-6
        if bw is None:
            bw = self.defaults.bandwidth
        if lat is None:
            lat = self.defaults.latency
        if bw <= 0 or lat < 0 or not 0.0 <= utilization < 1.0:
            raise TopologyError(
                f"genie: link {a!r}-{b!r} needs bandwidth > 0, latency >= 0 and 0 <= utilization < 1 "
                f"(got {bw}, {lat}, {utilization})"
            )
        link = Link(a, b, bw, lat, utilization, kind or "network")
        self.links[frozenset((a, b))] = link
        self._changed()
        return link

    def link(self, a: str, b: str) -> Link:
        try:
            return self.links[frozenset((a, b))]
        except KeyError:
            raise TopologyError(f"genie: no link between {a!r} and {b!r}") from None

    def set_link(
        self,
        a: str,
        b: str,
        *,
        bandwidth: float | None = None,
        latency: float | None = None,
        utilization: float | None = None,
    ) -> None:
        """Change a link's figures (a slower network, background load...)."""
        link = self.link(a, b)
        if bandwidth is not None:
            link.bandwidth = float(bandwidth)
        if latency is not None:
            link.latency = float(latency)
        if utilization is not None:
            if not 0.0 <= utilization < 1.0:
                raise TopologyError(f"genie: utilization must be in [0, 1), got {utilization}")
            link.utilization = float(utilization)
        self._changed()

    def set_device_queue(self, name: str, queued_s: float) -> None:
        """Record a device's known backlog (seconds of work queued ahead of ours)."""
        self.device(name).queued_s = max(0.0, float(queued_s))
        self._changed()

    def _changed(self) -> None:
        self._paths.clear()
        self._signature = None
        self._nx = None

    # -- queries -----------------------------------------------------------------------------
    @property
    def device_names(self) -> list[str]:
        return list(self.devices)

    def device(self, name: str) -> Device:
        try:
            return self.devices[name]
        except KeyError:
            raise TopologyError(
                f"genie: unknown device {name!r}; known: {list(self.devices)}"
            ) from None

    def spec(self, name: str) -> DeviceSpec:
        return self.device(name).spec

    def path(self, src: str, dst: str) -> PathInfo:
        """The fastest route from `src` to `dst` (cached until the topology changes)."""
        key = (src, dst)
        info = self._paths.get(key)
        if info is None:
            info = self._route(src, dst)
            self._paths[key] = info
        return info

    def transfer_time(self, nbytes: int, src: str, dst: str) -> float:
        if src == dst:
            return 0.0
        return self.path(src, dst).time(nbytes)

    def _route(self, src: str, dst: str) -> PathInfo:
        if src == dst:
            return PathInfo((src,), float("inf"), 0.0, 0.0)
        import networkx as nx

        g = self._nx
        if g is None:
            g = nx.Graph()
            for link in self.links.values():
                w = link.latency + _REF_BYTES / link.effective_bandwidth
                g.add_edge(link.a, link.b, weight=w, link=link)
            self._nx = g
        if src in g and dst in g:
            try:
                hops = nx.dijkstra_path(g, src, dst, weight="weight")
            except nx.NetworkXNoPath:
                hops = None
            if hops is not None:
                links = [g.edges[u, v]["link"] for u, v in zip(hops, hops[1:], strict=False)]
                return PathInfo(
                    tuple(hops),
                    min(lk.bandwidth for lk in links),
                    sum(lk.latency for lk in links),
                    max(lk.utilization for lk in links),
                )
        logger.debug("genie: no path %s -> %s; using the default link", src, dst)
        return PathInfo((src, dst), self.defaults.bandwidth, self.defaults.latency, 0.0)

    def signature(self) -> str:
        """Identity of everything scheduling depends on (cache key part)."""
        if self._signature is None:
            blob = json.dumps(
                {
                    "client": self.client,
                    "devices": [
                        (d.name, repr(d.spec.signature()), d.host, d.queued_s)
                        for d in self.devices.values()
                    ],
                    "links": sorted(
                        (lk.a, lk.b, lk.bandwidth, lk.latency, lk.utilization)
                        for lk in self.links.values()
                    ),
                    "defaults": (self.defaults.bandwidth, self.defaults.latency),
                },
                sort_keys=True,
            )
            self._signature = hashlib.sha1(blob.encode()).hexdigest()
        return self._signature

    def __repr__(self) -> str:
        return f"NetworkTopology(devices={list(self.devices)}, links={len(self.links)}, client={self.client!r})"

    # -- construction helpers ----------------------------------------------------------------
    @classmethod
    def uniform(
        cls,
        count: int,
        spec: DeviceSpec | str = "H100",
        *,
        device_link: str = "nvlink4",
        client_link: str = "eth100",
        prefix: str = "gpu",
    ) -> NetworkTopology:
        """`count` identical devices, all linked to each other and to the client."""
        topo = cls()
        names = [f"{prefix}{i}" for i in range(count)]
        for n in names:
            topo.add_device(n, spec)
        for i, a in enumerate(names):
            topo.add_link(topo.client, a, kind=client_link)
            for b in names[i + 1 :]:
                topo.add_link(a, b, kind=device_link)
        return topo

    @classmethod
    def local(cls) -> NetworkTopology:
        """This machine: the CPU, and every CUDA device over PCIe; the client is the CPU host."""
        import torch

        topo = cls()
        topo.add_device("cpu", DeviceSpec.cpu(), torch_device="cpu")
        topo.add_link(topo.client, "cpu", kind="loopback", latency=1e-6, bandwidth=20 * GIGA)
        if torch.cuda.is_available():
            names = []
            for i in range(torch.cuda.device_count()):
                name = f"cuda:{i}"
                topo.add_device(name, DeviceSpec.detect(name), torch_device=name)
                topo.add_link(topo.client, name, kind="pcie5")
                topo.add_link("cpu", name, kind="pcie5")
                for other in names:
                    topo.add_link(other, name, kind="nvlink4")
                names.append(name)
        return topo

    @classmethod
    def from_dict(cls, data: dict) -> NetworkTopology:
        """From the dict form of a topology file (the format: topology_file.py)."""
        return topology_from_dict(cls, data)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> NetworkTopology:
        """Read a TOML topology (the format: topology_file.py)."""
        return topology_from_file(cls, path)

    def to_dict(self) -> dict:
        return topology_to_dict(self)
