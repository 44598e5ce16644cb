#!/usr/bin/env bash
# Training step against transformers' InternVL: the two tools alternate in separate processes
# (transformers first on even repeats, ours first on odd ones), same flags, same synthetic
# micro-batches, threads fixed and equal on both sides; then the medians.
#
#   bash benchmarks/compare.sh                                   # SAIL-VL-2B shape, 4096 tokens, 4 tiles (GPU)
#   RECIPE=tiny SEQ_LENGTH=8192 TILES=64 STEPS=5 REPEATS=3 bash benchmarks/compare.sh   # CPU, 121 GFLOP/step (attention-bound)
#   RECIPE=sail_2b SEQ_LENGTH=512 TILES=1 STEPS=2 REPEATS=4 \
#     EXTRA="--lm-layers 1 --vit-layers 1 --warmup 1 --split-steps 1" bash benchmarks/compare.sh  # CPU, 970 GFLOP/step
#   RECIPE=tiny STEPS=5 bash benchmarks/compare.sh               # CPU smoke run (its recipe's 256 tokens)
#   WHEELS=/path/to/wheels bash benchmarks/compare.sh            # first install carried wheels offline
#   EXTRA="--micro-batch-size 2" OURS_EXTRA="--fp8-format hybrid" bash benchmarks/compare.sh
#
# Last line: point=train_step_<recipe> ours=<tokens/s> peer=<tokens/s> ratio=<ours/peer>
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python; fi
fi
if [ -n "${WHEELS:-}" ]; then
  "$PY" -m pip install -q --no-index --find-links "${WHEELS}" megatron-core==0.16.1 transformers==5.23.0 \
    tokenizers==0.23.3 safetensors==0.8.0 einops==0.8.2
  "$PY" -m pip install -q --no-deps -e .
fi
RECIPE="${RECIPE:-sail_2b}" STEPS="${STEPS:-20}" OUT="${OUT:-runs/benchmark}" REPEATS="${REPEATS:-1}"
# the same intra-op threads on both sides (default 1 on a CPU; a GPU run keeps torch's default)
if [ -z "${THREADS:-}" ] && ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
  THREADS=1
fi
if [ -n "${THREADS:-}" ]; then export OMP_NUM_THREADS="${THREADS}" MKL_NUM_THREADS="${THREADS}"; fi
ARGS=(--recipe "${RECIPE}" --steps "${STEPS}" ${EXTRA:-})
if [ "${RECIPE}" != tiny ] || [ -n "${SEQ_LENGTH:-}" ]; then
  ARGS+=(--seq-length "${SEQ_LENGTH:-4096}" --tiles-per-row "${TILES:-4}")
fi
mkdir -p "${OUT}"
for ((r = 0; r < REPEATS; r++)); do
  if ((r % 2 == 0)); then ORDER="hf ours"; else ORDER="ours hf"; fi
  for side in ${ORDER}; do
    if [ "${side}" = hf ]; then
      "$PY" benchmarks/hf_reference.py "${ARGS[@]}" --json "${OUT}/hf.${r}.json"
    else
      # shellcheck disable=SC2086
      "$PY" tools/benchmark.py "${ARGS[@]}" ${OURS_EXTRA:-} --json "${OUT}/ours.${r}.json"
    fi
  done
done
"$PY" - "${OUT}" "${REPEATS}" <<'PYEOF'
import json, statistics, sys
out, repeats = sys.argv[1], int(sys.argv[2])
runs = {side: [json.load(open(f"{out}/{side}.{r}.json")) for r in range(repeats)] for side in ("hf", "ours")}
hf, ours = runs["hf"][0], runs["ours"][0]
print(f"\n{hf['device']} | {hf['recipe']} | seq {hf['seq_length']} | {hf['tiles_per_row']} tiles/row | "
      f"mbs {hf['micro_batch_size']} | {repeats} alternating runs per side, medians")
print(f"{'':24}{'tokens/s':>12}{'TFLOP/s':>10}{'MFU':>8}{'peak GiB':>10}{'step s':>9}")
med = {side: {k: statistics.median(r[k] for r in rs) for k in ("tokens_per_s", "tflops_per_gpu",
                                                               "peak_memory_gib", "step_time_s")}
       for side, rs in runs.items()}
for name, side in (("transformers InternVL", "hf"), ("megatron_sail", "ours")):
    m, r = med[side], runs[side][0]
    mfu = f"{r['mfu']:.3f}" if r["mfu"] is not None else "n/a"
    print(f"{name:24}{m['tokens_per_s']:>12.1f}{m['tflops_per_gpu']:>10.3f}{mfu:>8}"
          f"{m['peak_memory_gib']:>10.2f}{m['step_time_s']:>9.4f}")
for side in ("hf", "ours"):
    print(f"{side} tokens/s per run: " + " ".join(f"{r['tokens_per_s']:.1f}" for r in runs[side]))
gflop = ours["tflops_per_gpu"] * ours["step_time_s"] * 1e3
ratio = med["ours"]["tokens_per_s"] / med["hf"]["tokens_per_s"]
print(f"step work: {gflop:.1f} GFLOP")
print(f"point=train_step_{ours['recipe']} ours={med['ours']['tokens_per_s']:.1f} "
      f"peer={med['hf']['tokens_per_s']:.1f} ratio={ratio:.2f}")
PYEOF
