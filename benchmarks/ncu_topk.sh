#!/usr/bin/env bash
# Nsight Compute on the Top-k kernels (or the FP8 index kernel) of chosen cases: where time and stalls go.
# Run from the repo root on the GPU machine (Firecracker: ncu reads counters there; clocks left alone):
#   CASES="1,131072,2048 1,8192,2048" KERNELS="_finalize_kernel|_threshold_kernel" bash benchmarks/ncu_topk.sh
#   OP=fp8 CASES="16,4,131072" bash benchmarks/ncu_topk.sh      (FP8 index scoring: cases batch,M,N, 64 heads;
#   the Gluon kernel on Hopper, TOPKLAB_FP8_GLUON=0 for the Triton one)
# Per case (batch,N,k; with OP=fp8 batch,M,N): a report under $OUT (or /tmp/ncu_topk), its details page and its raw
# metrics (CSV: the warp stall samples by reason among them). Four launches of the chosen kernels are profiled after
# the first four. The driver runs as a file, not `python3 -c`, which puts the working directory ahead of PYTHONPATH
# (a variant's topklab): PYTHONPATH=_variants/NAME profiles that variant. ncu flushes the caches before each kernel
# it profiles, so a kernel that reads what the previous one left in L2 runs slower there than in a decode step.
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}.:benchmarks
out=${OUT:-/tmp/ncu_topk}
op=${OP:-topk}
case $op in
  topk) kernels=${KERNELS:-_finalize_kernel|_threshold_kernel|_sample_kernel|_score_kernel}
        cases=${CASES:-1,131072,2048} ;;
  fp8) kernels=${KERNELS:-_fp8_index_kernel|_fp8_index_gluon_kernel}
       cases=${CASES:-16,4,131072} ;;
  *) echo "OP must be topk or fp8, got $op"; exit 2 ;;
esac
mkdir -p "$out"
for case in $cases; do
  IFS=, read -r batch second third <<< "$case"
  if [ "$op" = fp8 ]; then
    name="fp8_b${batch}_m${second}_n${third}"
    cat > "$out/driver_$name.py" <<PY
import torch
from bench_kernels import fp8_inputs
from topklab.kernels import fp8_index_scores
args = fp8_inputs($batch, $second, $third)
for _ in range(8):
    fp8_index_scores(*args)
torch.cuda.synchronize()
PY
  else
    n=$second k=$third
    name="b${batch}_n${n}_k${k}"
    cat > "$out/driver_$name.py" <<PY
import torch
from topklab.kernels import topk
torch.manual_seed(0)
q = torch.randn($batch, 32, 128, device="cuda", dtype=torch.bfloat16)
keys = torch.randn($batch, 8, $n, 128, device="cuda", dtype=torch.bfloat16)
for _ in range(8):
    topk(q, keys, $k, sorted=False)
torch.cuda.synchronize()
PY
  fi
  echo "=== $name $(date +%T)"
  ncu --clock-control none --set full --import-source yes -k "regex:$kernels" \
    --launch-skip 4 --launch-count 4 -f -o "$out/$name" \
    python3 "$out/driver_$name.py" > "$out/${name}_run.log" 2>&1 || { tail -n 20 "$out/${name}_run.log"; continue; }
  ncu -i "$out/$name.ncu-rep" --page details > "$out/${name}_details.txt" 2>&1
  ncu -i "$out/$name.ncu-rep" --page raw --csv > "$out/${name}_raw.csv" 2>&1
  grep -E "^  [a-z_]+kernel|Duration|Registers Per|Achieved Occupancy|Warp Cycles Per Issued|Executed Ipc A" \
    "$out/${name}_details.txt" | head -n 60
done
echo "=== done $(date +%T)"
