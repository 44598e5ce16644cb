#!/usr/bin/env bash
# SAIL-VL2-8B post-training chain (SAIL-VL2 README, after pretraining), on 8xH100 nodes:
#
#   SFT phases (one run per phase, each from INIT_FROM)  -> model soup of the phases
#   -> LongCoT SFT -> GRPO, reward format + accuracy (RL with verifiable rewards)
#   -> Think-Fusion SFT -> GRPO, mixed reward (accuracy + format + length [+ judge])
#
#   INIT_FROM=runs/sail_vl2_8b/pretrain-advance/checkpoints \
#   SFT_PHASES="/data/sft_p1 /data/sft_p2 /data/sft_p3 /data/sft_p4" \
#   LONGCOT_DATA=/data/longcot THINK_FUSION_DATA=/data/think_fusion \
#   RL_DATA=/data/rl_verifiable.jsonl RL_MIXED_DATA="/data/rl_mixed.jsonl /data/MMBench.tsv" \
#     srun --nodes=8 --ntasks-per-node=1 bash examples/post_train_sail_vl2_8b.sh [extra flags]
#
# SFT data are packed prefixes (tools/preprocess_data.py); RL data are JSONL prompts with
# reference answers or VLMEvalKit TSVs. JUDGE_URL (an OpenAI-compatible endpoint) adds the judge
# reward to the mixed stage. DRY_RUN=1 resolves and checks every stage (data, checkpoints,
# recipe) and prints the soup command instead of running anything (examples/common.sh).
# Steps, batch sizes and learning rates below are OUR assumptions (SAIL-VL2 publishes none for
# these stages); override them by environment (*_ITERS, RL_GBS, ...) or trailing flags.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source examples/common.sh

require INIT_FROM "the pretrained SAIL-VL2-8B checkpoint"
require SFT_PHASES "space-separated packed prefixes, one per SFT phase"
require LONGCOT_DATA "LongCoT SFT prefixes"
require THINK_FUSION_DATA "Think-Fusion SFT prefixes"
require RL_DATA "GRPO prompts (JSONL / TSV) for the format + accuracy stage"
require RL_MIXED_DATA "GRPO prompts (JSONL / TSV) for the mixed-reward stage"
RUN_ROOT="${RUN_ROOT:-runs/sail_vl2_8b_post}"
SEQ_LENGTH="${SEQ_LENGTH:-16384}" GBS="${GBS:-512}" MBS="${MBS:-1}"
SFT_ITERS="${SFT_ITERS:-2000}" LONGCOT_ITERS="${LONGCOT_ITERS:-1500}"
FUSION_ITERS="${FUSION_ITERS:-1000}" RL_ITERS="${RL_ITERS:-300}" RL_MIXED_ITERS="${RL_MIXED_ITERS:-300}"
RL_GBS="${RL_GBS:-512}" RL_G="${RL_G:-8}" RL_SEQ="${RL_SEQ:-8192}" RL_NEW="${RL_NEW:-2048}"
# SAIL-VL2's CoT prompt: think first, then the final answer in \boxed{}.
DEFAULT_COT=$'\nThink step by step inside <think> </think>, then give the final answer in \\boxed{}.'
COT_SUFFIX="${COT_SUFFIX:-${DEFAULT_COT}}"

SFT=(--sequence-parallel --use-distributed-optimizer --bf16 --fp8-format hybrid
     --seq-length "${SEQ_LENGTH}" --global-batch-size "${GBS}" --micro-batch-size "${MBS}"
     --recompute-granularity selective --recompute-vit --save-interval 500 --log-interval 10)
RL=(--sequence-parallel --use-distributed-optimizer --bf16 --seq-length "${RL_SEQ}"
    --global-batch-size "${RL_GBS}" --micro-batch-size "${MBS}" --num-generations "${RL_G}"
    --max-new-tokens "${RL_NEW}" --temperature 1.0 --top-p 1.0 --clip-eps 0.2 --kl-coef 0.001
    --grpo-loss-level token --ppo-epochs 1 --prompt-suffix "${COT_SUFFIX}"
    --recompute-granularity selective --save-interval 50 --log-interval 1)

# 1. SFT phases, each from the pretrained weights
phase_ckpts=()
k=0
for data in ${SFT_PHASES}; do
  k=$((k + 1))
  run_stage sail_vl2_8b sft-instruction "${RUN_ROOT}/sft_phase${k}" "${INIT_FROM}" "${SFT[@]}" \
    --data-path "${data}" --train-iters "${SFT_ITERS}" "$@"
  phase_ckpts+=("${RUN_ROOT}/sft_phase${k}/checkpoints")
done

# 2. model soup of the phases (uniform weights unless SOUP_WEIGHTS="w1 w2 ...")
SOUP="${RUN_ROOT}/soup"
soup=("${PYTHON}" tools/merge_checkpoints.py --inputs "${phase_ckpts[@]}" --out "${SOUP}")
if [ -n "${SOUP_WEIGHTS:-}" ]; then soup+=(--weights ${SOUP_WEIGHTS}); fi
if [ "${DRY_RUN:-0}" = 1 ]; then
  echo "[dry-run] soup: ${soup[*]}" >&2
  PLANNED_CKPTS+=("${SOUP}")
elif [ ! -e "${SOUP}/metadata.json" ]; then
  "${soup[@]}"
fi

# 3. LongCoT SFT -> 4. GRPO (format + accuracy) -> 5. Think-Fusion SFT -> 6. GRPO (mixed)
run_stage sail_vl2_8b sft-instruction "${RUN_ROOT}/longcot" "${SOUP}" "${SFT[@]}" \
  --data-path ${LONGCOT_DATA} --train-iters "${LONGCOT_ITERS}" "$@"
# --ref-load: the KL reference stays the stage's starting weights when a restart resumes
run_stage sail_vl2_8b grpo "${RUN_ROOT}/rl_verifiable" "${RUN_ROOT}/longcot/checkpoints" "${RL[@]}" \
  --ref-load "${RUN_ROOT}/longcot/checkpoints" --data-path ${RL_DATA} --train-iters "${RL_ITERS}" \
  --reward format accuracy "$@"
run_stage sail_vl2_8b sft-instruction "${RUN_ROOT}/think_fusion" "${RUN_ROOT}/rl_verifiable/checkpoints" \
  "${SFT[@]}" --data-path ${THINK_FUSION_DATA} --train-iters "${FUSION_ITERS}" "$@"
MIXED=(--reward accuracy format length --reward-weights 1.0 0.5 1.0 --length-target "${RL_NEW}")
if [ -n "${JUDGE_URL:-}" ]; then
  MIXED=(--reward accuracy format length judge --reward-weights 1.0 0.5 1.0 1.0
         --length-target "${RL_NEW}" --judge-url "${JUDGE_URL}" --judge-model "${JUDGE_MODEL:-judge}")
fi
run_stage sail_vl2_8b grpo "${RUN_ROOT}/rl_mixed" "${RUN_ROOT}/think_fusion/checkpoints" "${RL[@]}" \
  --ref-load "${RUN_ROOT}/think_fusion/checkpoints" --data-path ${RL_MIXED_DATA} \
  --train-iters "${RL_MIXED_ITERS}" "${MIXED[@]}" "$@"
