#!/usr/bin/env bash
# Stage 4: answer held-out conversations with base and base + adapter.
#   compare.sh BASE_DIR ADAPTER_DIR INPUT OUT.jsonl [infer flags]   (also writes OUT.md)
set -euo pipefail
. "$(dirname "$0")/bin-dir.sh"
BASE=$1; ADAPTER=$2; INPUT=$3; OUT=$4; shift 4
exec "$BIN/infer" --model "$BASE" --adapter "$ADAPTER" --input "$INPUT" --compare --output "$OUT" "$@"
