# Shared by the multi-node launchers (sourced, not run). Works under plain torchrun and SLURM.
#
# Interpreter: PYTHON (default: the checkout's .venv/bin/python, else python3); the launch is
# `$PYTHON -m torch.distributed.run` (torchrun without needing it on PATH).
# Rendezvous comes from the usual variables; under SLURM they are derived from SLURM's own:
#   MASTER_ADDR (default: first node of the SLURM job, else localhost)
#   MASTER_PORT (default 29500; set another per job when two jobs share a first node)
#   NNODES      (default: SLURM_NNODES, else 1)
#   NODE_RANK   (default: SLURM_NODEID, else 0)
#   GPUS_PER_NODE (default 8)
# Process-group timeout: pass `--distributed-timeout-minutes N` (default 10) as an extra flag.
# Example, 4 nodes under SLURM, one task per node (each runs torch.distributed.run for 8 GPUs):
#   srun --nodes=4 --ntasks-per-node=1 --gpus-per-node=8 bash examples/pretrain_sail_8b.sh
# Example, 4 nodes under SLURM, one task per GPU: each task runs the trainer itself, which takes
# its rank and world size from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID:
#   srun --nodes=4 --ntasks-per-node=8 --gpus-per-node=8 bash examples/pretrain_sail_8b.sh
# Example, 2 nodes by hand (run on each node, NODE_RANK 0 and 1):
#   MASTER_ADDR=node0 NNODES=2 NODE_RANK=0 bash examples/pretrain_sail_8b.sh
# DRY_RUN=1 launches nothing: it prints each stage's resolved trainer config (YAML) on stdout
# and the launch command on stderr, and checks (megatron_sail/training/dry_run.py) that the data
# prefixes exist and match the recipe (row length, tile size, tokens per tile, token ids) and
# that --load / --init-from checkpoints hold the recipe's model; tests/unit/test_train_examples.py
# uses it.

if [ -z "${PYTHON:-}" ]; then
  if [ -x "$(pwd)/.venv/bin/python" ]; then PYTHON="$(pwd)/.venv/bin/python"; else PYTHON=python3; fi
fi
if [ -n "${SLURM_JOB_ID:-}" ] && [ -z "${MASTER_ADDR:-}" ] && [ -n "${SLURM_JOB_NODELIST:-}" ]; then
  # scontrol when installed, else a parser for the compressed forms (node[01-04,07],...)
  MASTER_ADDR="$("${PYTHON}" -c 'import sys; from megatron_sail.platform.slurm import first_host
print(first_host(sys.argv[1]))' "${SLURM_JOB_NODELIST}")"
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

# One task per GPU under srun (more tasks than nodes in this step): every task is one trainer
# rank; otherwise this task starts GPUS_PER_NODE ranks with torch.distributed.run.
TASK_PER_GPU=0
if [ -n "${SLURM_STEP_ID:-}" ] && [ "${SLURM_STEP_NUM_TASKS:-1}" -gt "${SLURM_STEP_NUM_NODES:-1}" ]; then
  TASK_PER_GPU=1
  export MASTER_ADDR MASTER_PORT
fi

PLANNED_CKPTS=()   # checkpoints earlier stages of this launcher will write (DRY_RUN checks)

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
              --tensorboard-dir "${run_dir}/tensorboard" --log-throughput "${init[@]}" "$@")
  local launch
  if [ "${TASK_PER_GPU}" = 1 ]; then
    launch=("${PYTHON}" -m megatron_sail.train)
  else
    launch=("${PYTHON}" -m torch.distributed.run --nnodes "${NNODES}" --node_rank "${NODE_RANK}"
            --nproc_per_node "${GPUS_PER_NODE}" --master_addr "${MASTER_ADDR}"
            --master_port "${MASTER_PORT}" -m megatron_sail.train)
  fi
  if [ "${DRY_RUN:-0}" = 1 ]; then
    # Resolve the config exactly as the trainer would (same flags, same checks), print it as one
    # YAML document per stage, and check data and checkpoints against it; start nothing.
    local planned=()
    local p
    for p in "${PLANNED_CKPTS[@]}"; do planned+=(--planned "${p}"); done
    echo "---"
    echo "[dry-run] launch: ${launch[*]} ..." >&2
    "${PYTHON}" -m megatron_sail.training.dry_run "${planned[@]}" -- "${args[@]}"
    PLANNED_CKPTS+=("${ckpt}")
    return
  fi
  if [ "${SLURM_PROCID:-0}" = 0 ] || [ "${TASK_PER_GPU}" = 0 ]; then
    echo "[launcher] node ${NODE_RANK}/${NNODES} -> ${MASTER_ADDR}:${MASTER_PORT}: ${recipe} ${stage} in ${run_dir}"
  fi
  "${launch[@]}" "${args[@]}"
}
