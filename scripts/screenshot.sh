#!/usr/bin/env bash
# A report as a reader sees it: headless Chromium renders an HTML file at a given width and
# writes a PNG of the top of the page.
#   scripts/screenshot.sh REPORT.html OUT.png [WIDTH [HEIGHT]]     (default 1400 x 2000)
# Needs Debian's chromium (apt-get install chromium).
set -euo pipefail
HTML=$(cd "$(dirname "$1")" && pwd)/$(basename "$1"); OUT=$2; W=${3:-1400}; H=${4:-2000}
CHROME=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
[ -n "$CHROME" ] || { echo "screenshot: no chromium (apt-get install chromium)" >&2; exit 2; }
profile=$(mktemp -d); trap 'rm -rf "$profile"' EXIT
# the machine's network is closed: no background connections, no first-run or sync traffic
"$CHROME" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync --hide-scrollbars \
  --user-data-dir="$profile" --window-size="$W,$H" --screenshot="$OUT.tmp.png" "file://$HTML" 2>/dev/null
mv "$OUT.tmp.png" "$OUT"
echo "screenshot: $HTML at ${W}px -> $OUT"
