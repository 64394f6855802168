#!/usr/bin/env bash
# Old and new commit side by side on one lent GPU (METHOD.md: one call, same machine):
#   here:   rm -rf .old .new; mkdir .old .new
#           git archive OLD_REV | tar -x -C .old; git archive HEAD | tar -x -C .new
#           (.old/ and .new/ listed in .git/info/exclude; carry both)
#   there:  bash bench/gpu_compare.sh            # builds both in parallel, benches each, runs -m gpu
# Writes $OUT/old.json, $OUT/new.json and the logs; prints each table's tail.
set -o pipefail
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
build() {
  (cd "$1" && cmake -S . -B build/gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_COMPILER=/usr/bin/g++ \
      -DPython_EXECUTABLE="$(command -v python3)" > "$OUT/build-$2.log" 2>&1 \
    && cmake --build build/gpu -j 8 >> "$OUT/build-$2.log" 2>&1 && cp build/gpu/_C*.so python/genie/ \
    && echo "built $2") || tail -30 "$OUT/build-$2.log"
}
build .old old & build .new new & wait
export PYTHONUNBUFFERED=1
ARGS=${BENCH_ARGS:-"--no-local-executor --repeats 10 --decode-runs 3 --tokens 24"}
for side in old new; do
  (cd ".$side" && PYTHONPATH=$PWD/python timeout 200 python3 bench/bench_remote_gpu.py $ARGS \
     --out "$OUT/$side.json" > "$OUT/$side.log" 2>&1; tail -11 "$OUT/$side.log")
done
(cd .new && PYTHONPATH=$PWD/python timeout 100 python3 -m pytest -q -x -m gpu tests -p no:cacheprovider \
   > "$OUT/gpu_tests.log" 2>&1; tail -4 "$OUT/gpu_tests.log")
