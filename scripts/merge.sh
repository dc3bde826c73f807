#!/usr/bin/env bash
# Stage 3: base + adapter -> standalone model.   merge.sh BASE_DIR ADAPTER_DIR OUT_DIR [merger flags]
set -euo pipefail
. "$(dirname "$0")/bin-dir.sh"
BASE=$1; ADAPTER=$2; OUT=$3; shift 3
exec "$BIN/merger" --base "$BASE" --adapter "$ADAPTER" --output "$OUT" "$@"
