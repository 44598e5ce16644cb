#!/usr/bin/env bash
# SAIL-VL-8B supervised fine-tuning curriculum: sft-knowledge -> sft-instruction -> sft-preference,
# each stage starting from the previous stage's weights (--init-from, no optimizer state), all
# modules trainable. Multi-node rendezvous: see examples/common.sh.
#
#   INIT_FROM=runs/sail_8b/pretrain-advance/checkpoints \
#   KNOWLEDGE_DATA="/data/sft_knowledge" INSTRUCTION_DATA="/data/sft_instruction" \
#   PREFERENCE_DATA="/data/sft_preference" VALID_DATA_PATH=/data/sft_valid \
#     srun --nodes=8 --ntasks-per-node=1 bash examples/sft_sail_8b.sh [extra trainer flags]
#
# Steps per stage come from the paper's sample counts (21M, 12M, 3.5M) under OUR assumption of
# ~8 SFT samples per 16,384-token row and global batch 512; override with *_ITERS.
#
# A complexity curriculum (docs/sft_curriculum.md) instead of the three *_DATA variables:
#   PLAN=plan.yaml INIT_FROM=... srun ... bash examples/sft_sail_8b.sh
# runs the plan's stages in its order (tools/build_curriculum.py: stage K's blend, its trainer
# stage, and its steps: the plan's `iters`, else samples / (SAMPLES_PER_ROW x GBS) with
# SAMPLES_PER_ROW=8); run dirs RUN_ROOT/<plan stage>. Run the plan's preprocess commands first.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source examples/common.sh

if [ -z "${PLAN:-}" ]; then
  require KNOWLEDGE_DATA "sft-knowledge prefixes"
  require INSTRUCTION_DATA "sft-instruction prefixes"
  require PREFERENCE_DATA "sft-preference prefixes"
fi
RUN_ROOT="${RUN_ROOT:-runs/sail_8b}"
INIT_FROM="${INIT_FROM:-${RUN_ROOT}/pretrain-advance/checkpoints}"
TP="${TP:-4}" PP="${PP:-2}"
SEQ_LENGTH="${SEQ_LENGTH:-16384}" GBS="${GBS:-512}" MBS="${MBS:-1}"
declare -A DATA=([sft-knowledge]="${KNOWLEDGE_DATA:-}" [sft-instruction]="${INSTRUCTION_DATA:-}"
                 [sft-preference]="${PREFERENCE_DATA:-}")
declare -A ITERS=([sft-knowledge]="${KNOWLEDGE_ITERS:-5100}" [sft-instruction]="${INSTRUCTION_ITERS:-2900}"
                  [sft-preference]="${PREFERENCE_ITERS:-850}")

COMMON=(--tensor-model-parallel-size "${TP}" --pipeline-model-parallel-size "${PP}"
        --sequence-parallel --use-distributed-optimizer --bf16 --fp8-format hybrid
        --seq-length "${SEQ_LENGTH}" --global-batch-size "${GBS}" --micro-batch-size "${MBS}"
        --recompute-granularity selective --recompute-vit
        --save-interval 500 --eval-interval 500 --log-interval 10)
if [ -n "${VALID_DATA_PATH:-}" ]; then COMMON+=(--valid-data-path "${VALID_DATA_PATH}"); fi

prev="${INIT_FROM}"
if [ -n "${PLAN:-}" ]; then
  # one line per plan stage: name, trainer stage, steps, blend (tab-separated)
  PLAN_LINES="$("${PYTHON}" -c '
import math, sys, yaml
plan = yaml.safe_load(open(sys.argv[1]))
per_row, gbs = float(sys.argv[2]), int(sys.argv[3])
if not isinstance(plan, dict) or not plan.get("stages"):
    sys.exit(f"PLAN {sys.argv[1]}: no stages (write it with tools/build_curriculum.py)")
for s in plan["stages"]:
    iters = s.get("iters") or max(1, math.ceil((s["samples"] + s.get("replayed", 0)) / (per_row * gbs)))
    print("\t".join([s["name"], s["trainer_stage"], str(iters), s["blend"]]))
' "${PLAN}" "${SAMPLES_PER_ROW:-8}" "${GBS}")"
  while IFS=$'\t' read -r -u 3 name stage iters blend; do
    run_stage sail_8b "${stage}" "${RUN_ROOT}/${name}" "${prev}" "${COMMON[@]}" \
      --data-path ${blend} --train-iters "${iters}" "$@"
    prev="${RUN_ROOT}/${name}/checkpoints"
  done 3<<< "${PLAN_LINES}"
  exit 0
fi
for stage in sft-knowledge sft-instruction sft-preference; do
  run_stage sail_8b "${stage}" "${RUN_ROOT}/${stage}" "${prev}" "${COMMON[@]}" \
    --data-path "${DATA[${stage}]}" --train-iters "${ITERS[${stage}]}" "$@"
  prev="${RUN_ROOT}/${stage}/checkpoints"
done
