#!/usr/bin/env bash
# Stage 5: run-comparison report.   report.sh OUT.html RUN_DIR...
set -euo pipefail
BIN=${DIALORA_BIN:-$(cd "$(dirname "$0")/.." && pwd)/target/release}
OUT=$1; shift
exec "$BIN/report" --output "$OUT" "$@"
