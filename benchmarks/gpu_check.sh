#!/usr/bin/env bash
# One device call for the kernels and the decoding benchmark. Run from the repo root on the GPU machine:
#   bash benchmarks/gpu_check.sh                    (every stage; logs under $OUT, or /tmp/gpu_check without it)
#   STAGES="tests profile" KERNEL_ARGS="--batches 1,16 --lengths 8192,131072" bash benchmarks/gpu_check.sh
# Stages: tests (GPU tests of the kernels and of decoding), profile (GPU and host time per kernel),
# kernels (bench_kernels.py with KERNEL_ARGS), decoding (bench_decoding.py with DECODING_ARGS, profiler tables).
# The GPU image has torch and triton but not this package: it runs from the tree with PYTHONPATH.
set -o pipefail
out=${OUT:-/tmp/gpu_check}
stages=${STAGES:-tests profile kernels decoding}
mkdir -p "$out"
export PYTHONPATH=.:tests PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
rc=0
for stage in $stages; do
  echo "=== $stage $(date +%T)"
  case $stage in
    tests) python3 -m pytest -m gpu tests/test_kernels_gpu.py tests/test_fp8_index.py tests/test_decoding.py \
             tests/test_lightning.py tests/test_indexers_approx.py -q -p no:cacheprovider \
             --durations=5 -x 2>&1 | tail -n 40 > "$out/gpu_tests.log" || rc=1
           tail -n 12 "$out/gpu_tests.log" ;;
    profile) python3 benchmarks/profile_kernels.py --out "$out/profile.md" 2>&1 | tail -n 30 || rc=1 ;;
    kernels) python3 benchmarks/bench_kernels.py --out "$out/bench_kernels.md" $KERNEL_ARGS 2>&1 \
               | tee "$out/bench.log" | tail -n 50 || rc=1 ;;
    decoding) python3 benchmarks/bench_decoding.py --json "$out/decoding.json" --profile "$out/decoding_profile.md" \
                $DECODING_ARGS 2>&1 | tail -n 12 || rc=1 ;;
  esac
done
echo "=== done $(date +%T)"
exit $rc
