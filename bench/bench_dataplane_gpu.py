"""GPU side of the data plane's registration cache: the CUDA host-registration backend
(cudaHostRegister through genie._C.RegistrationCache("cuda-host")), its cost next to a cache
hit, and host-to-device copies from a registered vs an unregistered (pageable) buffer, with
torch's own pinned memory for reference. Needs no DPDK. Skips cleanly without CUDA, or when
genie was built without it.

    python bench/bench_dataplane_gpu.py [--quick]

Prints a table and writes bench/results/dataplane_gpu.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
MB = 1 << 20


def page_locked(t: torch.Tensor) -> bool:
    """Whether the CUDA driver sees t's memory as registered host memory (Tensor.is_pinned()
    knows only torch's own pinned allocator in torch 2.11)."""
    import ctypes

    path = next(line.split()[-1] for line in open("/proc/self/maps") if "libcudart.so" in line)
    rt = ctypes.CDLL(path)

    class Attributes(ctypes.Structure):
        # cudaPointerAttributes with room to spare: newer CUDA appends reserved words, and a
        # shorter struct lets the runtime write past its end (heap corruption seen on an H200).
        _fields_ = [("type", ctypes.c_int), ("device", ctypes.c_int),
                    ("device_pointer", ctypes.c_void_p), ("host_pointer", ctypes.c_void_p),
                    ("reserved", ctypes.c_long * 32)]  # fmt: skip

    a = Attributes()
    err = rt.cudaPointerGetAttributes(ctypes.byref(a), ctypes.c_void_p(t.data_ptr()))
    rt.cudaGetLastError()
    return err == 0 and a.type == 1  # cudaMemoryTypeHost


def timed_ms(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_dataplane_gpu: no CUDA device; skipped")
        return 0
    from genie import _C

    if not _C._dataplane_build_info()["cuda"]:
        print(
            "bench_dataplane_gpu: genie was built without CUDA (no CUDA toolkit found at build "
            "time); rebuild with -DGENIE_WITH_CUDA=ON; skipped"
        )
        return 0
    backends = _C._registration_backends()
    if backends["cuda-host"]:
        print(f"bench_dataplane_gpu: the cuda-host backend is unavailable: {backends['cuda-host']}")
        return 1

    torch.cuda.init()
    runtime = _C._dataplane_build_info()["cuda_runtime"]
    print(f"CUDA runtime used by genie's registration backend: {runtime}")

    sizes = [1 * MB, 64 * MB] + ([] if args.quick else [1024 * MB])
    repeats = 5 if args.quick else 10
    cache = _C.RegistrationCache("cuda-host", capacity=500, max_age=300.0)
    rows = []
    for n in sizes:
        # Registration cost: a fresh buffer each time (a miss), then the same buffer (a hit).
        reg_ms = []
        for _ in range(3):
            buf = torch.empty(n, dtype=torch.uint8)
            buf.fill_(1)  # touch the pages: registration cost, not page faults
            t0 = time.perf_counter()
            info = cache.register_tensor(buf)
            reg_ms.append((time.perf_counter() - t0) * 1e3)
            locked = page_locked(buf)
            del buf  # the free hook drops the registration (cudaHostUnregister)
        src = torch.empty(n, dtype=torch.uint8).fill_(3)
        cache.register_tensor(src)
        hits = 2000
        addr, nbytes = src.untyped_storage().data_ptr(), src.untyped_storage().nbytes()
        t0 = time.perf_counter()
        for _ in range(hits):
            cache.acquire(addr, nbytes)
        hit_us = (time.perf_counter() - t0) * 1e6 / hits
        dst = torch.empty(n, dtype=torch.uint8, device="cuda")
        registered = timed_ms(lambda s=src, d=dst: d.copy_(s, non_blocking=True), repeats)
        pageable_src = torch.empty(n, dtype=torch.uint8).fill_(3)
        pageable = timed_ms(lambda s=pageable_src, d=dst: d.copy_(s, non_blocking=True), repeats)
        pinned_src = torch.empty(n, dtype=torch.uint8, pin_memory=True).fill_(3)
        pinned = timed_ms(lambda s=pinned_src, d=dst: d.copy_(s, non_blocking=True), repeats)
        assert torch.equal(dst[:16].cpu(), src[:16])
        rows.append({
            "bytes": n,
            "register_ms": statistics.median(reg_ms),
            "owned": info["owned"],
            "page_locked": locked,
            "hit_us_python": hit_us,
            "h2d_registered_gbps": n / registered / 1e6,
            "h2d_pageable_gbps": n / pageable / 1e6,
            "h2d_torch_pinned_gbps": n / pinned / 1e6,
        })  # fmt: skip
        del src, pageable_src, pinned_src, dst
        torch.cuda.empty_cache()

    print(f"{'size':>7} | {'register':>9} | {'hit (py)':>8} | {'H2D registered':>14} | "
          f"{'H2D pageable':>12} | {'H2D torch pinned':>16}")  # fmt: skip
    for r in rows:
        print(f"{r['bytes'] // MB:>5}MB | {r['register_ms']:>7.2f}ms | {r['hit_us_python']:>6.2f}us | "
              f"{r['h2d_registered_gbps']:>10.1f}GB/s | {r['h2d_pageable_gbps']:>8.1f}GB/s | "
              f"{r['h2d_torch_pinned_gbps']:>12.1f}GB/s")  # fmt: skip
    print(f"gpudev (GPU memory for NIC DMA): {backends['gpudev'] or 'available'}")
    print(f"cache: {cache.stats()}")
    result = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "rows": rows,
        "cache": cache.stats(),
        "gpudev": backends["gpudev"] or "available",
        "cuda_runtime": runtime,
        "note": "hit_us_python includes the Python->C++ call; the C++ hit cost is in dataplane.json",
    }
    out = ROOT / "bench" / "results" / "dataplane_gpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
