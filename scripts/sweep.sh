#!/usr/bin/env bash
# Hyperparameter sweep over a grid of trainer arguments.
#
#   scripts/sweep.sh [--name NAME] [--model DIR] [--data DIR] [--slurm] [--dry-run] [--] KEY=V1,V2 ... [-- trainer flags]
#
# KEY is a trainer argument in HF form (learning_rate, lora_r, lora_alpha, lora_dropout,
# target_modules, num_train_epochs, per_device_train_batch_size, gradient_accumulation_steps...).
# Values are separated by ',' -- or by '|' when a value itself contains commas:
#   target_modules='q_proj,v_proj|all-linear'
# Every grid point trains into runs/NAME/<point>/ from shared shards (runs/NAME/shards, made
# once from --input, default data/counsel_train.jsonl). Locally the points run one after another,
# then runs/NAME/report.html compares them. With --slurm nothing runs: runs/NAME/manifest.tsv
# (one line per point) and runs/NAME/sweep.sbatch (a job array, one task per point, mapped by
# SLURM_ARRAY_TASK_ID; requeue-safe: a task resumes from its latest checkpoint) are written.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
NAME=sweep; MODEL=$ROOT/models/smollm2-135m-instruct; DATA=""; INPUT=$ROOT/data/counsel_train.jsonl
SLURM=0; DRY=0; RUNS=${RUNS:-$ROOT/runs}
grid=(); extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --name) NAME=$2; shift 2 ;;
    --model) MODEL=$2; shift 2 ;;
    --data) DATA=$2; shift 2 ;;
    --input) INPUT=$2; shift 2 ;;
    --slurm) SLURM=1; shift ;;
    --dry-run) DRY=1; shift ;;
    --) shift; if [ ${#grid[@]} -gt 0 ]; then extra=("$@"); break; fi ;;
    *=*) grid+=("$1"); shift ;;
    *) echo "sweep: unexpected argument '$1' (grid entries are KEY=V1,V2)" >&2; exit 2 ;;
  esac
done
[ ${#grid[@]} -gt 0 ] || { echo "sweep: no grid given (e.g. learning_rate=1e-4,1e-3 lora_r=8,16)" >&2; exit 2; }
OUT=$RUNS/$NAME
mkdir -p "$OUT"

# expand the grid: each point is a list of "--key value" pairs and a name
points=("")
names=("")
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

MANIFEST=$OUT/manifest.tsv
: >"$MANIFEST.tmp"
for i in "${!points[@]}"; do printf '%s\t%s\t%s\n' "$i" "${names[$i]}" "${points[$i]# }" >>"$MANIFEST.tmp"; done
mv "$MANIFEST.tmp" "$MANIFEST"
n=${#points[@]}
echo "sweep: $n grid points -> $MANIFEST"

SHARDS=${DATA:-$OUT/shards}
EXTRA=$(printf '%q ' "${extra[@]+"${extra[@]}"}")

if [ $SLURM = 1 ]; then
  cat >"$OUT/sweep.sbatch" <<SB
#!/usr/bin/env bash
#SBATCH --job-name=dialora-$NAME
#SBATCH --array=0-$((n - 1))
#SBATCH --output=$OUT/slurm-%A_%a.log
#SBATCH --requeue
#SBATCH --signal=B:TERM@120
#SBATCH --cpus-per-task=\${DIALORA_CPUS:-8}
# One array task per grid point of $MANIFEST. SIGTERM (preemption, time limit) makes the
# trainer save a checkpoint; a requeued task resumes from it (scripts/train.sh does that).
set -euo pipefail
ROOT=$ROOT
MANIFEST=$MANIFEST
i=\${SLURM_ARRAY_TASK_ID:?run as a Slurm array task}
line=\$(awk -F'\t' -v i="\$i" '\$1 == i' "\$MANIFEST")
[ -n "\$line" ] || { echo "no grid point \$i in \$MANIFEST" >&2; exit 2; }
name=\$(cut -f2 <<<"\$line"); args=\$(cut -f3 <<<"\$line")
if [ ! -f "$SHARDS/meta.json" ]; then
  echo "shards $SHARDS missing: run scripts/prepare-data.sh first" >&2; exit 2
fi
cmd=("\$ROOT/scripts/train.sh" "$MODEL" "$SHARDS" "$OUT/\$name" \$args $EXTRA)
if [ -n "\${DIALORA_DRY_RUN:-}" ]; then echo "\${cmd[*]}"; exit 0; fi
"\${cmd[@]}" &
wait \$!
SB
  chmod +x "$OUT/sweep.sbatch"
  echo "sweep: wrote $OUT/sweep.sbatch; prepare the shards once, then: sbatch $OUT/sweep.sbatch"
  echo "  shards: $ROOT/scripts/prepare-data.sh $MODEL $SHARDS $INPUT -- --val-split 0.15 --max-seq-len 256"
  exit 0
fi

[ $DRY = 1 ] && { cat "$MANIFEST"; exit 0; }
if [ ! -f "$SHARDS/meta.json" ]; then
  "$ROOT/scripts/prepare-data.sh" "$MODEL" "$SHARDS" "$INPUT" -- --val-split 0.15 --max-seq-len 256
fi
dirs=()
for i in "${!points[@]}"; do
  d=$OUT/${names[$i]}
  echo "== sweep point $((i + 1))/$n: ${names[$i]}"
  if [ -f "$d/adapter_model.safetensors" ]; then echo "   done already"; dirs+=("$d"); continue; fi
  # shellcheck disable=SC2086
  "$ROOT/scripts/train.sh" "$MODEL" "$SHARDS" "$d" ${points[$i]} "${extra[@]+"${extra[@]}"}"
  dirs+=("$d")
done
"$ROOT/scripts/report.sh" "$OUT/report.html" "${dirs[@]}"
echo "sweep: report in $OUT/report.html"
