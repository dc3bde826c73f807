#!/usr/bin/env bash
# Stage 2: shards + base model -> adapter, metrics.csv, run.json.   train.sh MODEL_DIR DATA_DIR OUT_DIR [trainer flags]
# Resumes automatically when OUT_DIR already holds checkpoints of an unfinished run (requeue).
set -euo pipefail
BIN=${DIALORA_BIN:-$(cd "$(dirname "$0")/.." && pwd)/target/release}
MODEL=$1; DATA=$2; OUT=$3; shift 3
extra=()
if ls -d "$OUT"/checkpoint-* >/dev/null 2>&1 && [ ! -f "$OUT/adapter_model.safetensors" ]; then
  extra=(--resume-from-checkpoint latest)
fi
exec "$BIN/trainer" --model "$MODEL" --data "$DATA" --output-dir "$OUT" "${extra[@]}" "$@"
