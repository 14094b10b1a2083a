#!/usr/bin/env bash
# One device call for the kernels: GPU tests, then the benchmark. Run from the repo root on the GPU machine:
#   bash benchmarks/gpu_check.sh            (writes under $OUT, or /tmp/gpu_check without it)
# The GPU image has torch and triton but not this package: it runs from the tree with PYTHONPATH.
set -o pipefail
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
export PYTHONPATH=.:tests PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
python3 -m pytest tests/test_kernels_gpu.py -q -p no:cacheprovider --durations=5 2>&1 | tail -n 60 > "$out/gpu_tests.log"
tests_rc=$?
tail -n 25 "$out/gpu_tests.log"
python3 benchmarks/bench_kernels.py --out "$out/bench_kernels.md" "$@" 2>&1 | tee "$out/bench.log" | tail -n 60
exit $tests_rc
