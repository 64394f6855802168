"""The topology file: a NetworkTopology read from, and written as, a dict or a TOML file.

A topology file is TOML (or the same as a dict)::

    client = "client"                      # optional; the name of the node user code runs on

    [defaults]                             # used between nodes no path connects
    bandwidth_gbps = 100                   # gigabits/s (network convention)
    latency_us = 20

    [[device]]
    name = "gpu0"
    type = "H100"                          # a DeviceSpec preset: H100, H200, A100, L4, CPU
    endpoint = "tcp://10.0.0.5:7010"       # optional: the `genie serve` answering for it
    token_file = "/etc/genie/token"        # optional: its token (else $GENIE_TOKEN)
    memory_gb = 80                         # optional overrides of the preset
    torch_device = "cuda:0"                # optional: where a local executor runs it

    [[link]]
    a = "client"
    b = "gpu0"
    bandwidth_gbps = 100                   # or bandwidth_gb_s (gigabytes/s), or bandwidth (bytes/s)
    latency_us = 10
    utilization = 0.0                      # background load on the link, 0..1 (congestion)

Device settings beyond ``type`` override the preset's figures (``apply_overrides``).
"""

from __future__ import annotations

import os
from typing import Any

from genie.scheduler.devices import GIGA, DeviceSpec
from genie.scheduler.errors import TopologyError

__all__ = ["apply_overrides", "topology_from_dict", "topology_from_file", "topology_to_dict"]


def topology_from_dict(cls, data: dict):
    """A `cls` (NetworkTopology) from the dict form of a topology file."""
    topo = cls(client=str(data.get("client", "client")))
    defaults = data.get("defaults", {}) or {}
    bw = _bandwidth(defaults)
    if bw is not None:
        topo.defaults.bandwidth = bw
    lat = _latency(defaults)
    if lat is not None:
        topo.defaults.latency = lat
    devices = data.get("device", data.get("devices", [])) or []
    if not isinstance(devices, list):
        raise TopologyError("genie: topology 'device' must be an array of tables ([[device]])")
    for d in devices:
        d = dict(d)
        try:
            name = str(d.pop("name"))
        except KeyError:
            raise TopologyError(f"genie: a [[device]] entry has no name: {d}") from None
        spec = d.pop("type", d.pop("spec", "H100"))
        topo.add_device(
            name,
            spec,
            host=d.pop("host", "localhost"),
            endpoint=d.pop("endpoint", None),
            torch_device=d.pop("torch_device", None),
            token_file=d.pop("token_file", None),
            **d,
        )
    links = data.get("link", data.get("links", [])) or []
    for lk in links:
        lk = dict(lk)
        a = lk.get("a", lk.get("src"))
        b = lk.get("b", lk.get("dst"))
        if a is None or b is None:
            raise TopologyError(f"genie: a [[link]] entry needs a and b: {lk}")
        topo.add_link(
            str(a),
            str(b),
            _bandwidth(lk),
            _latency(lk),
            kind=lk.get("kind"),
            utilization=float(lk.get("utilization", 0.0)),
        )
    if not topo.devices:
        raise TopologyError("genie: the topology has no devices")
    return topo


def topology_from_file(cls, path: str | os.PathLike):
    """Read a TOML topology (see the module docstring for the format)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            raise TopologyError(
                "genie: reading TOML needs Python 3.11+ or the tomli package"
            ) from None
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise TopologyError(f"genie: cannot read topology file {path}: {e}") from e
    except tomllib.TOMLDecodeError as e:
        raise TopologyError(f"genie: {path} is not valid TOML: {e}") from e
    return cls.from_dict(data)


def topology_to_dict(topo) -> dict:
    """The dict form of a topology file (what topology_from_dict reads)."""
    return {
        "client": topo.client,
        "defaults": {
            "bandwidth_gb_s": topo.defaults.bandwidth / GIGA,
            "latency_us": topo.defaults.latency * 1e6,
        },
        "device": [
            {
                k: v
                for k, v in {
                    "name": d.name,
                    "type": d.spec.name,
                    "host": d.host,
                    "endpoint": d.endpoint,
                    "torch_device": d.torch_device,
                    "memory_gb": d.spec.memory_bytes / GIGA,
                }.items()
                if v is not None
            }
            for d in topo.devices.values()
        ],
        "link": [
            {
                "a": lk.a,
                "b": lk.b,
                "bandwidth_gb_s": lk.bandwidth / GIGA,
                "latency_us": lk.latency * 1e6,
                "utilization": lk.utilization,
            }
            for lk in topo.links.values()
        ],
    }


_SPEC_OVERRIDES = {
    "memory_gb": ("memory_bytes", lambda v: int(v * GIGA)),
    "memory_bytes": ("memory_bytes", int),
    "memory_bandwidth_gb_s": ("memory_bandwidth", lambda v: float(v) * GIGA),
    "launch_overhead_us": ("launch_overhead_s", lambda v: float(v) * 1e-6),
    "reserved_gb": ("reserved_bytes", lambda v: int(v * GIGA)),
    "allow_tf32": ("allow_tf32", bool),
}


def apply_overrides(spec: DeviceSpec, overrides: dict[str, Any]) -> DeviceSpec:
    if not overrides:
        return spec
    changes: dict[str, Any] = {}
    flops = dict(spec.peak_flops)
    for key, value in overrides.items():
        if key.startswith("tflops_"):
            flops[key.removeprefix("tflops_")] = float(value) * 1e12
        elif key == "cores" and spec.kind == "cpu":
            per_core = spec.peak_flops["fp32"] / (os.cpu_count() or 1)
            rate = per_core * int(value)
            flops.update(fp32=rate, bf16=rate, fp64=rate / 2, fp16=rate / 2, int8=rate * 2)
            changes["vector_flops"] = rate
        elif key in _SPEC_OVERRIDES:
            field_name, conv = _SPEC_OVERRIDES[key]
            changes[field_name] = conv(value)
        else:
            raise TopologyError(f"genie: unknown device setting {key!r}")
    if flops != spec.peak_flops:
        changes["peak_flops"] = flops
        if "vector_flops" not in changes and "fp32" in flops:
            changes["vector_flops"] = flops["fp32"]
    return spec.with_(**changes)


def _bandwidth(d: dict) -> float | None:
    if "bandwidth" in d:
        return float(d["bandwidth"])
    if "bandwidth_gbps" in d:
        return float(d["bandwidth_gbps"]) * GIGA / 8
    if "bandwidth_gb_s" in d:
        return float(d["bandwidth_gb_s"]) * GIGA
    return None


def _latency(d: dict) -> float | None:
    if "latency" in d:
        return float(d["latency"])
    if "latency_us" in d:
        return float(d["latency_us"]) * 1e-6
    if "latency_ms" in d:
        return float(d["latency_ms"]) * 1e-3
    return None
