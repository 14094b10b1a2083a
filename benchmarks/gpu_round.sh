#!/usr/bin/env bash
# One device call: GPU tests on the second GPU (when there is one) while the profile and benchmarks run on the first;
# otherwise one after the other. SECOND_STAGES (default tests) / BENCH_STAGES pick the stages of each GPU;
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
  CUDA_VISIBLE_DEVICES=1 STAGES="${SECOND_STAGES:-tests}" OUT="$out/t" timeout ${TESTS_TIMEOUT:-420} bash benchmarks/gpu_check.sh \
    > "$out/tests_stdout.log" 2>&1 &
  tests=$!
  CUDA_VISIBLE_DEVICES=0 STAGES="${BENCH_STAGES:-profile kernels decoding}" timeout ${BENCH_TIMEOUT:-520} \
    bash benchmarks/gpu_check.sh
  wait $tests
else
  STAGES="tests ${BENCH_STAGES:-profile kernels decoding}" timeout ${BENCH_TIMEOUT:-520} bash benchmarks/gpu_check.sh
fi
rm -f "$out/t/gpu.txt" "$out/bench.log" "$out/t/bench.log"
tail -n 15 "$out/tests_stdout.log" "$out/t/gpu_tests.log" "$out/gpu_tests.log" 2>/dev/null
