#!/usr/bin/env bash
# The DPDK data plane on a lent GPU machine in ONE device call: installs DPDK from carried .deb
# files, builds genie with it, and runs bench/bench_dataplane_zerocopy.py --gpu (uploads into a
# CUDA server through memif zero copy, memif with copies and TCP loopback, GB/s, 16 MB - 1 GB).
#
#   here, once (FIELD-NOTES.md, "DPDK 22.11"; about 220 files, 25 MB):
#     echo /.debs/ >> .git/info/exclude; mkdir -p .debs; cd .debs && apt-get download $(apt-cache \
#       depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks --no-replaces \
#       --no-enhances libdpdk-dev | grep '^\w' | grep -E '^(librte|libdpdk|dpdk|libxdp|libbpf|libibverbs|libmlx|libnuma|libpcap|libfdt|libjansson|libisal|libarchive|libelf|libbsd|libmd|librdmacm|libefa|libipsec|libnl)' | sort -u)
#   there (carry .debs):
#     bash bench/gpu_dataplane.sh
#
# Why it is done this way (FIELD-NOTES.md): the GPU machines have no DPDK and reach no package
# registry; the packages unpack into $DPDK_ROOT (never into /); `pkg-config libdpdk` fails there
# because libpcap's private requirements want dbus-1, so the .pc files are copied with their
# prefix moved to $DPDK_ROOT and without Requires.private (only static links need those); EAL's
# built-in driver folder (/usr/lib/.../dpdk/pmds-23.0) does not exist there and loading a whole
# driver folder fails, so the two drivers memif needs are named one by one (eal_drivers).
# The build goes to build/gpu-dataplane and the package is staged beside it: python/genie is
# never written to, so a checkout that other work shares stays as it was.
#
# The bench: transport-level uploads (the server's receive path, Note: [Payload memory]) and,
# with --serve (on by default), uploads into a real `genie serve --device cuda` through genie's
# client; one round of each by default (about 2-3 minutes after a 1-2 minute build, estimated:
# not yet run on a GPU machine).
#
# Environment:
#   DPDK_ROOT   where the packages unpack (/opt/dpdk; not below /tmp: EAL refuses drivers in a
#               world-writable folder)
#   DEVICE      cuda (default); cpu or meta check the script on a machine without a GPU
#   BENCH_ARGS  the bench's arguments ("--serve --rounds 1"; "--serve --rounds 3" about triples
#               the bench's time; "--quick" for a short check)
#   OUT         where the JSON, the logs and the table go (bench/results)
#   JOBS        build jobs (all cores)
set -o pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
DPDK_ROOT=${DPDK_ROOT:-/opt/dpdk}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-$REPO/bench/results}
JOBS=${JOBS:-$(nproc)}
BUILD=$REPO/build/gpu-dataplane
STAGE=$BUILD/stage
LIB=$DPDK_ROOT/usr/lib/x86_64-linux-gnu
mkdir -p "$OUT"
say() { echo "gpu_dataplane: $*"; }
fail() { echo "gpu_dataplane: FAILED: $*"; exit 1; }
# A machine with DPDK installed (a development machine): EAL always loads its built-in driver
# folder, whose drivers next to the unpacked DPDK abort ("tailq is already registered"). The
# script then runs in a mount namespace of its own with that folder hidden, and sees what a GPU
# machine sees; nothing outside it changes.
SYS_PMDS=/usr/lib/x86_64-linux-gnu/dpdk/pmds-23.0
if [ -z "$GENIE_DATAPLANE_NS" ] && [ -n "$(ls -A "$SYS_PMDS" 2> /dev/null)" ]; then
  [ "$(id -u)" = 0 ] && command -v unshare > /dev/null || fail "$SYS_PMDS exists: run as root, with unshare"
  GENIE_DATAPLANE_NS=$(mktemp -d) exec unshare -m bash -c \
    'mount --bind "$GENIE_DATAPLANE_NS" '"$SYS_PMDS"' && exec bash "$0"' "$0"
fi
t_start=$(date +%s)
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

# 1. DPDK from the carried packages.
shopt -s nullglob
debs=(.debs/*.deb)
[ ${#debs[@]} -gt 0 ] || fail "no .deb files in .debs/ (see the top of this script)"
mkdir -p "$DPDK_ROOT"
for f in "${debs[@]}"; do dpkg-deb -x "$f" "$DPDK_ROOT" || fail "cannot unpack $f"; done
PC=$DPDK_ROOT/genie-pkgconfig
rm -rf "$PC" && mkdir -p "$PC"
for f in "$LIB"/pkgconfig/*.pc "$DPDK_ROOT"/usr/share/pkgconfig/*.pc; do
  sed -E -e "s|^([A-Za-z_]+)=/usr|\1=$DPDK_ROOT/usr|" -e '/^Requires\.private:/d' "$f" > "$PC/$(basename "$f")"
done
export PKG_CONFIG_LIBDIR=$PC PKG_CONFIG_PATH=
# Some -dev packages ship a .so that is a GNU ld script naming the library by its absolute
# path (libbsd.so: GROUP(/usr/lib/.../libbsd.so.0.11.7 ...)); point those into $DPDK_ROOT.
for f in "$LIB"/*.so; do
  if [ ! -L "$f" ] && head -c 64 "$f" | grep -q "GNU ld script"; then
    sed -i -E "s|([ (])/usr/lib/|\1$DPDK_ROOT/usr/lib/|g" "$f"
  fi
done
pkg-config --exists libdpdk || fail "pkg-config cannot read $PC/libdpdk.pc: $(pkg-config --print-errors libdpdk 2>&1)"
say "DPDK $(pkg-config --modversion libdpdk) unpacked into $DPDK_ROOT (${#debs[@]} packages)"
export LD_LIBRARY_PATH=$LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
PMDS=$LIB/dpdk/pmds-23.0
DRIVERS="eal_drivers=$PMDS/librte_mempool_ring.so.23;$PMDS/librte_net_memif.so.23"

# 2. Carried wheels, if any (gpu_setup.sh does the same).
whl=(.whl/*.whl)
if [ ${#whl[@]} -gt 0 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${whl[@]}" \
    || fail "installing the carried wheels"
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

# 3. Build genie with DPDK (and CUDA where the toolkit is found), staged apart from python/genie.
# The system g++: /opt/gcc's newer one inlines libstdc++ code that does not match the system
# libstdc++ loaded at run time (gpu_setup.sh).
CXX=/usr/bin/g++
[ -x "$CXX" ] || CXX=$(command -v g++)
# A fresh configuration each time: pkg-config's answers for another DPDK_ROOT stay cached.
rm -f "$BUILD/CMakeCache.txt"
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_COMPILER="$CXX" \
  -DGENIE_WITH_DPDK=ON -DPython_EXECUTABLE="$(command -v python3)" > "$OUT/gpu_dataplane_build.log" 2>&1 \
  || { tail -30 "$OUT/gpu_dataplane_build.log"; fail "cmake configure"; }
cmake --build "$BUILD" -j "$JOBS" --target _C genie-dpdk-agent genie_dpdk_inprocess \
  >> "$OUT/gpu_dataplane_build.log" 2>&1 || { tail -40 "$OUT/gpu_dataplane_build.log"; fail "build"; }
grep -E "genie: GENIE_WITH_(DPDK|CUDA)" "$OUT/gpu_dataplane_build.log" | sed 's/^-- /gpu_dataplane: /'
rm -rf "$STAGE" && mkdir -p "$STAGE"
cp -r python/genie "$STAGE/genie"
cp "$BUILD"/_C*.so "$BUILD"/genie-dpdk-agent "$BUILD"/libgenie_dpdk_inprocess.so "$STAGE/genie/"
export PYTHONPATH=$STAGE${PYTHONPATH:+:$PYTHONPATH}
# Where an editable install of genie shadows the staged package (a development machine), the
# staged agent is still the one started.
export GENIE_DPDK_AGENT=$STAGE/genie/genie-dpdk-agent
export GENIE_DPDK_OPTIONS="${DRIVERS}${GENIE_DPDK_OPTIONS:+ $GENIE_DPDK_OPTIONS}"
say "built in $(( $(date +%s) - t_start )) s; GENIE_DPDK_OPTIONS=$GENIE_DPDK_OPTIONS"
python3 - << 'EOF' || fail "genie cannot run the DPDK transport here"
import genie, torch
from genie import _C
info = _C._dataplane_build_info()
print(f"gpu_dataplane: genie from {genie.__file__}; torch {torch.__version__}, cuda {torch.cuda.is_available()}; "
      f"DPDK {info['dpdk_version'] or info['dpdk_reason']}; CUDA registration {info['cuda']} "
      f"({info['cuda_runtime'] or 'none'}); agent {_C._dataplane_agent_path()}")
raise SystemExit(0 if _C._dpdk_available() else f"unavailable: {_C._dpdk_unavailable_reason()}")
EOF
# One memif round trip between two agents, before the long run: a driver that does not load
# fails here in seconds, with EAL's words.
python3 - << 'EOF' || fail "no DPDK data plane between two agents"
import threading
from genie.runtime import transports
from genie.runtime.protocol import AUTH_OK
lst = transports.listen("127.0.0.1", 0, kind="dpdk")
box = {}
def serve():
    t = lst.accept(60); t.send_frame(1, AUTH_OK, b""); box["s"] = t
    t.recv_frame(64)
th = threading.Thread(target=serve); th.start()
c = transports.connect("%s:%d" % lst.address, kind="dpdk", timeout=30)
c.recv_frame(64)
plane = c.data_plane
rtt = c.ping() if plane == "up" else None
c.send_frame(1, 9, b"bye"); th.join(30); c.close(); box["s"].close(); lst.close()
print(f"gpu_dataplane: data plane {plane}, one 64-byte round trip {rtt} us")
raise SystemExit(0 if plane == "up" else 1)
EOF

# 4. The benchmark.
export PYTHONUNBUFFERED=1
say "bench: uploads to $DEVICE, $(( $(date +%s) - t_start )) s in"
timeout "${BENCH_TIMEOUT:-420}" python3 bench/bench_dataplane_zerocopy.py --gpu --device "$DEVICE" \
  --out "$OUT/dataplane_zerocopy_gpu.json" ${BENCH_ARGS---serve --rounds 1} 2>&1 | tee "$OUT/gpu_dataplane_bench.log"
rc=$?
say "done in $(( $(date +%s) - t_start )) s (bench exit $rc)"
exit $rc
