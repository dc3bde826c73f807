#!/usr/bin/env bash
# Prints the path of a Python with TensorBoard (its reader is the reference for dialora's event
# files), making one if needed: $TB_PYTHON when set, else .venv-tb/bin/python in the repository,
# created on first use with `pip install tensorboard==2.21.0` (about 60 MB). Exits 3 when pip
# cannot reach PyPI, so a test can say why it skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${TB_PYTHON:-}" ]; then echo "$TB_PYTHON"; exit 0; fi
PY=.venv-tb/bin/python
if ! [ -x "$PY" ] || ! "$PY" -c "import tensorboard" 2>/dev/null; then
  echo "tb-env: creating .venv-tb (tensorboard==2.21.0)" >&2
  python3 -m venv .venv-tb >&2 || { echo "tb-env: python3 -m venv failed" >&2; exit 3; }
  "$PY" -m pip install --quiet tensorboard==2.21.0 >&2 || { echo "tb-env: pip install tensorboard failed" >&2; exit 3; }
fi
echo "$PWD/$PY"
