#!/usr/bin/env bash
# Stage 1: conversations -> shards.   prepare-data.sh MODEL_DIR OUT_DIR INPUT... [-- dataprep flags]
set -euo pipefail
. "$(dirname "$0")/bin-dir.sh"
MODEL=$1; OUT=$2; shift 2
inputs=(); while [ $# -gt 0 ] && [ "$1" != "--" ]; do inputs+=("$1"); shift; done; [ "${1:-}" = "--" ] && shift
exec "$BIN/dataprep" "${inputs[@]}" --model "$MODEL" --output "$OUT" "$@"
