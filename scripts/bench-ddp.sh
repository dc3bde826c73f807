#!/usr/bin/env bash
# Data-parallel training over MPI (make bench runs this when the MPI trainer is built): tokens/s
# on the same global batch for 1 rank x 1 thread, 2 ranks x 1 thread (scaling efficiency) and
# 1 rank x 2 threads (which layout to pick on 2 cores), and rank 0's time in collectives per
# step: moving the data (the gradients' all-reduce, the losses) and waiting for the other rank.
#   scripts/bench-ddp.sh          (MODEL, DIALORA_MPI_BIN, BENCH_OUT, STEPS as in bench.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bin-dir.sh
MODEL=${MODEL:-models/smollm2-135m-instruct}
OUT=${BENCH_OUT:-runs/bench}/ddp
MPI_BIN=${DIALORA_MPI_BIN:-target/mpi/release}
STEPS=${STEPS:-8}
[ -x "$MPI_BIN/trainer" ] || { echo "bench-ddp: $MPI_BIN/trainer is missing: make mpi" >&2; exit 2; }
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 DIALORA_NO_BAR=1
mkdir -p "$OUT"
# the sample data at 256 tokens (lengths vary: a rank with the shorter micro-batch waits for the
# other), and cut to 64 tokens (nearly every sequence 64 long: the ranks' work is equal)
for len in 256 64; do
  [ -f "$OUT/shards-$len/meta.json" ] || "$BIN/dataprep" data/counsel_train.jsonl --model "$MODEL" -o "$OUT/shards-$len" --max-seq-len "$len" >/dev/null 2>&1
done
summary() {
  python3 - "$1" "$2" <<'PY'
import csv, json, sys
d, label = sys.argv[1], sys.argv[2]
rows = list(csv.DictReader(open(d + "/metrics.csv")))
r = json.load(open(d + "/run.json"))
# the first step warms up: tokens/s over the others
t = int(rows[-1]["tokens"]) - int(rows[0]["tokens"])
s = float(rows[-1]["elapsed_s"]) - float(rows[0]["elapsed_s"])
steps = len(rows) - 1
n, e = max(r["global_step"], 1), max(r["elapsed_s"], 1e-9)
coll, wait = r.get("collective_s", 0.0), r.get("collective_wait_s", 0.0)
print(f"trainer-ddp {label:<30} tokens_per_s={t / s:.1f} step_s={s / steps:.2f} world_size={r['world_size']} threads={r['threads']} "
      f"allreduce_s_per_step={coll / n:.4f} allreduce_share={coll / e:.4f} wait_s_per_step={wait / n:.3f} wait_share={wait / e:.3f}")
PY
}
for round in 1 2; do
  for len in 256 64; do
    # LoRA r16 on all seven projections, per-device batch 2, 4 sequences a step in every layout
    common=(--model "$MODEL" --data "$OUT/shards-$len" --max-steps "$STEPS" --per-device-train-batch-size 2
      --lora-r 16 --lora-alpha 32 --target-modules all-linear --eval-strategy no --logging-steps 1 --overwrite-output-dir)
    taskset -c 0 "$BIN/trainer" "${common[@]}" --gradient-accumulation-steps 2 --output-dir "$OUT/1x1" >/dev/null 2>&1
    summary "$OUT/1x1" "len $len: 1 rank x 1 thread"
    mpirun -n 2 --bind-to core "$MPI_BIN/trainer" "${common[@]}" --gradient-accumulation-steps 1 --output-dir "$OUT/2x1" >/dev/null 2>&1
    summary "$OUT/2x1" "len $len: 2 ranks x 1 thread"
    taskset -c 0,1 "$BIN/trainer" "${common[@]}" --gradient-accumulation-steps 2 --output-dir "$OUT/1x2" >/dev/null 2>&1
    summary "$OUT/1x2" "len $len: 1 rank x 2 threads"
  done
  echo "(round $round)"
done
