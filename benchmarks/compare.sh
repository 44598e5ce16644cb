#!/usr/bin/env bash
# Issue 6's comparison in one go: the transformers InternVL reference and our trainer, back to back
# on the same device with the same flags, then a short table (speedup = ours / HF tokens/s).
#
#   bash benchmarks/compare.sh                                   # SAIL-VL-2B shape, 4096 tokens, 4 tiles
#   RECIPE=tiny STEPS=5 bash benchmarks/compare.sh               # CPU smoke run
#   WHEELS=/path/to/wheels bash benchmarks/compare.sh            # first install carried wheels offline
#   EXTRA="--micro-batch-size 2" OURS_EXTRA="--fp8-format hybrid" bash benchmarks/compare.sh
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
RECIPE="${RECIPE:-sail_2b}" STEPS="${STEPS:-20}" OUT="${OUT:-runs/benchmark}"
ARGS=(--recipe "${RECIPE}" --steps "${STEPS}" ${EXTRA:-})
[ "${RECIPE}" = tiny ] || ARGS+=(--seq-length "${SEQ_LENGTH:-4096}" --tiles-per-row "${TILES:-4}")
mkdir -p "${OUT}"
"$PY" benchmarks/hf_reference.py "${ARGS[@]}" --json "${OUT}/hf.json"
"$PY" tools/benchmark.py "${ARGS[@]}" ${OURS_EXTRA:-} --json "${OUT}/ours.json"
"$PY" - "${OUT}/hf.json" "${OUT}/ours.json" <<'PYEOF'
import json, sys
hf, ours = (json.load(open(p)) for p in sys.argv[1:3])
print(f"\n{hf['device']} | {hf['recipe']} | seq {hf['seq_length']} | {hf['tiles_per_row']} tiles/row | mbs {hf['micro_batch_size']}")
print(f"{'':24}{'tokens/s':>12}{'TFLOP/s':>10}{'MFU':>8}{'peak GiB':>10}{'step s':>9}")
for name, r in (("transformers InternVL", hf), ("megatron_sail", ours)):
    mfu = f"{r['mfu']:.3f}" if r["mfu"] is not None else "n/a"
    print(f"{name:24}{r['tokens_per_s']:>12.1f}{r['tflops_per_gpu']:>10.2f}{mfu:>8}"
          f"{r['peak_memory_gib']:>10.2f}{r['step_time_s']:>9.4f}")
print(f"speedup (tokens/s): {ours['tokens_per_s'] / hf['tokens_per_s']:.2f}x (goal >= 1.5x at no more peak memory)")
PYEOF
