#!/usr/bin/env bash
# bench_kernels.py for kernel variants, interleaved, in one device call: the graph-timed tables of each run, so that
# variants compare within one machine (machines of one type differ by up to 4 us; a run's spread is 2-3 us). A variant
# is a directory holding a copy of the package, DIR/topklab, untracked and not ignored so that the call copies it
# (e.g. `git archive BRANCH topklab | tar -x -C _variants/NAME`); "." is the working tree. Run from the repo root:
#   ORDER="_variants/base _variants/new _variants/new _variants/base" bash benchmarks/ab_bench.sh
# BENCH_ARGS go to bench_kernels.py (default "--batches 1 --lengths 8192,131072 --no-fp8"); each run's markdown
# goes under $OUT (or /tmp/ab_bench) as NAME.RUN.md.
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp/ab_bench}
mkdir -p "$out"
args=${BENCH_ARGS:---batches 1 --lengths 8192,131072 --no-fp8}
run=0
for v in ${ORDER:?ORDER must name the variants, e.g. ORDER=\"_variants/base _variants/new\"}; do
  test -d "$v/topklab" || { echo "no $v/topklab: a variant is a directory holding a copy of the package"; exit 2; }
done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
for v in $ORDER; do
  run=$((run + 1))
  echo "=== $v (run $run) $(date +%T)"
  PYTHONPATH=$v:.:benchmarks timeout 300 python3 benchmarks/bench_kernels.py $args \
    --out "$out/$(basename "$(realpath "$v")").$run.md" 2>&1 | grep -E "^(\| [0-9]+ \||Card)" | awk '!seen[$0]++'
done
echo "=== done $(date +%T)"
