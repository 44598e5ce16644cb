#!/usr/bin/env bash
# SAIL-VL's three claims at toy scale, on the CPU (docs/sft_curriculum.md):
#   (a) benchmark score grows linearly in log(pretraining tokens): one pretraining run on the demo
#       set, scored during training at geometrically spaced steps, fitted by tools/scaling_law.py's fit;
#   (b) SFT scores grow with SFT data quantity: SFT on nested subsets of a graded SFT pool;
#   (c) a curriculum of rising complexity beats one-stage SFT: complexity scores
#       (tools/score_complexity.py), 3 stages (tools/build_curriculum.py) ascending vs one stage on the
#       shuffled pool vs descending, the same tokens, the same pretrained start, 2 seeds each,
#       paired-bootstrap CIs as tools/data_ablation.py computes them;
#   (d) recaptioned data beats the original text: examples/sail_caption.sh's result.
# Writes OUT/report.md, OUT/report.json and OUT/*.png. Whatever is measured is reported.
#
#   bash examples/reproduce_paper.sh [--out DIR]            # full study (41 min measured on a loaded 2-core VM)
#   SMOKE=1 bash examples/reproduce_paper.sh --out /tmp/p   # every part, a few samples and steps (4-6 min)
#   CAPTION_SUMMARY=runs/sail_caption/summary.json bash examples/reproduce_paper.sh   # claim 1 from a run
#   CAPTION=1 bash examples/reproduce_paper.sh              # also run examples/sail_caption.sh
#   METHOD=ifd bash examples/reproduce_paper.sh             # IFD with the pretrained model as reference
#   SEEDS="1 2 3" bash examples/reproduce_paper.sh
# A rerun with the same --out resumes (finished data and runs are kept).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-.venv/bin/python}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
OUT="runs/paper"
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --out=*) OUT="${1#--out=}"; shift ;;
    *) echo "usage: [SMOKE=1] bash examples/reproduce_paper.sh [--out DIR]" >&2; exit 2 ;;
  esac
done
ARGS=(--out "${OUT}" --method "${METHOD:-heuristic}")
[ "${SMOKE:-0}" = 1 ] && ARGS+=(--smoke)
[ -n "${SEEDS:-}" ] && ARGS+=(--seeds ${SEEDS})
if [ -n "${CAPTION_SUMMARY:-}" ]; then
  ARGS+=(--caption-summary "${CAPTION_SUMMARY}")
elif [ "${CAPTION:-0}" = 1 ]; then
  ARGS+=(--run-caption)
fi
START=$(date +%s)
"${PY}" tools/reproduce_paper.py "${ARGS[@]}"
echo "done in $(( $(date +%s) - START ))s: ${OUT}/report.md"
