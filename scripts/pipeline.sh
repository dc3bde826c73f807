#!/usr/bin/env bash
# The whole job on the demo model and the sample data (CPU-sized: a few minutes on 2 cores):
# fetch+import the model, dataprep, train, merge, compare on held-out conversations, report.
# Rebuilds runs/demo (RUN_DIR) on every call.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bin-dir.sh
export DIALORA_BIN=$BIN
MODEL=${MODEL:-models/smollm2-135m-instruct}
RUN=${RUN_DIR:-runs/demo}
EPOCHS=${EPOCHS:-1}
LR=${LR:-2e-3}
t0=$(date +%s)
step() { echo; echo "== $* ($(( $(date +%s) - t0 ))s)"; }

step "model"
scripts/fetch-model.sh "$MODEL"
mkdir -p "$RUN"
step "dataprep"
scripts/prepare-data.sh "$MODEL" "$RUN/shards" data/counsel_train.jsonl -- \
  --val-split 0.15 --max-seq-len 256 --overwrite
step "train"
rm -rf "$RUN/adapter"
scripts/train.sh "$MODEL" "$RUN/shards" "$RUN/adapter" --run-name "$(basename "$RUN")" \
  --lora-r 8 --lora-alpha 16 --lora-dropout 0.05 --target-modules all-linear \
  --learning-rate "$LR" --num-train-epochs "$EPOCHS" --per-device-train-batch-size 4 --group-by-length true \
  --lr-scheduler-type cosine --warmup-ratio 0.1 --logging-steps 2 --eval-steps 7 --save-steps 14
step "merge"
scripts/merge.sh "$MODEL" "$RUN/adapter" "$RUN/merged" --overwrite
step "compare (held-out conversations, base vs fine-tuned)"
scripts/compare.sh "$MODEL" "$RUN/adapter" data/counsel_heldout.jsonl "$RUN/adapter/compare.jsonl" --max-new-tokens 80
step "report"
scripts/report.sh "$RUN/report.html" "$RUN/adapter" --overwrite
echo
echo "pipeline done in $(( $(date +%s) - t0 ))s"
echo "  adapter:    $RUN/adapter (adapter_model.safetensors, adapter_config.json, metrics.csv, run.json)"
echo "  merged:     $RUN/merged"
echo "  comparison: $RUN/adapter/compare.md ($RUN/adapter/compare.jsonl)"
echo "  report:     $RUN/report.html"
