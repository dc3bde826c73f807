#!/usr/bin/env bash
# Prints the path of a Python with torch, transformers and peft (the reference stack `make bench`
# measures dialora against), making one if needed:
#   1. $HF_PYTHON when set;
#   2. else .venv-hf/bin/python in the repository, created on first use with
#      `python3 -m venv .venv-hf` and `pip install` of the versions below (about 6 GB: PyPI's
#      torch wheel brings its CUDA libraries).
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES=(torch==2.15.0 transformers==5.24.0 peft==0.21.2 safetensors gguf)
if [ -n "${HF_PYTHON:-}" ]; then
  "$HF_PYTHON" -c "import torch, transformers, peft" 2>/dev/null ||
    { echo "hf-env: HF_PYTHON=$HF_PYTHON cannot import torch, transformers and peft" >&2; exit 1; }
  echo "$HF_PYTHON"; exit 0
fi
PY=.venv-hf/bin/python
if ! [ -x "$PY" ] || ! "$PY" -c "import torch, transformers, peft" 2>/dev/null; then
  echo "hf-env: creating .venv-hf (${PACKAGES[*]}); set HF_PYTHON to use an existing environment" >&2
  python3 -m venv .venv-hf
  "$PY" -m pip install --quiet --upgrade pip >&2
  "$PY" -m pip install --quiet "${PACKAGES[@]}" >&2
fi
echo "$PWD/$PY"
