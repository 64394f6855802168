#!/usr/bin/env bash
# The GPU measurements the open issues ask for, in TWO device calls fired back to back (each at
# most about 9.5 minutes; every step has its own time limit, so one slow step cannot eat the
# others' time):
#   there:  bash bench/gpu_all.sh A      # run(command="bash bench/gpu_all.sh A", carry=[".old"])
#           bash bench/gpu_all.sh B
# A: builds genie._C from this tree (the machine's torch, the system g++; see gpu_setup.sh) and,
#    when .old/ holds an older tree (here: rm -rf .old && mkdir .old && git archive REV | tar -x
#    -C .old; .old/ is in .git/info/exclude), that one too, in parallel; pytest -m gpu;
#    bench_remote_gpu.py's forward rows with the old package (today's script), then today's
#    whole bench_remote_gpu.py (forwards, fresh-input rows against eager and rpc, decode);
#    bench_compile.py --device cuda.
# C: the compiled path: its timeline and compiled-vs-eager row, old and new side by side when
#    .old/ holds a tree; the compile table; its client CPU against lazy capture (below).
# B: bench_serving.py for BERT, GPT-2 and ResNet-50, fp32 and fp16, against
#    torch.distributed.rpc (the 8-client load run for BERT only).
# Logs and JSON go to $OUT; the tail of each table is printed. Run from a checkout on
# PYTHONPATH: import genie.compile registers the torch.compile backend there.
set -o pipefail
OUT=${OUT:-/tmp/gpu_all}
PART=${1:-A}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
t0=$(date +%s)
build() {  # build DIR NAME: genie._C into DIR/python/genie (kept between calls on one machine)
  (cd "$1" && { [ -f build/gpu/build.ninja ] || cmake -S . -B build/gpu -G Ninja \
      -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_COMPILER=/usr/bin/g++ \
      -DPython_EXECUTABLE="$(command -v python3)" > "$OUT/build-$2.log" 2>&1; } \
    && cmake --build build/gpu -j 8 >> "$OUT/build-$2.log" 2>&1 && cp build/gpu/_C*.so python/genie/ \
    && echo "built $2") || { tail -30 "$OUT/build-$2.log"; return 1; }
}
step() {  # step NAME SECONDS COMMAND...: run it with a time limit, log it, show its tail
  local name=$1 limit=$2
  shift 2
  local s=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "== $name: exit $? after $(( $(date +%s) - s )) s"
  tail -"${TAIL:-14}" "$OUT/$name.log"
}
export PYTHONUNBUFFERED=1
NEW=$PWD/python
if [ "$PART" = A ] || [ "$PART" = V ]; then
  build . new & { [ -d .old ] && build .old old; } & wait
  ls python/genie/_C*.so > /dev/null 2>&1 || exit 1
  echo "built in $(( $(date +%s) - t0 )) s"
  [ "$PART" = A ] && PYTHONPATH=$NEW step gpu_tests 60 python3 -m pytest -q -x -m gpu tests -p no:cacheprovider
  if [ -d .old ]; then
    TAIL=10 PYTHONPATH=$PWD/.old/python step remote_gpu_old 100 python3 bench/bench_remote_gpu.py \
      --no-local-executor --no-decode --no-rpc --repeats 15 --out "$OUT/remote_gpu_old.json"
  fi
  DECODE="--decode-runs 3 --tokens 24"
  [ "$PART" = V ] && DECODE=--no-decode  # V: the forward and fresh-input rows only
  TAIL=24 PYTHONPATH=$NEW step remote_gpu 190 python3 bench/bench_remote_gpu.py --no-local-executor \
    --repeats 15 $DECODE --out "$OUT/remote_gpu.json"
  TAIL=40 PYTHONPATH=$NEW step timeline_fresh 90 python3 bench/bench_remote_timeline_gpu.py --fresh \
    --models ResNet-50 --dtypes float32 --spin 0,10000 --repeats 15 --out "$OUT/timeline_fresh.json"
  FAMILIES=resnet
  [ "$PART" = V ] && FAMILIES=
elif [ "$PART" = C ]; then
  # C: the compiled path (torch.compile backend="genie"). This tree and, when .old/ holds
  # another, that one too, side by side: the compiled timeline of BERT-base fp32 (client,
  # server, the CUDA graph's GPU time against the eager model as one CUDA graph) and its
  # compiled-vs-eager row; then, for this tree, the compile table (columns in turns) and the
  # client CPU columns against lazy capture, replies waited for (GENIE_SPIN_US=0). $PROFILE:
  # a script of one's own run after the GPU tests (a cProfile of the client, say). $SPIN: the
  # timeline's spin settings (default 0: "0,10000" for both); $QUICK: stop before the table.
  build . new & { [ -d .old ] && build .old old; } & wait
  ls python/genie/_C*.so > /dev/null 2>&1 || exit 1
  echo "built in $(( $(date +%s) - t0 )) s"
  PYTHONPATH=$NEW step gpu_tests 70 python3 -m pytest -q -x -m gpu tests -p no:cacheprovider
  [ -f "$PROFILE" ] && TAIL=45 PYTHONPATH=$NEW step profile 60 python3 "$PROFILE"
  for tree in old new; do
    py=$NEW; [ $tree = old ] && py=$PWD/.old/python
    [ $tree = old ] && [ ! -d .old ] && continue
    TAIL=28 PYTHONPATH=$py step "timeline_$tree" 90 python3 bench/bench_remote_timeline_gpu.py \
      --compiled --fresh --models BERT-base --dtypes float32 --spin "${SPIN:-0}" --repeats 20 \
      --out "$OUT/timeline_$tree.json"
    TAIL=3 PYTHONPATH=$py step "bert_fp32_$tree" 50 python3 bench/bench_compile.py --device cuda \
      --models BERT-base --dtypes fp32 --no-inductor --repeats 30 --out "compile_bert_$tree.json"
  done
  [ -n "$QUICK" ] && { echo "part C (QUICK: no table) done in $(( $(date +%s) - t0 )) s"; exit 0; }
  TAIL=8 PYTHONPATH=$NEW step compile 230 python3 bench/bench_compile.py --device cuda
  TAIL=6 GENIE_SPIN_US=0 PYTHONPATH=$NEW step compile_cpu 110 python3 bench/bench_compile.py \
    --device cuda --lazy --no-inductor --dtypes fp32 --out compile_gpu_lazy.json
  cp bench/results/compile_gpu.json bench/results/compile_gpu_lazy.json \
    bench/results/compile_bert_*.json "$OUT/" 2>/dev/null
  FAMILIES=
else
  ls python/genie/_C*.so > /dev/null 2>&1 || build . new || exit 1
  TAIL=9 PYTHONPATH=$NEW step remote_gpu 120 python3 bench/bench_remote_gpu.py --no-local-executor \
    --repeats 20 --no-decode --out "$OUT/remote_gpu.json"
  PYTHONPATH=$NEW step compile 170 python3 bench/bench_compile.py --device cuda
  cp bench/results/compile_gpu.json "$OUT/" 2>/dev/null
  FAMILIES=bert
fi
for fam in $FAMILIES; do
  load=--no-load limit=110
  [ "$fam" = bert ] && load= limit=150
  TAIL=20 PYTHONPATH=$NEW step "serving_$fam" "$limit" python3 bench/bench_serving.py \
    --device cuda --family "$fam" --dtype float32,float16 --rounds 3 $load
done
cp bench/results/serving*_cuda.json "$OUT/" 2>/dev/null
echo "part $PART done in $(( $(date +%s) - t0 )) s"
