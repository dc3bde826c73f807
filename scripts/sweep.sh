#!/usr/bin/env bash
# Hyperparameter sweep over a grid of trainer arguments, locally or as a Slurm job array.
#
#   scripts/sweep.sh [options] KEY=V1,V2 ... [-- trainer flags]
#   scripts/sweep.sh --report NAME            # report over every point of sweep NAME
#   scripts/sweep.sh --points FILE [options]  # explicit points instead of a grid
#
# KEY is a trainer argument in HF form (learning_rate, lora_r, lora_alpha, lora_dropout,
# target_modules, num_train_epochs, per_device_train_batch_size, gradient_accumulation_steps...).
# Values are separated by ',' -- or by '|' when a value itself contains commas:
#   target_modules='q_proj,v_proj|all-linear'
#
# Options:
#   --points FILE        the points as lines of NAME<TAB>trainer flags instead of a grid (what
#                        scripts/study.sh gives: a study is a sweep over its planned points)
#   --name NAME          sweep name: everything goes to runs/NAME/ (default: sweep)
#   --model DIR          base model (default: models/smollm2-135m-instruct)
#   --data DIR           shards to train on (default: runs/NAME/shards, made once from --input)
#   --input FILE         conversations for those shards (default: data/counsel_train.jsonl)
#   --dry-run            print the grid, run nothing
#   --slurm              write runs/NAME/sweep.sbatch (a job array, one task per point) and
#                        runs/NAME/report.sbatch instead of running; with --submit, sbatch both
#                        (the report after the array, --dependency=afterany)
#   --cpus-per-task N --mem SIZE --time T --partition P --account A --gres G
#                        the array's resources, written into the script as literal #SBATCH
#                        lines (defaults: 2 CPUs, 8G, 04:00:00; no partition/account/gres)
#   --signal-seconds S   SIGTERM this long before the time limit (default 120): the trainer
#                        saves a checkpoint and exits 75
#   --save-every-minutes M  checkpoint interval of every point (default 10 with --slurm, else 0)
#   --ntasks-per-point N train each point data-parallel on N MPI ranks with the MPI trainer of
#                        `make mpi` ($DIALORA_MPI_BIN, default target/mpi/release): with --slurm
#                        the job asks for N tasks (--cpus-per-task each) and starts them with
#                        srun --mpi=pmix; locally with mpirun -n N
#
# Every point trains into runs/NAME/<point>/ with --resume-from-checkpoint auto, so running a
# point again (a requeued or preempted array task, a second local run) resumes it, and a point
# that completed exits 0 at once. Locally, a point that diverges (exit 65) or fails does not
# stop the sweep: the next point runs, the report lists it, and the sweep exits 1 if any
# failed; an interrupted point (75: a signal) stops it. A sweep's grid is frozen when it is
# written: the job script holds every point's flags, and writing a sweep NAME again with
# another grid is refused.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
NAME=sweep; MODEL=$ROOT/models/smollm2-135m-instruct; DATA=""; INPUT=$ROOT/data/counsel_train.jsonl
SLURM=0; SUBMIT=0; DRY=0; REPORT=""; POINTS=""; RUNS=${RUNS:-$ROOT/runs}
CPUS=2; MEM=8G; TIME=04:00:00; PARTITION=""; ACCOUNT=""; GRES=""; SIGNAL=120; SAVE_MIN=""
NTASKS=1
grid=(); extra=()
abs() { case "$1" in /*) printf '%s' "$1" ;; *) printf '%s/%s' "$PWD" "$1" ;; esac; }
while [ $# -gt 0 ]; do
  case "$1" in
    --name) NAME=$2; shift 2 ;;
    --model) MODEL=$(abs "$2"); shift 2 ;;
    --data) DATA=$(abs "$2"); shift 2 ;;
    --input) INPUT=$(abs "$2"); shift 2 ;;
    --slurm) SLURM=1; shift ;;
    --submit) SUBMIT=1; SLURM=1; shift ;;
    --dry-run) DRY=1; shift ;;
    --report) REPORT=$2; shift 2 ;;
    --points) POINTS=$(abs "$2"); shift 2 ;;
    --cpus-per-task) CPUS=$2; shift 2 ;;
    --mem) MEM=$2; shift 2 ;;
    --time) TIME=$2; shift 2 ;;
    --partition) PARTITION=$2; shift 2 ;;
    --account) ACCOUNT=$2; shift 2 ;;
    --gres) GRES=$2; shift 2 ;;
    --signal-seconds) SIGNAL=$2; shift 2 ;;
    --save-every-minutes) SAVE_MIN=$2; shift 2 ;;
    --ntasks-per-point) NTASKS=$2; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    *=*) grid+=("$1"); shift ;;
    *) echo "sweep: unexpected argument '$1' (grid entries are KEY=V1,V2; see the header of $0)" >&2; exit 2 ;;
  esac
done
RUNS=$(abs "$RUNS")
. "$ROOT/scripts/bin-dir.sh"
BIN=$(abs "$BIN")

# ---- --report NAME: every point of the manifest, finished or not
if [ -n "$REPORT" ]; then
  OUT=$RUNS/$REPORT
  [ -f "$OUT/manifest.tsv" ] || { echo "sweep: no sweep '$REPORT' ($OUT/manifest.tsv missing)" >&2; exit 2; }
  # a study's points (scripts/study.sh): its own report, with the answers side by side
  if [ -f "$OUT/plan.json" ]; then exec "$BIN/study" report "$OUT"; fi
  dirs=(); pending=()
  while IFS=$'\t' read -r _ point _; do
    dirs+=("$OUT/$point")
    status=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1])).get("status","unknown"))' "$OUT/$point/run.json" 2>/dev/null || echo "not started")
    [ "$status" = completed ] || pending+=("$point: $status")
  done <"$OUT/manifest.tsv"
  "$BIN/report" --partial --overwrite --title "sweep $REPORT" -o "$OUT/report.html" "${dirs[@]}"
  echo "sweep: ${#dirs[@]} points, $(( ${#dirs[@]} - ${#pending[@]} )) completed; report in $OUT/report.html"
  for p in "${pending[@]+"${pending[@]}"}"; do echo "  not completed: $p"; done
  exit 0
fi

OUT=$RUNS/$NAME
SHARDS=${DATA:-$OUT/shards}
points=(); names=()
if [ -n "$POINTS" ]; then
  # ---- explicit points: NAME<TAB>flags
  [ ${#grid[@]} -eq 0 ] || { echo "sweep: give a grid or --points, not both" >&2; exit 2; }
  while IFS=$'\t' read -r pname pflags; do
    [ -n "$pname" ] || continue
    names+=("$pname"); points+=("$pflags")
  done <"$POINTS"
  [ ${#points[@]} -gt 0 ] || { echo "sweep: $POINTS: no points" >&2; exit 2; }
else
  [ ${#grid[@]} -gt 0 ] || { echo "sweep: no grid given (e.g. learning_rate=1e-4,1e-3 lora_r=8,16)" >&2; exit 2; }
  # ---- expand the grid: each point is a list of flags and a name
  points=(""); names=("")
  for entry in "${grid[@]}"; do
    key=${entry%%=*}; vals=${entry#*=}
    flag="--${key//_/-}"
    if [[ $vals == *"|"* ]]; then IFS='|' read -r -a vs <<<"$vals"; else IFS=',' read -r -a vs <<<"$vals"; fi
    np=(); nn=()
    for i in "${!points[@]}"; do
      for v in "${vs[@]}"; do
        np+=("${points[$i]} $flag $v")
        short=${v//,/+}
        nn+=("${names[$i]:+${names[$i]}_}${key}=${short}")
      done
    done
    points=("${np[@]}"); names=("${nn[@]}")
  done
fi
n=${#points[@]}
manifest=$(for i in "${!points[@]}"; do printf '%s\t%s\t%s\n' "$i" "${names[$i]}" "${points[$i]# }"; done)
if [ $DRY = 1 ]; then printf '%s\n' "$manifest"; exit 0; fi

# ---- a sweep's grid is frozen: the same name with another grid is refused
mkdir -p "$OUT/logs"
if [ -f "$OUT/manifest.tsv" ] && [ "$(cat "$OUT/manifest.tsv")" != "$manifest" ]; then
  echo "sweep: sweep '$NAME' already exists with another grid ($OUT/manifest.tsv); choose another --name, or remove $OUT" >&2
  exit 2
fi
printf '%s\n' "$manifest" >"$OUT/manifest.tsv.tmp" && mv "$OUT/manifest.tsv.tmp" "$OUT/manifest.tsv"
echo "sweep: $n grid points -> $OUT/manifest.tsv"

# ---- N ranks a point: the MPI trainer trains it (the plain one refuses to be one of N tasks)
if ! [[ $NTASKS =~ ^[1-9][0-9]*$ ]]; then echo "sweep: --ntasks-per-point must be a whole number >= 1, not '$NTASKS'" >&2; exit 2; fi
TRAIN_BIN=$BIN
if [ "$NTASKS" -gt 1 ]; then
  TRAIN_BIN=$(abs "${DIALORA_MPI_BIN:-$ROOT/target/mpi/release}")
  if [ ! -x "$TRAIN_BIN/trainer" ]; then
    echo "sweep: --ntasks-per-point $NTASKS needs the MPI trainer, and $TRAIN_BIN/trainer is missing: build it with make mpi (or set DIALORA_MPI_BIN)" >&2
    exit 2
  fi
fi

if [ ! -f "$SHARDS/meta.json" ]; then
  "$ROOT/scripts/prepare-data.sh" "$MODEL" "$SHARDS" "$INPUT" -- --val-split 0.15 --max-seq-len 256
fi

if [ $SLURM = 1 ]; then
  SAVE_MIN=${SAVE_MIN:-10}
  # N ranks a point: srun starts them in the job, with Open MPI's PMIx plugin
  SRUN=""
  if [ "$NTASKS" -gt 1 ]; then SRUN="srun --mpi=pmix --ntasks=$NTASKS --cpus-per-task=$CPUS --kill-on-bad-exit=1 "; fi
  q() { printf '%q' "$1"; }
  {
    echo "#!/usr/bin/env bash"
    echo "#SBATCH --job-name=dialora-$NAME"
    echo "#SBATCH --array=0-$((n - 1))"
    echo "#SBATCH --cpus-per-task=$CPUS"
    echo "#SBATCH --mem=$MEM"
    echo "#SBATCH --time=$TIME"
    [ -n "$PARTITION" ] && echo "#SBATCH --partition=$PARTITION"
    [ -n "$ACCOUNT" ] && echo "#SBATCH --account=$ACCOUNT"
    [ -n "$GRES" ] && echo "#SBATCH --gres=$GRES"
    [ "$NTASKS" -gt 1 ] && echo "#SBATCH --ntasks=$NTASKS"
    echo "#SBATCH --output=$OUT/logs/%x-%A_%a.log"
    echo "#SBATCH --open-mode=append"
    echo "#SBATCH --requeue"
    echo "#SBATCH --signal=B:TERM@$SIGNAL"
    cat <<EOF
# dialora sweep '$NAME': one array task per grid point ($n), written by scripts/sweep.sh.
# The trainer replaces this shell (exec; with N ranks a point, srun does and passes the signals
# on to the N trainers, which stop together), so it receives what Slurm sends on requeue,
# preemption, scancel and $SIGNAL s before the time limit: it saves a checkpoint and exits 75.
# A task run again resumes from its checkpoint (--resume-from-checkpoint auto); a completed
# point exits 0 at once. Exit statuses: 0 done, 75 interrupted (run again: a cluster with
# RequeueExit=75 requeues it itself), 65 diverged (do not retry), 1-2 errors.
set -euo pipefail
case "\${SLURM_ARRAY_TASK_ID:?run this as a Slurm array task (sbatch $OUT/sweep.sbatch)}" in
EOF
    for i in "${!points[@]}"; do
      # shellcheck disable=SC2086
      printf '  %s) point=%s; args=(%s) ;;\n' "$i" "$(q "${names[$i]}")" "$(for w in ${points[$i]}; do printf '%q ' "$w"; done)"
    done
    cat <<EOF
  *) echo "no grid point \$SLURM_ARRAY_TASK_ID in this sweep" >&2; exit 2 ;;
esac
echo "dialora sweep $NAME: point \$point, attempt \$((\${SLURM_RESTART_COUNT:-0} + 1)) on \$(hostname) at \$(date -u +%FT%TZ)"
export DIALORA_NO_BAR=1 DIALORA_BIN=$(q "$TRAIN_BIN")
cmd=(${SRUN}$(q "$ROOT/scripts/train.sh") $(q "$MODEL") $(q "$SHARDS") $(q "$OUT")/"\$point" "\${args[@]}"
  --run-name "\$point" --resume-from-checkpoint auto --save-every-minutes $SAVE_MIN$(for e in "${extra[@]+"${extra[@]}"}"; do printf ' %q' "$e"; done))
# DIALORA_DRY_RUN=1: show what this task runs, run nothing
if [ -n "\${DIALORA_DRY_RUN:-}" ]; then echo "\${cmd[*]}"; exit 0; fi
exec "\${cmd[@]}"
EOF
  } >"$OUT/sweep.sbatch.tmp"
  mv "$OUT/sweep.sbatch.tmp" "$OUT/sweep.sbatch"
  {
    echo "#!/usr/bin/env bash"
    echo "#SBATCH --job-name=dialora-$NAME-report"
    if [ -f "$OUT/plan.json" ]; then
      # a study's report (see --report) answers its questions with every point: the array's
      # resources
      echo "#SBATCH --cpus-per-task=$CPUS"
      echo "#SBATCH --mem=$MEM"
      echo "#SBATCH --time=01:00:00"
    else
      echo "#SBATCH --cpus-per-task=1"
      echo "#SBATCH --mem=2G"
      echo "#SBATCH --time=00:10:00"
    fi
    [ -n "$PARTITION" ] && echo "#SBATCH --partition=$PARTITION"
    [ -n "$ACCOUNT" ] && echo "#SBATCH --account=$ACCOUNT"
    echo "#SBATCH --output=$OUT/logs/%x-%j.log"
    echo "export RUNS=$(q "$RUNS") DIALORA_BIN=$(q "$BIN")"
    echo "exec $(q "$ROOT/scripts/sweep.sh") --report $(q "$NAME")"
  } >"$OUT/report.sbatch"
  chmod +x "$OUT/sweep.sbatch" "$OUT/report.sbatch"
  if [ $SUBMIT = 1 ]; then
    jid=$(sbatch --parsable "$OUT/sweep.sbatch")
    rid=$(sbatch --parsable --dependency=afterany:"${jid%%;*}" "$OUT/report.sbatch")
    echo "sweep: submitted array job $jid and report job $rid (after it); report in $OUT/report.html"
  else
    echo "sweep: wrote $OUT/sweep.sbatch and $OUT/report.sbatch; submit with:"
    echo "  jid=\$(sbatch --parsable $OUT/sweep.sbatch) && sbatch --dependency=afterany:\$jid $OUT/report.sbatch"
  fi
  exit 0
fi

# ---- local: the points one after another, then the report
failed=()
for i in "${!points[@]}"; do
  d=$OUT/${names[$i]}
  echo "== sweep point $((i + 1))/$n: ${names[$i]}"
  rc=0
  launch=(); [ "$NTASKS" -gt 1 ] && launch=(mpirun -n "$NTASKS")
  # shellcheck disable=SC2086
  DIALORA_BIN=$TRAIN_BIN "${launch[@]+"${launch[@]}"}" "$ROOT/scripts/train.sh" "$MODEL" "$SHARDS" "$d" ${points[$i]} --run-name "${names[$i]}" \
    --resume-from-checkpoint auto ${SAVE_MIN:+--save-every-minutes $SAVE_MIN} "${extra[@]+"${extra[@]}"}" || rc=$?
  case $rc in
    0) ;;
    65) echo "sweep: point ${names[$i]} diverged (exit 65); going on with the next" ;;
    75) echo "sweep: point ${names[$i]} interrupted (exit 75, checkpoint saved); run the same command again to resume" >&2; exit 75 ;;
    *) echo "sweep: point ${names[$i]} failed (exit $rc); going on with the next" >&2; failed+=("${names[$i]}") ;;
  esac
done
"$0" --report "$NAME"
if [ ${#failed[@]} -gt 0 ]; then echo "sweep: failed points: ${failed[*]}" >&2; exit 1; fi
