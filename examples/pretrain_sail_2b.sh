#!/usr/bin/env bash
# SAIL-VL-2B pretraining (InternViT-300M + Qwen2.5-1.5B) on 8xH100 nodes, FP8, DALI on GPU:
# pretrain-alignment (projector only) then pretrain-advance (ViT + projector), the second stage
# starting from the first one's weights. Multi-node rendezvous: see examples/common.sh.
#
#   DATA_PATH="0.7 /data/caption 0.3 /data/ocr" VALID_DATA_PATH=/data/valid \
#     srun --nodes=8 --ntasks-per-node=1 bash examples/pretrain_sail_2b.sh [extra trainer flags]
#
# Sizing (assumptions, SAIL-VL did not publish them): 16,384-token packed rows and global batch
# 512 (InternVL2.5's values) -> 8.4M tokens per step; the paper's 131B + 524B-token budgets are
# then ~15.6k + ~62.5k steps. Qwen2.5-1.5B has 2 KV heads, so TP is 1 or 2: TP=2 with sequence
# parallelism halves the 16k-token activations; no pipeline needed at this size.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source examples/common.sh

require DATA_PATH "training prefixes, optionally weighted: 'W1 P1 W2 P2'"
RUN_ROOT="${RUN_ROOT:-runs/sail_2b}"
STAGES="${STAGES:-pretrain-alignment pretrain-advance}"
TP="${TP:-2}" PP="${PP:-1}"
SEQ_LENGTH="${SEQ_LENGTH:-16384}" GBS="${GBS:-512}" MBS="${MBS:-1}"
declare -A ITERS=([pretrain-alignment]="${ALIGN_ITERS:-15600}" [pretrain-advance]="${ADVANCE_ITERS:-62500}")
INIT_FROM="${INIT_FROM:-}"   # e.g. an HF conversion (tools/convert_checkpoint.py) for the first stage

COMMON=(--tensor-model-parallel-size "${TP}" --pipeline-model-parallel-size "${PP}"
        --sequence-parallel --use-distributed-optimizer --bf16 --fp8-format hybrid
        --seq-length "${SEQ_LENGTH}" --global-batch-size "${GBS}" --micro-batch-size "${MBS}"
        --recompute-granularity selective
        --data-path "${DATA_PATH}" --save-interval 1000 --eval-interval 1000 --log-interval 10)
if [ -n "${VALID_DATA_PATH:-}" ]; then COMMON+=(--valid-data-path "${VALID_DATA_PATH}"); fi

prev="${INIT_FROM}"
for stage in ${STAGES}; do
  run_stage sail_2b "${stage}" "${RUN_ROOT}/${stage}" "${prev}" "${COMMON[@]}" \
    --train-iters "${ITERS[${stage}]}" "$@"
  prev="${RUN_ROOT}/${stage}/checkpoints"
done
