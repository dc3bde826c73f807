#!/usr/bin/env bash
# A study: one setting changed at a time around a baseline, every run trained, the held-out
# questions answered by the base model and by every run, and one report.
#
#   scripts/study.sh STUDY.toml [--name NAME] [--model DIR] [sweep options] [-- trainer flags]
#   scripts/study.sh --report NAME        # the report again (answers only what is new)
#
# STUDY.toml (see studies/article.toml) has a [baseline] table of trainer arguments (HF names,
# as in `trainer --config`), [[factor]] tables (setting = a trainer argument, values = its
# values), [data] (input files and dataprep_args, paths relative to the study file) and
# [answers] (questions, max_new_tokens, system, tokenizer, repeat_ngram). A value equal to the
# baseline's is trained once, as the baseline, and shared by every factor. Trainer flags after
# `--` apply to every point (`-- --max-steps 2`: a smoke run of the whole study).
#
# Options: --name NAME (default: the study file's name; everything goes to runs/NAME/),
# --model DIR (default: models/smollm2-135m-instruct), --dry-run (print the points, one
# `name<TAB>trainer flags` line each, and write nothing), and those of scripts/sweep.sh:
# --slurm / --submit (one job array, one task per point, then the report job), --cpus-per-task,
# --mem, --time, --partition, --account, --gres, --signal-seconds, --save-every-minutes.
#
# Running a study again resumes it: completed points exit at once, interrupted ones resume
# from their checkpoints, and answers already made are reused. A study file, model or trainer
# flags other than those NAME was planned with are refused (choose another --name).
# Results: runs/NAME/report.html and runs/NAME/study.json.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
RUNS=${RUNS:-$ROOT/runs}
MODEL=$ROOT/models/smollm2-135m-instruct
abs() { case "$1" in /*) printf '%s' "$1" ;; *) printf '%s/%s' "$PWD" "$1" ;; esac; }
. "$ROOT/scripts/bin-dir.sh"
BIN=$(abs "$BIN")
export DIALORA_BIN=$BIN RUNS=$(abs "$RUNS")

if [ "${1:-}" = "--report" ]; then
  [ -n "${2:-}" ] || { echo "study: --report needs a study name" >&2; exit 2; }
  exec "$BIN/study" report "$RUNS/$2"
fi
STUDY=${1:?usage: scripts/study.sh STUDY.toml [--name NAME] [--slurm ...] [-- trainer flags]}
shift
[ -f "$STUDY" ] || { echo "study: $STUDY: no such study file" >&2; exit 2; }
NAME=$(basename "$STUDY" .toml)
sweep_opts=(); extra=(); DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --name) NAME=$2; shift 2 ;;
    --model) MODEL=$(abs "$2"); shift 2 ;;
    --dry-run) DRY=1; shift ;;
    --slurm | --submit) sweep_opts+=("$1"); shift ;;
    --cpus-per-task | --mem | --time | --partition | --account | --gres | --signal-seconds | --save-every-minutes)
      sweep_opts+=("$1" "$2"); shift 2 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "study: unexpected argument '$1' (see the header of $0)" >&2; exit 2 ;;
  esac
done
OUT=$RUNS/$NAME
if [ $DRY = 1 ]; then
  # the points this study would train, planned into a scratch directory: nothing else written
  scratch=$(mktemp -d); trap 'rm -rf "$scratch"' EXIT
  "$BIN/study" plan "$STUDY" --out "$scratch/$NAME" --model "$MODEL" -- "${extra[@]+"${extra[@]}"}" >&2
  cat "$scratch/$NAME/points.tsv"
  exit 0
fi

# the plan: points.tsv, frozen under runs/NAME (another study file under this name is refused)
"$BIN/study" plan "$STUDY" --out "$OUT" --model "$MODEL" -- "${extra[@]+"${extra[@]}"}"

# the shards, made once from the study's data
if [ ! -f "$OUT/shards/meta.json" ]; then
  mapfile -t prep <"$OUT/dataprep.args"
  "$ROOT/scripts/prepare-data.sh" "$MODEL" "$OUT/shards" "${prep[@]}"
fi

# the points: a sweep over them (locally one after another, or one Slurm array), whose report
# step is the study's report
exec "$ROOT/scripts/sweep.sh" --name "$NAME" --model "$MODEL" --data "$OUT/shards" \
  --points "$OUT/points.tsv" "${sweep_opts[@]+"${sweep_opts[@]}"}"
