#!/usr/bin/env bash
# Stage 5: run-comparison report.   report.sh OUT.html RUN_DIR...
set -euo pipefail
. "$(dirname "$0")/bin-dir.sh"
OUT=$1; shift
exec "$BIN/report" --output "$OUT" "$@"
