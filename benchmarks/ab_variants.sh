#!/usr/bin/env bash
# A/B of kernel variants in one device call: profile_kernels.py per variant, graph decoding at 128K per variant,
# bench_kernels.py per entry of BENCH (repeat names to interleave, e.g. BENCH="_variants/a _variants/b _variants/b
# _variants/a"; BENCH_ARGS, default "--batches 1 --lengths 8192,131072 --no-fp8"), then the GPU tests on the working
# tree (AB_TESTS=0 skips them). A variant is a directory holding a copy of the
# package, DIR/topklab (e.g. `git archive BRANCH topklab tests | tar -x -C _variants/NAME`); keep it untracked and
# not ignored, so that the device call copies it. VARIANT_TESTS="PYTEST ARGS" runs each variant's own
# tests/test_kernels_gpu.py (where it has one) with them, e.g. VARIANT_TESTS='-k "topk_matches or sort_kernel"'
# (-k also matches the variant's directory name: a variant named sort matches -k sort everywhere). Run from the
# repo root on the GPU machine:
#   VARIANTS="_variants/base _variants/new" DECODE="_variants/base _variants/new" bash benchmarks/ab_variants.sh
# Logs and tables under $OUT (or /tmp/ab_variants); ab_table.md: graph us per case, a column per variant
# (benchmarks/ab_table.py). Each variant's topklab comes first on PYTHONPATH. PROFILE_ARGS go to profile_kernels.py
# (e.g. "--batches 1").
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp/ab_variants}
mkdir -p "$out"
exec > >(tee "$out/ab.log") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
for v in $VARIANTS $BENCH; do
  test -d "$v/topklab" || { echo "no $v/topklab: a variant is a directory holding a copy of the package"; exit 2; }
done
for v in $VARIANTS; do
  echo "=== profile $v $(date +%T)"
  PYTHONPATH=$v:.:tests:benchmarks timeout 100 python3 benchmarks/profile_kernels.py \
    --out "$out/profile_$(basename "$v").md" $PROFILE_ARGS 2>&1 | grep "^| [a-z]"
done
for v in $DECODE; do
  echo "=== decoding $v $(date +%T)"
  PYTHONPATH=$v:.:tests:benchmarks timeout 150 python3 benchmarks/bench_decoding.py --contexts 131072 --steps 32 \
    --warmup 24 --modes graph-dense-flash,graph-topk-head,graph-topk-group \
    --json "$out/decoding_$(basename "$v").json" 2>&1 | tail -n 4
done
[ -n "$VARIANTS" ] && PYTHONPATH=benchmarks:. python3 benchmarks/ab_table.py "$out/ab.log" --out "$out/ab_table.md"
bench_args=${BENCH_ARGS:---batches 1 --lengths 8192,131072 --no-fp8}
run=0
for v in $BENCH; do  # after ab_table.py, which reads the profile sections of the log
  run=$((run + 1))
  echo "=== bench $v (run $run) $(date +%T)"
  PYTHONPATH=$v:.:benchmarks timeout 300 python3 benchmarks/bench_kernels.py \
    $bench_args --out "$out/bench_$(basename "$(realpath "$v")").$run.md" \
    2>&1 | grep -E "^(\| [0-9]+ \||Card)" | awk '!seen[$0]++'
done
if [ -n "${VARIANT_TESTS:-}" ]; then
  for v in $VARIANTS; do
    [ -f "$v/tests/test_kernels_gpu.py" ] || continue
    echo "=== variant tests $v $(date +%T)"
    (cd "$v" && eval "PYTHONPATH=.:tests timeout 120 python3 -m pytest -m gpu tests/test_kernels_gpu.py -q -x \
      -p no:cacheprovider $VARIANT_TESTS" 2>&1 | tail -n 3)
  done
fi
if [ "${AB_TESTS:-1}" != 0 ]; then
  echo "=== tests $(date +%T)"
  PYTHONPATH=.:tests timeout 280 python3 -m pytest -m gpu tests/test_kernels_gpu.py tests/test_decoding.py -q -x \
    -p no:cacheprovider 2>&1 | tail -n 4
fi
echo "=== done $(date +%T)"
