#!/usr/bin/env bash
# Stage 2: shards + base model -> adapter, metrics.csv, run.json.
#   train.sh MODEL_DIR DATA_DIR OUT_DIR [trainer flags]
# The trainer replaces this shell (exec), so signals sent to it (Slurm's requeue, preemption,
# time-limit warning) reach the trainer. For a job that may run again, pass
# --resume-from-checkpoint auto (scripts/sweep.sh does).
set -euo pipefail
. "$(dirname "$0")/bin-dir.sh"
MODEL=$1; DATA=$2; OUT=$3; shift 3
exec "$BIN/trainer" --model "$MODEL" --data "$DATA" --output-dir "$OUT" "$@"
