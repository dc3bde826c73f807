#!/usr/bin/env bash
# make bench: one summary line per benchmark (trainer, dataprep, infer, merger, and the
# data-parallel trainer when make mpi has built it: scripts/bench-ddp.sh) on the real
# SmolLM2, with the reference stack (HF transformers + peft: scripts/bench_lora.py and HF
# generate) measured in the same run, alternating with dialora.
#   scripts/bench.sh                   # the reference Python from scripts/hf-env.sh
#   HF_PYTHON=/path/to/python scripts/bench.sh
#   BENCH_PYTORCH=0 scripts/bench.sh   # dialora only
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bin-dir.sh
MODEL=${MODEL:-models/smollm2-135m-instruct}
OUT=${BENCH_OUT:-runs/bench}
if [ "${BENCH_PYTORCH:-1}" != 0 ]; then HF_PYTHON=$(scripts/hf-env.sh); else HF_PYTHON=""; fi
mkdir -p "$OUT"
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), load $(cut -d' ' -f1 /proc/loadavg)"
field() { python3 -c "import json,sys; r=json.loads(sys.argv[1]); print(' '.join(f'{k}={r[k]:.1f}' if isinstance(r[k], float) else f'{k}={r[k]}' for k in sys.argv[2:]))" "$@"; }

# ---- trainer (LoRA r16/a32/d0.05 on q,k,v,o,gate,up,down, f32, AdamW)
for shape in "256 1" "512 2"; do
  set -- $shape
  for ck in "" "--grad-ckpt"; do
    if [ -n "${HF_PYTHON:-}" ]; then
      r=$("$HF_PYTHON" scripts/bench_lora.py --model "$MODEL" --seq "$1" --batch "$2" --steps 8 --warmup 2 ${ck:+--grad-ckpt} 2>/dev/null | grep '^RESULT' | cut -d' ' -f2-)
      echo "trainer  pytorch+peft seq=$1 batch=$2 ${ck:-} $(field "$r" tokens_per_s peak_rss_mib median_step_s)"
    fi
    r=$("$BIN/bench-lora" --model "$MODEL" --seq "$1" --batch "$2" --steps 8 --warmup 2 $ck 2>/dev/null | grep '^RESULT' | cut -d' ' -f2-)
    echo "trainer  dialora      seq=$1 batch=$2 ${ck:-} $(field "$r" tokens_per_s peak_rss_mib median_step_s)"
  done
done

# ---- dataprep: tokens/s on a large generated input (the sample data repeated 200 times)
big=$OUT/big.jsonl
[ -f "$big" ] || for _ in $(seq 200); do cat data/counsel_train.jsonl; done >"$big"
line=$( { /usr/bin/time -f "peak_rss_kib=%M" "$BIN/dataprep" "$big" --model "$MODEL" -o "$OUT/big-shards" --overwrite --max-seq-len 1024; } 2>&1 | grep -E "tokens/s|peak_rss" | tr '\n' ' ')
echo "dataprep dialora      $(wc -l <"$big") conversations: $line"

# ---- infer: greedy decode tokens/s, same prompt, 128 new tokens
prompt="Write a short paragraph about why sleep matters for mental health."
if [ -n "${HF_PYTHON:-}" ]; then
  "$HF_PYTHON" - "$MODEL" "$prompt" <<'PY'
import sys, time, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
torch.set_num_threads(torch.get_num_threads())
tok = AutoTokenizer.from_pretrained(sys.argv[1]); m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
ids = tok.apply_chat_template([{"role": "user", "content": sys.argv[2]}], add_generation_prompt=True, return_tensors="pt")
ids = ids["input_ids"] if hasattr(ids, "keys") else ids
with torch.no_grad():
    m.generate(ids, max_new_tokens=8, do_sample=False, min_new_tokens=8, attention_mask=torch.ones_like(ids))
    t = time.perf_counter(); out = m.generate(ids, max_new_tokens=128, min_new_tokens=128, do_sample=False, attention_mask=torch.ones_like(ids)); dt = time.perf_counter() - t
n = out.shape[1] - ids.shape[1]
print(f"infer    hf-generate  prompt={ids.shape[1]} new={n} tokens_per_s={n/dt:.1f} (prefill included)")
PY
fi
line=$("$BIN/infer" --model "$MODEL" --prompt "$prompt" --max-new-tokens 128 2>&1 >/dev/null | grep tokens/s)
echo "infer    dialora      $line"

# ---- decode steps of the engine per weight format, 1 and 8 sequences, against the bandwidth
# bound (bytes of weights a step reads / the measured read bandwidth)
"$BIN/bench-step" --model "$MODEL" | grep '^decode\|^memory' | sed 's/^/infer    /'

# ---- the q8_0 product of --quantize q8_0 alone, against candle's QMatMul on the same weight and
# rows (1: single-stream decode, 8: a step of 8 sequences, 64: prefill), alternating
"$BIN/bench-q8" --reps 30 | grep '^q8_0' | sed 's/^/infer    /'

# ---- merger: seconds and peak RSS (f32 model 538 MB; largest tensor, the embedding, 113 MB)
rm -rf "$OUT/adapter"
"$BIN/trainer" --model "$MODEL" --data "$OUT/big-shards" --output-dir "$OUT/adapter" --max-steps 1 --per-device-train-batch-size 1 --lora-r 16 --target-modules all-linear --init-lora-weights false >/dev/null 2>&1
line=$( { /usr/bin/time -f "peak_rss_kib=%M" "$BIN/merger" --base "$MODEL" --adapter "$OUT/adapter" --output "$OUT/merged" --overwrite; } 2>&1 | grep -E "^merger: merged|peak_rss" | tr '\n' ' ')
echo "merger   dialora      $line"

# ---- trainer data-parallel over MPI: 1 rank vs 2 ranks vs 2 threads (needs make mpi)
if [ -x "${DIALORA_MPI_BIN:-target/mpi/release}/trainer" ] && command -v mpirun >/dev/null; then
  scripts/bench-ddp.sh
else
  echo "trainer-ddp: skipped (make mpi builds the MPI trainer; it needs an MPI: see README)"
fi
