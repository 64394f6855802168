"""What a device can do: peak compute per dtype, memory bandwidth and capacity.

The presets use the vendors' published figures for dense (not sparse) math:

=========  ======  ======  ==========  ==========  ========  ========
device     fp32    tf32    bf16/fp16   fp8/int8    HBM/DRAM  memory
=========  ======  ======  ==========  ==========  ========  ========
H100 SXM   67 TF   495 TF  989 TF      1979 TF     3.35 TB/s 80 GB
H200 SXM   67 TF   495 TF  989 TF      1979 TF     4.8 TB/s  141 GB
A100 SXM   19.5 TF 156 TF  312 TF      624 (int8)  2.04 TB/s 80 GB
L4         30.3 TF 60 TF   121 TF      242.5 TF    300 GB/s  24 GB
=========  ======  ======  ==========  ==========  ========  ========

A CPU is whatever the caller says it is; the default is modest (50 GFLOP/s per core, 40 GB/s).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

import torch

__all__ = ["DeviceSpec", "dtype_key"]

TERA = 1e12
GIGA = 1e9

#: Dtype keys used in ``DeviceSpec.peak_flops``.
_DTYPE_KEYS = {
    torch.float32: "fp32",
    torch.float64: "fp64",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.int8: "int8",
    torch.uint8: "int8",
}
for _name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"):
    if hasattr(torch, _name):
        _DTYPE_KEYS[getattr(torch, _name)] = "fp8"


def dtype_key(dtype: torch.dtype) -> str:
    """``"fp32"``, ``"bf16"``... for a torch dtype; integer and other types count as fp32."""
    return _DTYPE_KEYS.get(dtype, "fp32")


@dataclass(frozen=True)
class DeviceSpec:
    """Performance figures of one device kind.

    ``peak_flops`` maps a dtype key (``fp32``, ``tf32``, ``bf16``, ``fp16``, ``fp8``, ``int8``,
    ``fp64``) to dense FLOP/s of the matrix units; ``vector_flops`` is the rate of the
    non-matrix units (elementwise, reductions). ``allow_tf32`` makes fp32 matmuls use the
    tf32 rate, as ``torch.backends.cuda.matmul.allow_tf32`` does.
    """

    name: str
    kind: str  # "gpu" | "cpu"
    peak_flops: dict[str, float]
    memory_bandwidth: float  # bytes/s
    memory_bytes: int
    vector_flops: float = 0.0  # 0: same as peak_flops["fp32"]
    launch_overhead_s: float = 5e-6
    matmul_efficiency: float = 0.7
    vector_efficiency: float = 0.6
    memory_efficiency: float = 0.8
    reserved_bytes: int = 0  # runtime/context memory not available to tensors
    allow_tf32: bool = False
    extra: dict[str, float] = field(default_factory=dict)

    def __hash__(self) -> int:
        return hash(self.signature())

    # -- queries ----------------------------------------------------------------------------
    @property
    def usable_memory(self) -> int:
        return max(0, self.memory_bytes - self.reserved_bytes)

    def matmul_flops(self, dtype: torch.dtype) -> float:
        """Peak dense FLOP/s of the matrix units for `dtype`."""
        key = dtype_key(dtype)
        if key == "fp32" and self.allow_tf32 and "tf32" in self.peak_flops:
            key = "tf32"
        rate = self.peak_flops.get(key) or self.peak_flops.get("fp32") or 1.0
        return rate

    def vector_rate(self) -> float:
        return self.vector_flops or self.peak_flops.get("fp32", 1.0)

    def with_(self, **changes) -> DeviceSpec:
        """A copy with fields replaced (``spec.with_(memory_bytes=16 << 30)``)."""
        return replace(self, **changes)

    def signature(self) -> tuple:
        return (
            self.name,
            self.kind,
            tuple(sorted(self.peak_flops.items())),
            self.memory_bandwidth,
            self.memory_bytes,
            self.vector_flops,
            self.launch_overhead_s,
            self.matmul_efficiency,
            self.vector_efficiency,
            self.memory_efficiency,
            self.reserved_bytes,
            self.allow_tf32,
        )

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "peak_tflops": {k: v / TERA for k, v in self.peak_flops.items()},
            "memory_bandwidth_gb_s": self.memory_bandwidth / GIGA,
            "memory_gb": self.memory_bytes / GIGA,
            "launch_overhead_us": self.launch_overhead_s * 1e6,
        }

    # -- presets ----------------------------------------------------------------------------
    @classmethod
    def h100(cls) -> DeviceSpec:
        """NVIDIA H100 SXM5 80 GB."""
        return cls(
            name="H100",
            kind="gpu",
            peak_flops={
                "fp64": 67 * TERA,  # fp64 tensor core
                "fp32": 67 * TERA,
                "tf32": 494.7 * TERA,
                "bf16": 989.4 * TERA,
                "fp16": 989.4 * TERA,
                "fp8": 1978.9 * TERA,
                "int8": 1978.9 * TERA,
            },
            vector_flops=67 * TERA,
            memory_bandwidth=3.35e12,
            memory_bytes=80 * 10**9,
            launch_overhead_s=6e-6,
            reserved_bytes=1 << 30,
        )

    @classmethod
    def h200(cls) -> DeviceSpec:
        """NVIDIA H200 SXM 141 GB: H100 compute, more and faster HBM3e."""
        return cls.h100().with_(name="H200", memory_bandwidth=4.8e12, memory_bytes=141 * 10**9)

    @classmethod
    def a100(cls) -> DeviceSpec:
        """NVIDIA A100 SXM4 80 GB."""
        return cls(
            name="A100",
            kind="gpu",
            peak_flops={
                "fp64": 19.5 * TERA,  # fp64 tensor core
                "fp32": 19.5 * TERA,
                "tf32": 156 * TERA,
                "bf16": 312 * TERA,
                "fp16": 312 * TERA,
                "int8": 624 * TERA,
            },
            vector_flops=19.5 * TERA,
            memory_bandwidth=2.039e12,
            memory_bytes=80 * 10**9,
            launch_overhead_s=6e-6,
            reserved_bytes=1 << 30,
        )

    @classmethod
    def l4(cls) -> DeviceSpec:
        """NVIDIA L4 24 GB."""
        return cls(
            name="L4",
            kind="gpu",
            peak_flops={
                "fp64": 0.49 * TERA,
                "fp32": 30.3 * TERA,
                "tf32": 60 * TERA,
                "bf16": 121 * TERA,
                "fp16": 121 * TERA,
                "fp8": 242.5 * TERA,
                "int8": 242.5 * TERA,
            },
            vector_flops=30.3 * TERA,
            memory_bandwidth=300e9,
            memory_bytes=24 * 10**9,
            launch_overhead_s=6e-6,
            reserved_bytes=512 << 20,
        )

    @classmethod
    def cpu(
        cls,
        cores: int | None = None,
        gflops_per_core: float = 50.0,
        memory_bandwidth_gb_s: float = 40.0,
        memory_bytes: int | None = None,
        name: str = "CPU",
    ) -> DeviceSpec:
        """A CPU; every figure is a parameter because CPUs differ too much for one preset."""
        cores = cores or os.cpu_count() or 1
        rate = cores * gflops_per_core * GIGA
        return cls(
            name=name,
            kind="cpu",
            peak_flops={
                "fp64": rate / 2,
                "fp32": rate,
                "bf16": rate,
                "fp16": rate / 2,
                "int8": rate * 2,
            },
            vector_flops=rate,
            memory_bandwidth=memory_bandwidth_gb_s * GIGA,
            memory_bytes=memory_bytes if memory_bytes is not None else _host_memory(),
            launch_overhead_s=2e-6,
            matmul_efficiency=0.6,
            vector_efficiency=0.5,
            memory_efficiency=0.7,
        )

    @classmethod
    def preset(cls, name: str) -> DeviceSpec:
        """A preset by (case-insensitive) name: ``H100``, ``H200``, ``A100``, ``L4``, ``CPU``."""
        key = name.strip().lower().replace("nvidia", "").replace("-", "").replace(" ", "")
        for prefix, make in (
            ("h100", cls.h100),
            ("h200", cls.h200),
            ("a100", cls.a100),
            ("l4", cls.l4),
            ("cpu", cls.cpu),
        ):
            if key.startswith(prefix):
                return make()
        raise ValueError(f"genie: unknown device preset {name!r}; known: H100, H200, A100, L4, CPU")

    @classmethod
    def from_server(cls, info: dict) -> DeviceSpec:
        """What a ``genie serve`` answers to "hello" (its device, the device's name and
        memory, the per-session memory limit) as a DeviceSpec: a preset by the device's name,
        with the memory a session may really use."""
        memory = int(info.get("device_memory") or 0) or None
        limit = int(info.get("memory_limit") or 0)
        if limit:
            memory = min(memory, limit) if memory else limit
        if info.get("device_type") != "cuda":
            return cls.cpu(cores=info.get("device_cores"), memory_bytes=memory)
        name = str(info.get("device_name") or "GPU")
        try:
            spec = cls.preset(name)
        except ValueError:
            spec = cls.a100().with_(name=name)  # an unknown GPU: A100-like figures
        return spec.with_(memory_bytes=memory) if memory else spec

    @classmethod
    def detect(cls, device: str | torch.device) -> DeviceSpec:
        """The preset matching a local torch device (CUDA by name, memory from the driver)."""
        d = torch.device(device)
        if d.type != "cuda":
            return cls.cpu()
        props = torch.cuda.get_device_properties(d)
        try:
            spec = cls.preset(props.name)
        except ValueError:
            spec = cls.a100().with_(name=props.name)  # an unknown GPU: A100-like figures
        return spec.with_(memory_bytes=int(props.total_memory))


def _host_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 * 10**9
