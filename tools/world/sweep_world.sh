#!/usr/bin/env bash
# A validation sweep of the shapes-world edit settings, run on a lent GPU (docs/evaluation.md).
# Each grid line is one tools/world/eval_world.py run of method gas on the validation cases (--seed 1, never
# the test seed 0); JOBS runs share the GPU. Selection only: the README's numbers are CPU runs.
# Usage: OUT=folder CASES=40 JOBS=12 bash tools/world/sweep_world.sh [grid-file]   (default grid below;
# ACCEL=cpu JOBS=2 on a machine without a GPU, about 25 s per edit per job at 150 steps)
set -u
OUT=${OUT:-outputs/sweep}
CASES=${CASES:-40}
JOBS=${JOBS:-12}
ACCEL=${ACCEL:-gpu}
mkdir -p "$OUT"
GRID=${1:-}
if [ -z "$GRID" ]; then
  GRID="$OUT/grid.txt"
  # name | eval_world arguments
  cat > "$GRID" <<'EOF'
const|--lr 0.1 --steps 100 --lr_schedule constant
cos_lr0.2|--lr 0.2 --steps 100 --lr_schedule cosine
cos_lr0.3|--lr 0.3 --steps 100 --lr_schedule cosine
cos_lr0.2_f0.2|--lr 0.2 --steps 100 --lr_schedule cosine --lr_final 0.2
cos_lr0.2_g14|--lr 0.2 --steps 100 --lr_schedule cosine --guidance_scale 14
cos_lr0.2_g15.5|--lr 0.2 --steps 100 --lr_schedule cosine --guidance_scale 15.5
cos_lr0.3_g14|--lr 0.3 --steps 100 --lr_schedule cosine --guidance_scale 14
cos_lr0.2_s150|--lr 0.2 --steps 150 --lr_schedule cosine
cos_lr0.15_s150|--lr 0.15 --steps 150 --lr_schedule cosine
cos_lr0.2_w9|--lr 0.2 --steps 100 --lr_schedule cosine --wide_guidance_scale 9
cos_lr0.3_f0.1|--lr 0.3 --steps 100 --lr_schedule cosine --lr_final 0.1
cos_lr0.2_dds|--lr 0.2 --steps 100 --lr_schedule cosine --methods dds
cos_lr0.2_g14_s150|--lr 0.2 --steps 150 --lr_schedule cosine --guidance_scale 14
cos_lr0.25_g13.5|--lr 0.25 --steps 100 --lr_schedule cosine --guidance_scale 13.5
cos_lr0.2_seq|--lr 0.2 --steps 100 --lr_schedule cosine --methods gas_sequential
cos_lr0.4|--lr 0.4 --steps 100 --lr_schedule cosine
EOF
fi
run_one() {
  name=${1%%|*}; extra=${1#*|}
  s=$(date +%s)
  # shellcheck disable=SC2086
  OMP_NUM_THREADS=2 python3 tools/world/eval_world.py --accelerator "$ACCEL" --cases "$CASES" --seed 1 --methods gas \
    $extra --json "$OUT/$name.json" --figure "$OUT/$name.png" --figure_cases 4 > "$OUT/$name.log" 2>&1
  echo "$name rc=$? $(( $(date +%s) - s )) s: $(grep -o 'all_attributes=[0-9.]*.*bg_psnr_in_boxes=[0-9.]*' "$OUT/$name.log")"
}
export -f run_one
export OUT CASES ACCEL
grep -v '^\s*$' "$GRID" | xargs -d '\n' -P "$JOBS" -I{} bash -c 'run_one "$@"' _ {}
