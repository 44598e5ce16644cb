# Shared by the multi-node launchers (sourced, not run). Works under plain torchrun and SLURM.
#
# Rendezvous comes from the usual variables; under `srun` (one task per node) they are derived
# from SLURM's own:
#   MASTER_ADDR (default: first node of the SLURM job, else localhost)
#   MASTER_PORT (default 29500)
#   NNODES      (default: SLURM_NNODES, else 1)
#   NODE_RANK   (default: SLURM_NODEID, else 0)
#   GPUS_PER_NODE (default 8)
# Example, 4 nodes under SLURM:
#   srun --nodes=4 --ntasks-per-node=1 --gpus-per-node=8 bash examples/pretrain_sail_8b.sh
# Example, 2 nodes by hand (run on each node, NODE_RANK 0 and 1):
#   MASTER_ADDR=node0 NNODES=2 NODE_RANK=0 bash examples/pretrain_sail_8b.sh
# DRY_RUN=1 prints each stage's resolved trainer config (YAML) instead of launching
# (PYTHON picks the interpreter, default `python`); tests/unit/test_train_examples.py uses it.

if [ -n "${SLURM_JOB_ID:-}" ] && [ -z "${MASTER_ADDR:-}" ] && command -v scontrol >/dev/null; then
  MASTER_ADDR="$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1)"
fi
MASTER_ADDR="${MASTER_ADDR:-localhost}"
MASTER_PORT="${MASTER_PORT:-29500}"
NNODES="${NNODES:-${SLURM_NNODES:-1}}"
NODE_RANK="${NODE_RANK:-${SLURM_NODEID:-0}}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"

# Torch / NCCL settings that matter for Megatron-Core's overlapped communication.
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"

# DALI decodes images on the GPU in these runs (the image pipeline's 'dali' backend).
DALI_CONFIG="$(mktemp -t megatron_sail_dali.XXXXXX.yaml)"
printf 'images:\n  backend: dali\n' > "${DALI_CONFIG}"
trap 'rm -f "${DALI_CONFIG}"' EXIT

# require VAR: stop with a clear message when a required variable is unset.
require() {
  if [ -z "${!1:-}" ]; then
    echo "error: set $1 ($2)" >&2
    exit 2
  fi
}

# run_stage RECIPE STAGE RUN_DIR INIT_FROM [train flags...]: one training stage. Resumes from
# RUN_DIR/checkpoints when it holds a complete checkpoint; otherwise starts from INIT_FROM
# (weights only) when given.
run_stage() {
  local recipe="$1" stage="$2" run_dir="$3" init_from="$4"
  shift 4
  local ckpt="${run_dir}/checkpoints"
  local init=()
  if [ ! -e "${ckpt}/latest" ] && [ -n "${init_from}" ]; then
    init=(--init-from "${init_from}")
  fi
  local args=(--recipe "${recipe}" --stage "${stage}" --config "${DALI_CONFIG}"
              --run-dir "${run_dir}" --save "${ckpt}" --load "${ckpt}"
              --tensorboard-dir "${run_dir}/tensorboard" "${init[@]}" "$@")
  if [ "${DRY_RUN:-0}" = 1 ]; then
    # Resolve the config exactly as the trainer would (same flags, same checks) and print it
    # as one YAML document per stage, without starting anything.
    echo "---"
    "${PYTHON:-python}" -m megatron_sail.config.run "${args[@]}"
    return
  fi
  echo "[launcher] node ${NODE_RANK}/${NNODES} -> ${MASTER_ADDR}:${MASTER_PORT}: ${recipe} ${stage} in ${run_dir}"
  torchrun --nnodes "${NNODES}" --node_rank "${NODE_RANK}" --nproc_per_node "${GPUS_PER_NODE}" \
    --master_addr "${MASTER_ADDR}" --master_port "${MASTER_PORT}" \
    -m megatron_sail.train "${args[@]}"
}
