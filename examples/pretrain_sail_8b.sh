#!/usr/bin/env bash
# SAIL-VL-8B pretraining (InternViT-300M + Qwen2.5-7B) on 8xH100 nodes, FP8, DALI on GPU:
# pretrain-alignment (projector only) then pretrain-advance (ViT + projector), the second stage
# starting from the first one's weights. Multi-node rendezvous: see examples/common.sh.
#
#   DATA_PATH="0.7 /data/caption 0.3 /data/ocr" VALID_DATA_PATH=/data/valid \
#     srun --nodes=16 --ntasks-per-node=1 bash examples/pretrain_sail_8b.sh [extra trainer flags]
#   docker run --gpus all ... megatron_sail bash examples/pretrain_sail_8b.sh   (one node)
#
# Sizing (assumptions, not published): 16,384-token rows, global batch 512. Qwen2.5-7B has 4 KV
# heads, so TP is at most 4: TP=4 with sequence parallelism keeps a 7B layer's weights and 16k
# activations well inside 80 GB; PP=2 (ViT + first LM layers on stage 0) leaves DP=1 per node,
# so each node holds one full model replica and data parallelism runs across nodes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source examples/common.sh

require DATA_PATH "training prefixes, optionally weighted: 'W1 P1 W2 P2'"
RUN_ROOT="${RUN_ROOT:-runs/sail_8b}"
STAGES="${STAGES:-pretrain-alignment pretrain-advance}"
TP="${TP:-4}" PP="${PP:-2}"
SEQ_LENGTH="${SEQ_LENGTH:-16384}" GBS="${GBS:-512}" MBS="${MBS:-1}"
declare -A ITERS=([pretrain-alignment]="${ALIGN_ITERS:-15600}" [pretrain-advance]="${ADVANCE_ITERS:-62500}")
INIT_FROM="${INIT_FROM:-}"   # e.g. an HF conversion (tools/convert_checkpoint.py) for the first stage

COMMON=(--tensor-model-parallel-size "${TP}" --pipeline-model-parallel-size "${PP}"
        --sequence-parallel --use-distributed-optimizer --bf16 --fp8-format hybrid
        --seq-length "${SEQ_LENGTH}" --global-batch-size "${GBS}" --micro-batch-size "${MBS}"
        --recompute-granularity selective --recompute-vit
        --data-path "${DATA_PATH}" --save-interval 500 --eval-interval 1000 --log-interval 10)
if [ -n "${VALID_DATA_PATH:-}" ]; then COMMON+=(--valid-data-path "${VALID_DATA_PATH}"); fi

prev="${INIT_FROM}"
for stage in ${STAGES}; do
  run_stage sail_8b "${stage}" "${RUN_ROOT}/${stage}" "${prev}" "${COMMON[@]}" \
    --train-iters "${ITERS[${stage}]}" "$@"
  prev="${RUN_ROOT}/${stage}/checkpoints"
done
