#!/usr/bin/env bash
# The serving benchmark of BENCHMARKS.md, every side in one run on this machine: dialora before
# (BEFORE=path/to/an/older/infer, optional), dialora now in f32 and q8_0, the clients on one
# adapter vs spread over several (ADAPTERS="dir1 dir2 ...", optional), and llama.cpp's llama-server -np 8 on the q8_0 GGUF that
# export-gguf writes (LLAMA_SERVER=path/to/llama-server, optional).
# Every q8_0 server also answers one client alone (LONE requests), the latency that of 8
# clients is held against.
#   CLIENTS=8 REQUESTS=20 TOKENS=32 LONE=20 PY=python3 scripts/bench-serve.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bin-dir.sh
MODEL=${MODEL:-models/smollm2-135m-instruct}
CLIENTS=${CLIENTS:-8} REQUESTS=${REQUESTS:-20} TOKENS=${TOKENS:-32} LONE=${LONE:-20} PY=${PY:-python3}
W=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$W"' EXIT
load() { "$PY" scripts/serve_load.py --base-url "http://127.0.0.1:$1/v1" --clients "$CLIENTS" \
  --requests "$REQUESTS" --max-tokens "$TOKENS" "${@:2}" | tee -a "$W/log" | tail -1; }
lone() { load "$1" --clients 1 --requests "$LONE" "${@:2}"; }
# waits for the /health of the server on port $1 (process $2, log $3); one that exits first (a
# llama-server built for instructions this CPU lacks dies of SIGILL) fails the run with its log
wait_up() {
  for _ in $(seq 600); do
    curl -sf "http://127.0.0.1:$1/health" >/dev/null && return
    if ! kill -0 "$2" 2>/dev/null; then
      local rc=0; wait "$2" 2>/dev/null || rc=$?
      echo "bench-serve: the server on port $1 exited ($rc) before it answered; $3 ends:" >&2
      tail -n 5 "$3" >&2; exit 1
    fi
    sleep 0.2
  done
  echo "bench-serve: the server on port $1 did not answer /health in 120 s" >&2; exit 1
}
serve() { local port=$1; shift; "$@" --model "$MODEL" --serve "127.0.0.1:$port" 2>"$W/srv-$port.log" & wait_up "$port" $! "$W/srv-$port.log"; }
stop() { kill "$1" 2>/dev/null; wait "$1" 2>/dev/null || true; }
if [ -n "${BEFORE:-}" ]; then
  serve 8101 "$BEFORE"; echo "== before ($BEFORE), f32"; load 8101; stop $!
  serve 8106 "$BEFORE" --quantize q8_0; P=$!; echo "== before ($BEFORE), q8_0"; load 8106
  echo "== before ($BEFORE), q8_0, one client alone"; lone 8106 --skip-checks; stop $P
fi
serve 8102 "$BIN/infer"; P=$!; echo "== now, f32"; load 8102; stop $P
serve 8103 "$BIN/infer" --quantize q8_0; P=$!; echo "== now, q8_0"; load 8103
echo "== now, q8_0, one client alone"; lone 8103 --skip-checks; stop $P
if [ -n "${ADAPTERS:-}" ]; then
  args=(); names=()
  for a in $ADAPTERS; do args+=(--adapter "$(basename "$a")=$a"); names+=("$(basename "$a")"); done
  serve 8104 "$BIN/infer" "${args[@]}"; P=$!
  # every answer TOKENS long (vLLM's ignore_eos), so that adapters whose answers end sooner
  # do not make the spread look slower
  eos='{"ignore_eos": true}'
  echo "== now, f32, all clients on one adapter"; load 8104 --model "${names[0]}" --extra-body "$eos"
  echo "== now, f32, clients spread over ${#names[@]} adapters"
  load 8104 --models "$(IFS=,; echo "${names[*]}")" --extra-body "$eos"
  stop $P
fi
if [ -n "${LLAMA_SERVER:-}" ]; then
  "$BIN/export-gguf" --model "$MODEL" --type q8_0 --output "$W/model.q8_0.gguf" >/dev/null
  "$LLAMA_SERVER" -m "$W/model.q8_0.gguf" --port 8105 -np 8 -c 16384 -t "$(nproc)" >"$W/llama.log" 2>&1 & P=$!
  wait_up 8105 $P "$W/llama.log"; echo "== llama-server -np 8, q8_0 GGUF"; load 8105 --skip-checks
  # llama-server keeps each slot's prompt in its cache and reuses the common prefix (the load's
  # four prompts repeat), as dialora's prefix cache does; the same load is also run without it
  echo "== llama-server -np 8, q8_0 GGUF, cache_prompt false"
  load 8105 --skip-checks --extra-body '{"cache_prompt": false}'
  echo "== llama-server, q8_0 GGUF, one client alone"; lone 8105 --skip-checks; stop $P
fi
