#!/usr/bin/env bash
# make test: every test binary of the workspace runs, even when one fails (--no-fail-fast), and
# the run ends with one summary line. Extra arguments go to cargo test.
#   scripts/test.sh [cargo test args]
set -uo pipefail
cd "$(dirname "$0")/.."
log=$(mktemp "${TMPDIR:-/tmp}/dialora-test.XXXXXX")
trap 'rm -f "$log"' EXIT
t0=$(date +%s)
cargo test --release --workspace --no-fail-fast "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
# "test result: ok. 42 passed; 0 failed; 1 ignored; ..." per test binary
read -r binaries passed failed ignored < <(awk '
  /^test result:/ { n++; for (i = 1; i <= NF; i++) { v = $(i-1) + 0
      if ($i ~ /^passed;/) p += v; if ($i ~ /^failed;/) f += v; if ($i ~ /^ignored;/) g += v } }
  END { print n + 0, p + 0, f + 0, g + 0 }' "$log")
secs=$(( $(date +%s) - t0 ))
if [ "$status" -ne 0 ] && [ "$failed" -eq 0 ]; then
  echo "make test: FAILED to build or run ($binaries test binaries ran: $passed passed, $ignored ignored) in ${secs}s"
elif [ "$failed" -gt 0 ]; then
  echo "make test: FAILED: $passed passed, $failed failed, $ignored ignored in $binaries test binaries (${secs}s)"
else
  echo "make test: ok: $passed passed, 0 failed, $ignored ignored in $binaries test binaries (${secs}s)"
fi
exit "$status"
