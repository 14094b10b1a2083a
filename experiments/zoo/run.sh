#!/usr/bin/env bash
# Train the zoo on one GPU and fine-tune it both ways, in one go (about 5 minutes on an H100):
#   1. pre-train zoo-s (Wikipedia haystacks) and zoo-s-noise (RULER's repeated-noise haystacks) side by side, dense
#      attention, loss on every token with answers weighted x10, from experiments/zoo/configs/;
#   2. keep the one whose answer loss over its last 100 steps is lower (both are kept on disk);
#   3. fine-tune it twice with the same data, steps and seed: dense attention (the control) and Top-k attention
#      (exact, 2% of the context per query head: the study's Top-k SFT), side by side.
# Fine-tuning uses the base's own tasks and haystack text. Checkpoints go to $CKPT (default results/zoo,
# git-ignored); with $OUT set (the lent GPU machine) each is also packed there as a .tar as soon as it is done.
# Time guards (train.max_seconds) stop a phase early on a slow machine; the steps done are recorded.
# Knobs: ZOO_CONFIGS (names in configs/, .json or .toml), ZOO_STEPS, SFT_STEPS, SFT_K, SFT_LENGTHS, DEVICE, CKPT.
# With several GPUs the side-by-side jobs are spread over them.
#
#   bash experiments/zoo/run.sh                                      # on the GPU
#   DEVICE=cpu ZOO_STEPS=3 SFT_STEPS=3 bash experiments/zoo/run.sh   # plumbing check on CPU
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python; fi
fi
CKPT=${CKPT:-results/zoo}
DEVICE=${DEVICE:-cuda}
ZOO_CONFIGS=${ZOO_CONFIGS:-"zoo-s zoo-s-noise"}
SFT_K=${SFT_K:-0.02}
SFT_STEPS=${SFT_STEPS:-300}
FILLER=results/zoo_filler   # the bundled Wikipedia text as .txt files, which zoo-s reads (no gensim on the GPU)
mkdir -p "$CKPT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}

if [ ! -d "$FILLER" ]; then $PY -m topklab.training.zoo --export-filler "$FILLER"; fi
steps=()
[ -n "${ZOO_STEPS:-}" ] && steps=(--steps "$ZOO_STEPS")

# with several GPUs the jobs of a phase take them in turn (cuda:0, cuda:1, ...)
gpus=1
if [ "$DEVICE" = cuda ]; then gpus=$($PY -c "import torch; print(max(1, torch.cuda.device_count()))"); fi
device_of() { if [ "$DEVICE" = cuda ]; then echo "cuda:$(( $1 % gpus ))"; else echo "$DEVICE"; fi; }

pids=()
job=0
for name in $ZOO_CONFIGS; do
  config=experiments/zoo/configs/$name.json
  if [ ! -f "$config" ]; then config=experiments/zoo/configs/$name.toml; fi
  $PY -m topklab.training.zoo "$config" --out "$CKPT/$name" --device "$(device_of $job)" \
      --max-seconds "${ZOO_MAX_SECONDS:-150}" "${steps[@]}" > "$CKPT/$name.log" 2>&1 &
  pids+=($!)
  job=$((job + 1))
done
names=($ZOO_CONFIGS)
for i in "${!pids[@]}"; do
  wait "${pids[$i]}" || echo "training ${names[$i]} failed: see $CKPT/${names[$i]}.log" >&2
done
pack() {  # the checkpoint folder and its log, whichever exist (a failed run still sends its log back)
  local parts=()
  for part in "$1" "$1.log"; do
    if [ -e "$CKPT/$part" ]; then parts+=("$part"); fi
  done
  if [ -n "${OUT:-}" ] && [ ${#parts[@]} -gt 0 ]; then tar -cf "$OUT/$1.tar" -C "$CKPT" "${parts[@]}"; fi
}
for name in $ZOO_CONFIGS; do pack "$name"; done

best=$($PY - "$CKPT" $ZOO_CONFIGS <<'EOF'
import sys
import pandas as pd
folder, names = sys.argv[1], sys.argv[2:]
losses = {n: pd.read_csv(f"{folder}/{n}/train_log.csv")["answer_loss"].tail(100).mean() for n in names}
for n, v in losses.items():
    print(f"{n}: answer loss over the last 100 steps {v:.4f}", file=sys.stderr)
print(min(losses, key=losses.get))
EOF
)
echo "fine-tuning $best" >&2

common=(--model "$CKPT/$best" --lengths "${SFT_LENGTHS:-1024,2048}" --steps "$SFT_STEPS" --batch-size 16 --lr 5e-4 --warmup 20
        --data-seed 2 --seed 0 --max-seconds "${SFT_MAX_SECONDS:-75}" --workers 7)
[ "$DEVICE" = cuda ] && common+=(--dtype bfloat16)
$PY -m topklab.training.topk_sft "${common[@]}" --device "$(device_of 0)" --dense --out "$CKPT/$best-dense-sft" > "$CKPT/$best-dense-sft.log" 2>&1 &
dense=$!
$PY -m topklab.training.topk_sft "${common[@]}" --device "$(device_of 1)" --k "$SFT_K" --out "$CKPT/$best-topk-sft" > "$CKPT/$best-topk-sft.log" 2>&1 &
topk=$!
status=0
wait $dense || { echo "dense SFT failed: see $CKPT/$best-dense-sft.log" >&2; status=1; }
wait $topk || { echo "Top-k SFT failed: see $CKPT/$best-topk-sft.log" >&2; status=1; }
pack "$best-dense-sft"
pack "$best-topk-sft"
tail -n 3 "$CKPT"/*.log
exit $status
