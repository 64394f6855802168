#!/usr/bin/env bash
# Where a fresh input's time goes on a GPU host, in one device call: builds genie._C (as
# gpu_all.sh does), measures raw loopback TCP for the input sizes involved, then the traced
# timeline of remote forwards with the input uploaded every call (bench_remote_timeline_gpu.py
# --fresh) against eager with the input copied each call.
#   there:  bash bench/gpu_fresh.sh [MODELS] [DTYPES]
set -o pipefail
OUT=${OUT:-/tmp/gpu_fresh}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader
t0=$(date +%s)
cmake -S . -B build/gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_COMPILER=/usr/bin/g++ \
  -DPython_EXECUTABLE="$(command -v python3)" > "$OUT/build.log" 2>&1 \
  && cmake --build build/gpu -j 16 >> "$OUT/build.log" 2>&1 && cp build/gpu/_C*.so python/genie/ \
  || { tail -30 "$OUT/build.log"; exit 1; }
echo "built in $(( $(date +%s) - t0 )) s"
export PYTHONPATH=$PWD/python${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 - <<'PY'
import socket, statistics, threading, time
for size in (8 << 10, 4816896, 16 << 20):
    ls = socket.create_server(("127.0.0.1", 0))
    a = socket.create_connection(ls.getsockname())
    b, _ = ls.accept()
    for s in (a, b):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf, out = bytearray(size), bytearray(size)
    done = threading.Event()
    def rx():
        mv = memoryview(out)
        for _ in range(40):
            n = 0
            while n < size:
                n += b.recv_into(mv[n:])
            b.sendall(b"k")
    t = threading.Thread(target=rx)
    t.start()
    ts = []
    for _ in range(40):
        t1 = time.perf_counter()
        a.sendall(buf)
        a.recv(1)
        ts.append((time.perf_counter() - t1) * 1e3)
    t.join()
    ms = statistics.median(ts[5:])
    print(f"loopback TCP, one stream, {size} bytes: {ms:.3f} ms ({size / ms / 1e6:.2f} GB/s)")
PY
timeout 300 python3 bench/bench_remote_timeline_gpu.py --fresh --models "${1:-ResNet-50,BERT-base}" \
  --dtypes "${2:-float32}" --spin 0,10000 --repeats 20 --out "$OUT/timeline_fresh.json" 2>&1 \
  | tee "$OUT/timeline.log" | tail -80
echo "all done in $(( $(date +%s) - t0 )) s"
