#!/usr/bin/env bash
# Scale-out of `topklab eval` on one multi-GPU host: the same work on one GPU, then under
# `torchrun --nproc-per-node NGPU` (each rank a disjoint shard of the samples, its own result files), then a check
# that the merged rows are the same and the speed-up. Run from the repo root on the GPU machine:
#   bash benchmarks/bench_eval_scaleout.sh MODEL [extra topklab eval arguments]
# Writes OUT_DIR (default $OUT/scaleout, or /tmp/scaleout): one/ and many/ result folders, timing.csv, scaleout.log.
set -euo pipefail
model=$1; shift
out=${OUT_DIR:-${OUT:-/tmp}/scaleout}
ngpu=${NGPU:-$(python3 -c "import torch; print(torch.cuda.device_count())")}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
mkdir -p "$out"
work=(--model "$model" --tasks "${TASKS:-passkey,niah_single,vt}" --lengths "${LENGTHS:-1024}"
      --samples "${SAMPLES:-16}" --indexers dense exact "oracle:p=0.5" --k 16,64 "$@")
now() { python3 -c "import time; print(time.time())"; }
t0=$(now)
python3 -m topklab.cli eval "${work[@]}" --out "$out/one" > "$out/one.log" 2>&1
t1=$(now)
torchrun --standalone --nproc-per-node "$ngpu" -m topklab.cli eval "${work[@]}" --out "$out/many" > "$out/many.log" 2>&1
t2=$(now)
python3 - "$out" "$ngpu" "$t0" "$t1" "$t2" <<'PY' | tee "$out/scaleout.log"
import sys
import pandas as pd
from topklab.tasks.evaluate import read_results
out, ngpu, t0, t1, t2 = sys.argv[1], int(sys.argv[2]), *map(float, sys.argv[3:])
one, many = read_results(f"{out}/one"), read_results(f"{out}/many")
key = ["task", "length", "sample", "indexer", "k", "per"]
a = one.sort_values(key).reset_index(drop=True)
b = many.sort_values(key).reset_index(drop=True)
same_rows = len(a) == len(b) and a[key].astype(str).equals(b[key].astype(str))
same_predictions = same_rows and (a["prediction"] == b["prediction"]).mean()
ranks = sorted(many["rank"].unique().tolist())
one_s, many_s = t1 - t0, t2 - t1
pd.DataFrame([{"gpus": 1, "seconds": one_s, "rows": len(one)}, {"gpus": ngpu, "seconds": many_s, "rows": len(many)}]
             ).to_csv(f"{out}/timing.csv", index=False)
print(f"rows: one GPU {len(one)}, {ngpu} GPUs {len(many)} (ranks {ranks}); same rows: {same_rows}; "
      f"same predictions: {same_predictions if same_rows else 'n/a'}")
print(f"wall: one GPU {one_s:.1f} s, {ngpu} GPUs {many_s:.1f} s, speed-up {one_s / many_s:.2f}x "
      f"(each includes its processes' start and model load)")
PY
