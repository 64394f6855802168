#!/usr/bin/env bash
# The GPU measurements the open issues ask for, in ONE device call (at most about 9.5 minutes;
# each step has its own time limit, so one slow step cannot eat the others' time):
#   there:  bash bench/gpu_all.sh            # run(command="bash bench/gpu_all.sh", timeout_s=600)
# Builds genie._C once from this tree (the machine's torch, the system g++; see gpu_setup.sh),
# then: pytest -m gpu; bench_remote_gpu.py (forwards, fresh-input rows, decode); bench_serving.py
# for BERT, GPT-2 and ResNet-50, fp32 and fp16, against torch.distributed.rpc (the 8-client load
# run for BERT only); bench_compile.py --device cuda. Logs and JSON go to $OUT; the tail of each
# table is printed. Run from a checkout on PYTHONPATH: import genie.compile registers the
# torch.compile backend there.
set -o pipefail
OUT=${OUT:-/tmp/gpu_all}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
t0=$(date +%s)
cmake -S . -B build/gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_COMPILER=/usr/bin/g++ \
  -DPython_EXECUTABLE="$(command -v python3)" > "$OUT/build.log" 2>&1 \
  && cmake --build build/gpu -j 16 >> "$OUT/build.log" 2>&1 && cp build/gpu/_C*.so python/genie/ \
  || { tail -30 "$OUT/build.log"; exit 1; }
echo "built in $(( $(date +%s) - t0 )) s"
export PYTHONPATH=$PWD/python${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
step() {  # step NAME SECONDS COMMAND...: run it with a time limit, log it, show its tail
  local name=$1 limit=$2
  shift 2
  local s=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "== $name: exit $? after $(( $(date +%s) - s )) s"
  tail -"${TAIL:-14}" "$OUT/$name.log"
}
step gpu_tests 60 python3 -m pytest -q -x -m gpu tests -p no:cacheprovider
step remote_gpu 120 python3 bench/bench_remote_gpu.py --no-local-executor --repeats 10 \
  --decode-runs 3 --tokens 24 --out "$OUT/remote_gpu.json"
for fam in bert gpt2 resnet; do
  load=--no-load limit=80
  [ "$fam" = bert ] && load= limit=100
  TAIL=20 step "serving_$fam" "$limit" python3 bench/bench_serving.py --device cuda --family "$fam" \
    --dtype float32,float16 --rounds 3 $load
done
cp bench/results/serving*_cuda.json "$OUT/" 2>/dev/null
step compile 90 python3 bench/bench_compile.py --device cuda
cp bench/results/compile_gpu.json "$OUT/" 2>/dev/null
echo "all done in $(( $(date +%s) - t0 )) s"
