#!/usr/bin/env bash
# Nsight Compute on the Top-k kernels of chosen cases: where each kernel's time and stalls go.
# Run from the repo root on the GPU machine (Firecracker: ncu reads counters there; clocks left alone):
#   CASES="1,131072,2048 1,8192,2048" KERNELS="_finalize_kernel|_threshold_kernel" bash benchmarks/ncu_topk.sh
# Per case (batch,N,k): a report under $OUT (or /tmp/ncu_topk), its details page and its raw metrics (CSV: the warp
# stall samples by reason among them). Four launches of the chosen kernels are profiled after the first four. The
# driver runs as a file, not `python3 -c`, which puts the working directory ahead of PYTHONPATH (a variant's
# topklab): PYTHONPATH=_variants/NAME profiles that variant. ncu flushes the caches before each kernel it profiles,
# so a kernel that reads what the previous one left in L2 runs slower there than in a decode step.
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}.
out=${OUT:-/tmp/ncu_topk}
kernels=${KERNELS:-_finalize_kernel|_threshold_kernel|_sample_kernel|_score_kernel}
mkdir -p "$out"
for case in ${CASES:-1,131072,2048}; do
  IFS=, read -r batch n k <<< "$case"
  name="b${batch}_n${n}_k${k}"
  echo "=== $name $(date +%T)"
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
  ncu --clock-control none --set full --import-source yes -k "regex:$kernels" \
    --launch-skip 4 --launch-count 4 -f -o "$out/$name" \
    python3 "$out/driver_$name.py" > "$out/${name}_run.log" 2>&1 || { tail -n 20 "$out/${name}_run.log"; continue; }
  ncu -i "$out/$name.ncu-rep" --page details > "$out/${name}_details.txt" 2>&1
  ncu -i "$out/$name.ncu-rep" --page raw --csv > "$out/${name}_raw.csv" 2>&1
  grep -E "^  [a-z_]+kernel|Duration|Registers Per|Achieved Occupancy|Warp Cycles Per Issued|Executed Ipc A" \
    "$out/${name}_details.txt" | head -n 60
done
echo "=== done $(date +%T)"
