"""Zero copy on the DPDK path (issue 19): a 16 MB - 1 GB exchange through genie's transports,
memif with payloads in the arena heap (zero copy) vs memif with payloads in torch memory (one
copy per side through the arena's slots) vs TCP loopback, and the registration cache's hit next
to the cost of the registration it saves.

An exchange: the client sends N bytes, the server receives them and sends them back, the client
receives them; GB/s counts both directions (2N / time). Each side uses one buffer per size,
allocated once: `host_buffer` (the arena) for "memif zero copy", `torch.empty` for the others.
The copy counters of both sides are reported next to each rate. The variants run side by side,
one exchange each in turn between the same two processes (Note: [Side by side]), in several
rounds of fresh processes; each figure is the median over rounds of each round's median
exchange, and the load average is recorded with each round.

Goal: memif zero copy >= 2x TCP at >= 16 MB; LRU hit <= 100 ns.

    python bench/bench_dataplane_zerocopy.py [--quick]

Prints a table and writes bench/results/dataplane_zerocopy.json.

Uploads to a CUDA server (`--gpu`, on a GPU machine with DPDK): the client sends N bytes, the
server receives them into a CUDA tensor with `Transport.recv_payload_into` (memif: in place
into the arena heap, registered with CUDA once, one copy to the GPU; TCP: pinned staging) and
acknowledges once the GPU has them; GB/s = N / median time. `--gpu --device meta` runs the
same steps on a CPU-only machine (no bytes reach a device: a dry run of the code path).

    python bench/bench_dataplane_zerocopy.py --gpu [--serve] [--device cuda]

`--serve` adds uploads into a real `genie serve --device DEV --transport dpdk|tcp` (a child
process) from a genie client: each step is `x.to(remote)[:16].cpu()` with x uploaded afresh
(upload, one slice, a 16-byte fetch); GB/s = N / median step. bench/gpu_dataplane.sh runs all of
this on a lent GPU machine in one call, DPDK installed from carried .deb files.

Prints tables and writes bench/results/dataplane_zerocopy_gpu.json (`--out` elsewhere;
`--sizes 16,64` in MB for other sizes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_dataplane import build, free_port, json_lines, pick

ROOT = Path(__file__).resolve().parent.parent
MB = 1 << 20
VARIANTS = {  # name -> (transport, where payloads live)
    "memif zero copy": ("dpdk", "arena"),
    "memif with copies": ("dpdk", "torch"),
    "tcp loopback": ("tcp", "torch"),
}
# The exchange's connections: name -> (transport, DpdkConfig fields the client changes).
# "dpdk copy ring" is memif with both ends in copy mode (Note: [memif zero copy] in
# csrc/dataplane/port.cpp), the data plane before the client's ring went zero-copy;
# "dpdk staged" the zero-copy ring with the arena outside EAL memory, its chunks staged into
# ring mbufs (Note: [Arena in EAL memory] in csrc/dataplane/eal.h).
CONNECTIONS = {
    "dpdk": ("dpdk", {}),
    "dpdk copy ring": ("dpdk", {"port": "memif:zero-copy=no"}),
    "dpdk staged": ("dpdk", {"arena_in_eal": False}),
    "tcp": ("tcp", {}),
}


def kind_of(conn: str) -> str:
    return CONNECTIONS[conn][0]


EXCHANGE_VARIANTS = {  # name -> (connection, where payloads live)
    "memif zero copy": ("dpdk", "arena"),
    "memif zero copy, copy ring": ("dpdk copy ring", "arena"),
    "memif zero copy, staged": ("dpdk staged", "arena"),
    "memif with copies": ("dpdk", "torch"),
    "tcp loopback": ("tcp", "torch"),
}


def reps(n: int, iters: int) -> int:
    """Timed exchanges at size `n`: more for small sizes, whose few milliseconds a shared
    machine's scheduler can double."""
    return iters * max(1, (64 * MB) // n)


# Note: [Side by side]
# On a shared machine the load moves from one second to the next (FIELD-NOTES.md), so variants
# measured one after the other compare different machines. Here one server process holds a
# DPDK and a TCP connection from one client process, and the client takes the variants in
# turns, one exchange each (the order rotating), so that every variant sees the same moments.
def exchange_peer(role: str, ports: list[int], sizes: list[int], iters: int) -> None:
    """One side of the side-by-side exchange (run as a fresh process)."""
    import threading

    import torch

    from genie.runtime import transports
    from genie.runtime.protocol import AUTH_OK, REPLY, REQUEST
    from genie.runtime.transports.dpdk import DpdkConfig, DpdkTransport

    names = list(EXCHANGE_VARIANTS)
    if role == "server":
        copied: dict[str, int] = {name: 0 for name in names}

        def serve(t, conn: str) -> None:
            """Echo every payload from a buffer of the memory the header names, kept per size
            (the arena's blocks go back before the next size)."""
            bufs: dict[tuple[bytes, int], memoryview] = {}
            while True:
                frame = t.recv_frame(1024)  # the first one also brings the data plane up
                if frame.header == b"bye":
                    return
                memory, n = frame.header, frame.payload_len
                if (memory, n) not in bufs:
                    bufs = {k: v for k, v in bufs.items() if k[1] == n}
                    buf = (
                        t.host_buffer(n)
                        if memory == b"arena"
                        else torch.empty(n, dtype=torch.uint8)
                    )
                    bufs[(memory, n)] = memoryview(buf.numpy())
                view = bufs[(memory, n)]
                before = t.stats.bytes_copied
                t.recv_payload([view])
                t.send_frame(1, REPLY, b"k", [view])
                variant = (conn, memory.decode())
                name = next(k for k, v in EXCHANGE_VARIANTS.items() if v == variant)
                copied[name] += t.stats.bytes_copied - before

        threads = []
        for (conn, (kind, _)), port in zip(CONNECTIONS.items(), ports, strict=True):
            listener = transports.listen("127.0.0.1", port, kind=kind)
            t = listener.accept(60)
            t.send_frame(1, AUTH_OK, b"")
            th = threading.Thread(target=serve, args=(t, conn))
            th.start()
            threads.append((th, t))
        for th, t in threads:
            th.join()
            t.close()
        for name in names:
            print(json.dumps({"bench": "stats", "role": "server", "variant": name,
                              "bytes_copied": copied[name]}), flush=True)  # fmt: skip
        return
    conns = {}
    for (conn, (kind, fields)), port in zip(CONNECTIONS.items(), ports, strict=True):
        if fields:
            config = dataclasses.replace(DpdkConfig.from_env(), **fields)
            t = DpdkTransport.connect(f"127.0.0.1:{port}", timeout=30, config=config)
        else:
            t = transports.connect(f"127.0.0.1:{port}", kind=kind, timeout=30)
        t.recv_frame(64)
        conns[conn] = t
    copied = {name: 0 for name in names}
    for n in sizes:
        src = torch.randint(0, 255, (n,), dtype=torch.uint8)
        bufs = {}
        for name, (conn, memory) in EXCHANGE_VARIANTS.items():
            t = conns[conn]
            x, y = (t.host_buffer(n), t.host_buffer(n)) if memory == "arena" else (
                torch.empty(n, dtype=torch.uint8), torch.empty(n, dtype=torch.uint8))  # fmt: skip
            x.copy_(src)
            bufs[name] = (x, y, memoryview(x.numpy()), memoryview(y.numpy()))
        times: dict[str, list[float]] = {name: [] for name in names}
        for i in range(reps(n, iters) + 1):  # the first round touches every page: not timed
            for k in range(len(names)):
                name = names[(i + k) % len(names)]
                conn, memory = EXCHANGE_VARIANTS[name]
                t, xv, yv = conns[conn], bufs[name][2], bufs[name][3]
                before = t.stats.bytes_copied
                t0 = time.perf_counter()
                t.send_frame(1, REQUEST, memory.encode(), [xv])
                t.recv_frame(64)
                t.recv_payload([yv])
                if i:
                    times[name].append(time.perf_counter() - t0)
                copied[name] += t.stats.bytes_copied - before
        for name in names:
            med = statistics.median(times[name])
            x, y = bufs[name][:2]
            row = {"bench": "exchange", "variant": name, "bytes": n, "seconds": med,
                   "gbps": 2 * n / med / 1e9, "identical": bool(torch.equal(x, y))}  # fmt: skip
            print(json.dumps(row), flush=True)
        del bufs, x, y, xv, yv  # the arena blocks go back before the next size
    for conn, t in conns.items():
        stats = t.data_plane_stats() if kind_of(conn) == "dpdk" else {}
        print(json.dumps({"bench": "plane", "variant": f"connection {conn}", "stats": stats}),
              flush=True)  # fmt: skip
        t.send_frame(1, REQUEST, b"bye")
        t.close()
    for name in names:
        print(json.dumps({"bench": "stats", "role": "client", "variant": name,
                          "bytes_copied": copied[name]}), flush=True)  # fmt: skip


def run_exchange(sizes: list[int], iters: int) -> list[dict]:
    """One round of the side-by-side exchange (Note: [Side by side])."""
    heap = 2 * max(sizes) + 64 * MB  # the client holds a sent and a received buffer
    env = {**os.environ, "GENIE_DPDK_MIN_PAYLOAD": "0", "GENIE_DPDK_HEAP": str(heap)}
    ports = ",".join(str(free_port()) for _ in CONNECTIONS)
    arg = ",".join(map(str, sizes))
    cmd = [sys.executable, __file__, "--exchange-peer"]
    server = subprocess.Popen([*cmd, "server", ports, arg, str(iters)], env=env,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    time.sleep(1.5)
    client = subprocess.run([*cmd, "client", ports, arg, str(iters)], env=env,
                            capture_output=True, text=True, timeout=1800)  # fmt: skip
    out, _ = server.communicate(timeout=120)
    if client.returncode or server.returncode:
        raise SystemExit(f"the exchange failed: {client.stderr[-2000:]}")
    return json_lines(client.stdout) + json_lines(out)


def seeded(n: int):
    import torch

    g = torch.Generator().manual_seed(n)
    return torch.randint(0, 255, (n,), dtype=torch.uint8, generator=g)


def upload_peer(
    role: str, kind: str, memory: str, device: str, port: int, sizes: list[int], iters: int
) -> None:
    """One side of the upload benchmark (run as a fresh process)."""
    import torch

    from genie.runtime import transports
    from genie.runtime.protocol import AUTH_OK, REPLY, REQUEST

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    if role == "server":
        listener = transports.listen("127.0.0.1", port, kind=kind)
        t = listener.accept(60)
        t.send_frame(1, AUTH_OK, b"")
        for n in sizes:
            dst = torch.empty(n, dtype=torch.uint8, device=device)
            for _ in range(reps(n, iters) + 1):
                t.recv_frame(1024)
                t.recv_payload_into(dst)  # Note: [Payload memory] (transports/base.py)
                sync()
                t.send_frame(1, REPLY, b"k")
            same = None if device == "meta" else bool(torch.equal(dst.cpu(), seeded(n)))
            print(json.dumps({"bench": "upload_check", "bytes": n, "identical": same}), flush=True)
            del dst
        t.recv_frame(64)
        print(json.dumps({"bench": "stats", "role": "server", **t.stats.as_dict()}), flush=True)
        t.close()
        return
    t = transports.connect(f"127.0.0.1:{port}", kind=kind, timeout=30)
    t.recv_frame(64)
    for n in sizes:
        x = t.host_buffer(n) if memory == "arena" else torch.empty(n, dtype=torch.uint8)
        x.copy_(seeded(n))
        xv = memoryview(x.numpy())
        times = []
        for i in range(reps(n, iters) + 1):
            t0 = time.perf_counter()
            t.send_frame(1, REQUEST, b"x", [xv])
            t.recv_frame(64)
            if i:
                times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        row = {"bench": "upload", "bytes": n, "seconds": med, "gbps": n / med / 1e9}
        print(json.dumps(row), flush=True)
        del xv, x
    t.send_frame(1, REQUEST, b"bye")
    print(json.dumps({"bench": "stats", "role": "client", **t.stats.as_dict()}), flush=True)
    t.close()


def serve_peer(kind: str, memory: str, device: str, sizes: list[int], iters: int) -> None:
    """Uploads into a real `genie serve` (a child process, as LoopbackServer starts it) from this
    process as a genie client: each timed step is `x.to(remote)` and a 16-byte fetch of it, so
    the flush uploads x (fresh each time: nothing can be predicted) and runs one slice."""
    import torch

    from genie.runtime.loopback import LoopbackServer
    from genie.runtime.remote import connect, disconnect

    remote = "remote_accelerator:0"
    with LoopbackServer(device, extra_args=["--transport", kind]) as srv:
        client = connect(srv.address, token=srv.token, transport=kind, speculate=False)
        transport = client._t  # the arena belongs to the connection (Note: [Payload memory])
        try:
            for n in sizes:
                if memory == "arena":
                    x = transport.host_tensor((n,), torch.uint8)
                else:
                    x = torch.empty(n, dtype=torch.uint8)
                x.copy_(seeded(n))
                times = []
                before = client.counters["upload_bytes"]
                for i in range(reps(n, iters) + 1):
                    t0 = time.perf_counter()
                    head = x.to(remote)[:16].cpu()
                    if i:
                        times.append(time.perf_counter() - t0)
                uploaded = (client.counters["upload_bytes"] - before) / (reps(n, iters) + 1)
                r = x.to(remote)
                total = int(x.to(torch.int64).sum())
                same = torch.equal(head, x[:16]) and r.to(torch.int64).sum().item() == total
                del r
                med = statistics.median(times)
                row = {"bench": "serve_upload", "bytes": n, "seconds": med, "gbps": n / med / 1e9,
                       "uploaded_per_step": uploaded, "identical": same}  # fmt: skip
                print(json.dumps(row), flush=True)
                del x
            st = transport.stats.as_dict()
            print(json.dumps({"bench": "stats", "role": "client", **st}), flush=True)
        finally:
            disconnect()


def run_serve_variant(name: str, device: str, sizes: list[int], iters: int) -> list[dict]:
    kind, memory = VARIANTS[name]
    env = {
        **os.environ,
        "GENIE_DPDK_MIN_PAYLOAD": "0",
        "GENIE_DPDK_HEAP": str(max(sizes) + 64 * MB),
    }
    arg = ",".join(map(str, sizes))
    cmd = [sys.executable, __file__, "--serve-peer", kind, memory, device, arg, str(iters)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if run.returncode:
        raise SystemExit(f"genie serve, {name} failed: {run.stderr[-2000:]}")
    return [{**r, "variant": name} for r in json_lines(run.stdout)]


def serve_table(device: str, sizes: list[int], raw: list[dict]) -> list[dict]:
    rows = []
    for n in sizes:
        row = {"bytes": n}
        for name in VARIANTS:
            rs = [r for r in raw if r["variant"] == name and r.get("bytes") == n]
            up = [r["gbps"] for r in rs]
            row[name] = {"gbps": statistics.median(up), "rounds_gbps": up,
                         "identical": all(r["identical"] for r in rs),
                         "uploaded_per_step": rs[0]["uploaded_per_step"]}  # fmt: skip
        row["zero_copy_over_tcp"] = row["memif zero copy"]["gbps"] / row["tcp loopback"]["gbps"]
        rows.append(row)
    print(
        f"genie serve --device {device}: GB/s of x.to(remote)[:16].cpu() (upload, one slice, fetch)"
    )
    print(f"{'size':>7} | {'memif zero copy':>15} | {'memif copies':>12} | {'TCP':>6} | "
          f"{'zc/TCP':>7} | identical")  # fmt: skip
    for r in rows:
        same = all(r[name]["identical"] for name in VARIANTS)
        print(f"{r['bytes'] // MB:>5}MB | {r['memif zero copy']['gbps']:>15.2f} | "
              f"{r['memif with copies']['gbps']:>12.2f} | {r['tcp loopback']['gbps']:>6.2f} | "
              f"{r['zero_copy_over_tcp']:>6.2f}x | {same}")  # fmt: skip
    return rows


def gpu_main(device: str, sizes: list[int], iters: int, rounds: int, out: Path, serve: bool) -> int:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        print(f"bench_dataplane_zerocopy: --device {device} but torch sees no CUDA device")
        return 1
    raw, serve_raw = [], []
    for i in range(rounds):
        for name in VARIANTS:
            raw += [{**r, "round": i} for r in run_variant(name, sizes, iters, device)]
            if serve:
                runs = run_serve_variant(name, device, sizes, iters)
                serve_raw += [{**r, "round": i} for r in runs]
    rows = []
    for n in sizes:
        row = {"bytes": n}
        for name in VARIANTS:
            rs = [r for r in raw if r["variant"] == name and r.get("bytes") == n]
            up = [r["gbps"] for r in rs if r["bench"] == "upload"]
            checks = [r["identical"] for r in rs if r["bench"] == "upload_check"]
            row[name] = {"gbps": statistics.median(up), "rounds_gbps": up, "identical": checks}
        row["zero_copy_over_tcp"] = row["memif zero copy"]["gbps"] / row["tcp loopback"]["gbps"]
        rows.append(row)
    server = {
        name: next(r for r in raw if r["variant"] == name and r.get("role") == "server")
        for name in VARIANTS
    }
    print(f"uploads to {device}: GB/s (client buffer -> server tensor on {device})")
    print(f"{'size':>7} | {'memif zero copy':>15} | {'memif copies':>12} | {'TCP':>6} | "
          f"{'zc/TCP':>7}")  # fmt: skip
    for r in rows:
        print(f"{r['bytes'] // MB:>5}MB | {r['memif zero copy']['gbps']:>15.2f} | "
              f"{r['memif with copies']['gbps']:>12.2f} | {r['tcp loopback']['gbps']:>6.2f} | "
              f"{r['zero_copy_over_tcp']:>6.2f}x")  # fmt: skip
    for name, st in server.items():
        print(
            f"server, {name}: bytes copied receiving {st['bytes_copied_receiving']}, "
            f"registrations hit {st['registrations_hit']} / missed {st['registrations_missed']}"
        )
    serve_rows = (
        serve_table(device, sizes, [r for r in serve_raw if r["bench"] == "serve_upload"])
        if serve
        else []
    )
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "device": device},
        "upload": "client sends N bytes; server receives them into a tensor on the device and "
                  "acknowledges once the device has them; GB/s = N / median time",
        "rounds": rounds,
        "rows": rows,
        "server_stats": server,
        "serve_upload": "genie serve --device DEVICE --transport KIND in a child process; this "
                        "process a genie client timing x.to(remote)[:16].cpu(), x fresh each "
                        "step; GB/s = N / median time",
        "serve_rows": serve_rows,
        "raw": raw,
        "serve_raw": serve_raw,
    }  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


def run_variant(name: str, sizes: list[int], iters: int, device: str) -> list[dict]:
    kind, memory = VARIANTS[name]
    heap = 2 * max(sizes) + 64 * MB  # the client holds a sent and a received buffer
    env = {**os.environ, "GENIE_DPDK_MIN_PAYLOAD": "0", "GENIE_DPDK_HEAP": str(heap)}
    port = str(free_port())
    arg = ",".join(map(str, sizes))
    cmd, extra = [sys.executable, __file__, "--upload-peer"], [device]
    server = subprocess.Popen(
        [*cmd, "server", kind, memory, *extra, port, arg, str(iters)],
        env=env, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(1.5)
    client = subprocess.run(
        [*cmd, "client", kind, memory, *extra, port, arg, str(iters)], env=env,
        capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    out, _ = server.communicate(timeout=120)
    if client.returncode or server.returncode:
        raise SystemExit(f"{name} failed: {client.stderr[-2000:]}")
    return [{**r, "variant": name} for r in json_lines(client.stdout) + json_lines(out)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="16 MB and 256 MB, 2 exchanges, 1 round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--gpu", action="store_true", help="uploads to a tensor on --device")
    ap.add_argument(
        "--serve", action="store_true", help="with --gpu: also upload into a real `genie serve`"
    )
    ap.add_argument("--serve-peer", nargs=5, metavar=("KIND", "MEMORY", "DEV", "SIZES", "N"))
    ap.add_argument("--device", default="cuda", help="with --gpu: cuda[:N], cpu, or meta (dry run)")
    ap.add_argument("--sizes", help="comma-separated sizes in MB (default 16,64,256,1024)")
    ap.add_argument(
        "--out", help="where the JSON goes (default bench/results/dataplane_zerocopy*.json)"
    )
    ap.add_argument("--exchange-peer", nargs=4, metavar=("ROLE", "PORTS", "SIZES", "N"))
    ap.add_argument(
        "--upload-peer", nargs=7, metavar=("ROLE", "KIND", "MEMORY", "DEV", "PORT", "SIZES", "N")
    )
    args = ap.parse_args()
    if args.exchange_peer:
        role, ports, sizes, iters = args.exchange_peer
        split_ports = [int(p) for p in ports.split(",")]
        exchange_peer(role, split_ports, [int(s) for s in sizes.split(",")], int(iters))
        return 0
    if args.serve_peer:
        kind, memory, device, sizes, iters = args.serve_peer
        serve_peer(kind, memory, device, [int(s) for s in sizes.split(",")], int(iters))
        return 0
    if args.upload_peer:
        role, kind, memory, device, port, sizes, iters = args.upload_peer
        split = [int(s) for s in sizes.split(",")]
        upload_peer(role, kind, memory, device, int(port), split, int(iters))
        return 0

    import genie

    if not genie._C._dpdk_available():
        print(f"bench_dataplane_zerocopy: DPDK unavailable: {genie._C._dpdk_unavailable_reason()}")
        return 0
    sizes = [16 * MB, 256 * MB] if args.quick else [16 * MB, 64 * MB, 256 * MB, 1024 * MB]
    if args.sizes:
        sizes = [int(float(s) * MB) for s in args.sizes.split(",")]
    iters = 2 if args.quick else 3
    rounds = 1 if args.quick else args.rounds
    if args.gpu:
        out = (
            Path(args.out)
            if args.out
            else ROOT / "bench" / "results" / "dataplane_zerocopy_gpu.json"
        )
        return gpu_main(args.device, sizes, iters, rounds, out, args.serve)
    raw = []
    for i in range(rounds):
        raw += [
            {**r, "round": i, "load_average": os.getloadavg()} for r in run_exchange(sizes, iters)
        ]
    exe = build()
    reg_sizes = ",".join(f"{n // MB}M" for n in sizes)
    reg = json_lines(
        subprocess.run([str(exe), "registration", reg_sizes, "5"], capture_output=True,
                       text=True, check=True).stdout
    )  # fmt: skip

    rows = []
    for n in sizes:
        row = {"bytes": n}
        for name in EXCHANGE_VARIANTS:
            rs = [r for r in raw if r["variant"] == name and r.get("bytes") == n]
            row[name] = {
                "gbps": statistics.median(r["gbps"] for r in rs),
                "rounds_gbps": [r["gbps"] for r in rs],
                "identical": all(r["identical"] for r in rs),
            }
        tcp = row["tcp loopback"]["gbps"]
        row["zero_copy_over_tcp"] = row["memif zero copy"]["gbps"] / tcp
        row["copy_ring_over_tcp"] = row["memif zero copy, copy ring"]["gbps"] / tcp
        row["staged_over_tcp"] = row["memif zero copy, staged"]["gbps"] / tcp
        row["copies_over_tcp"] = row["memif with copies"]["gbps"] / tcp
        r = pick(reg, "registration", n)
        row["register_us"], row["hit_ns"] = r["register_us"], r["hit_ns"]
        rows.append(row)
    copied = {
        name: {
            role: sum(
                r["bytes_copied"] for r in raw
                if r["variant"] == name and r["bench"] == "stats" and r["role"] == role
            )
            for role in ("client", "server")
        }
        for name in EXCHANGE_VARIANTS
    }  # fmt: skip
    hit500 = pick(reg, "registration_hit_500")
    goals = {
        "zero_copy_2x_tcp_at_16MB_and_up": all(r["zero_copy_over_tcp"] >= 2 for r in rows),
        "lru_hit_le_100ns": max(r["hit_ns"] for r in rows) <= 100 and hit500["hit_ns"] <= 100,
        "bytes_identical": all(r[name]["identical"] for r in rows for name in EXCHANGE_VARIANTS),
        "zero_copy_copied_nothing": copied["memif zero copy"] == {"client": 0, "server": 0},
    }

    print(f"{'size':>7} | {'memif zero copy':>15} | {'copy ring':>9} | {'staged':>9} | "
          f"{'memif copies':>12} | {'TCP':>6} | {'zc/TCP':>7} | {'ring/TCP':>8} | "
          f"{'stg/TCP':>7} | {'copies/TCP':>10} | {'register':>10} | {'LRU hit':>8}")  # fmt: skip
    print(f"{'':>7} | {'GB/s':>15} | {'GB/s':>9} | {'GB/s':>9} | {'GB/s':>12} | {'GB/s':>6} |")
    for r in rows:
        print(f"{r['bytes'] // MB:>5}MB | {r['memif zero copy']['gbps']:>15.2f} | "
              f"{r['memif zero copy, copy ring']['gbps']:>9.2f} | "
              f"{r['memif zero copy, staged']['gbps']:>9.2f} | "
              f"{r['memif with copies']['gbps']:>12.2f} | {r['tcp loopback']['gbps']:>6.2f} | "
              f"{r['zero_copy_over_tcp']:>6.2f}x | {r['copy_ring_over_tcp']:>7.2f}x | "
              f"{r['staged_over_tcp']:>6.2f}x | {r['copies_over_tcp']:>9.2f}x | "
              f"{r['register_us']:>8.0f}us | {r['hit_ns']:>6.1f}ns")  # fmt: skip
    print("bytes copied (client / server): " + "; ".join(
        f"{k} {v['client']} / {v['server']}" for k, v in copied.items()))  # fmt: skip
    print(f"LRU hit with 500 entries resident: {hit500['hit_ns']:.1f} ns; {rounds} round(s); "
          "load average %.1f %.1f %.1f" % os.getloadavg())  # fmt: skip
    print("goals:", ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in goals.items()))

    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "note": "shared 2-core VM; other work ran at the same time"},
        "exchange": "client sends N bytes, server echoes them; GB/s = 2N / median time; the "
                    "variants take turns exchange by exchange between the same two processes",
        "rounds": rounds,
        "load_average": os.getloadavg(),
        "rows": rows,
        "bytes_copied": copied,
        "registration_hit_500_ns": hit500["hit_ns"],
        "goals": goals,
        "raw": {"transports": raw, "registration": reg},
    }  # fmt: skip
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / "dataplane_zerocopy.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
