#!/usr/bin/env bash
# Quickstart: from a fresh checkout to a trained tiny SAIL-VL-shaped model, in about 11 minutes on
# a 2-core CPU (1,000 steps; README; a GPU is used when present):
#   1. install the pinned environment into .venv (scripts/setup.sh)
#   2. generate the demo set (synthetic images + conversations + held-out split + tokenizer)
#   3. preprocess it into packed, tiled indexed datasets (train and held-out)
#   4. train the `tiny` recipe with a progress bar, saving a checkpoint at the end; the demo
#      benchmarks are scored during training at geometrically spaced steps and recorded in
#      metrics.jsonl, so `tools/scaling_law.py OUT` fits score against tokens from this run
#   5. evaluate the saved checkpoint on the held-out split
#   6. answer the demo benchmarks (yes/no, multiple choice, word reading) on held-out images and
#      print the scores next to guessing (examples/demo_benchmarks.sh)
#   7. check that the loss clearly dropped and every benchmark beat chance; print where the
#      TensorBoard logs are
#
#   bash examples/quickstart.sh                 # defaults below; override by environment:
#   SAMPLES=4000 ITERS=1000 OUT=runs/quickstart DEMO=demo bash examples/quickstart.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

SAMPLES="${SAMPLES:-4000}"        # demo conversations (plus 10% held out)
ITERS="${ITERS:-1000}"            # optimizer steps (tiny recipe: 8 rows of 256 tokens each)
DEMO="${DEMO:-demo}"              # demo data directory
OUT="${OUT:-runs/quickstart}"     # run directory: config, metrics.jsonl, tensorboard, checkpoints
SEQ=256                           # the tiny recipe's row length
GEOMETRY=(--recipe tiny --max-tiles 4)   # the tiny ViT's geometry: 32 px tiles, 4 tokens each
START=$(date +%s)
step() { echo; echo "== [$(( $(date +%s) - START ))s] $*"; }

step "1/7 environment (.venv)"
bash scripts/setup.sh
PY=.venv/bin/python
$PY -c "import torch; print('device:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU')"

step "2/7 demo data -> ${DEMO}/"
$PY tools/make_demo_data.py --out "${DEMO}" --samples "${SAMPLES}" --seed 1234 --overwrite
$PY tools/make_demo_benchmark.py --out "${DEMO}/bench" > /dev/null   # held-out benchmark sets

step "3/7 preprocess: tokenize, tile, pack into ${SEQ}-token rows"
$PY tools/preprocess_data.py --input "${DEMO}/train.jsonl" --tokenizer "${DEMO}/tokenizer.json" \
  --output-prefix "${DEMO}/packed/train" --seq-length "${SEQ}" "${GEOMETRY[@]}"
$PY tools/preprocess_data.py --input "${DEMO}/val.jsonl" --tokenizer "${DEMO}/tokenizer.json" \
  --output-prefix "${DEMO}/packed/valid" --seq-length "${SEQ}" "${GEOMETRY[@]}"

step "4/7 train the tiny recipe for ${ITERS} steps -> ${OUT}/"
rm -rf "${OUT}"
TRAIN=(--recipe tiny --stage sft-knowledge --seq-length "${SEQ}"
       --data-path "${DEMO}/packed/train" --valid-data-path "${DEMO}/packed/valid" --eval-iters 8)
# benchmark scores (benchmarks/NAME + consumed_tokens in metrics.jsonl) at 1/16, 1/8, 1/4, 1/2
# of the steps and at the end: a few seconds each on the tiny model
BENCH=(--eval-benchmark pope="${DEMO}/bench/demo_pope.tsv" --eval-benchmark mcq="${DEMO}/bench/demo_mcq.tsv"
       --eval-benchmark ocrbench="${DEMO}/bench/demo_ocr.tsv"
       --eval-benchmark-at $(( ITERS / 16 > 0 ? ITERS / 16 : 1 )) $(( ITERS / 8 > 0 ? ITERS / 8 : 1 )) \
                           $(( ITERS / 4 > 0 ? ITERS / 4 : 1 )) $(( ITERS / 2 > 0 ? ITERS / 2 : 1 )))
$PY -m megatron_sail.train "${TRAIN[@]}" --train-iters "${ITERS}" --eval-interval 100 \
  --log-interval 50 --run-dir "${OUT}" --save "${OUT}/checkpoints" --progress-bar "${BENCH[@]}"

step "5/7 evaluate the saved checkpoint on the held-out split"
# The saved weights (--init-from) with --train-iters 0: no step, no save, then the final
# validation pass over the held-out rows. (--load at the checkpoint's own step now stops with
# "nothing to train" before validating.)
$PY -m megatron_sail.train "${TRAIN[@]}" --train-iters 0 --eval-interval 0 \
  --init-from "${OUT}/checkpoints" --run-dir "${OUT}/eval"

step "6/7 demo benchmarks on held-out images (greedy answers, scored as VLMEvalKit does)"
BENCH_RC=0
PYTHON=$PY bash examples/demo_benchmarks.sh "${OUT}/checkpoints" "${OUT}/benchmarks" || BENCH_RC=$?

step "7/7 summary"
$PY - "${OUT}" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
train = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
train = [r for r in train if "lm_loss" in r]  # step records (benchmark records have none)
losses = [r["lm_loss"] for r in train if r["lm_loss"] is not None]
first, last = sum(losses[:20]) / len(losses[:20]), sum(losses[-20:]) / len(losses[-20:])
valid = [json.loads(l) for l in (out / "valid_metrics.jsonl").read_text().splitlines()]
final = json.loads((out / "eval" / "valid_metrics.jsonl").read_text().splitlines()[-1])
tok_s = sum(r["tokens_per_s"] for r in train[-20:]) / len(train[-20:])
print(f"train loss: first 20 steps {first:.3f} -> last 20 steps {last:.3f} ({len(train)} steps, {tok_s:.0f} tokens/s)")
print("held-out loss during training: " + ", ".join(f"step {v['iteration']}: {v['lm_loss']:.3f}" for v in valid))
print(f"held-out loss of the saved checkpoint: {final['lm_loss']:.3f}")
if not last < 0.6 * first:
    sys.exit(f"FAILED: the training loss did not clearly drop ({first:.3f} -> {last:.3f})")
print("OK: the loss clearly dropped")
EOF
if [ "${BENCH_RC}" -ne 0 ]; then
  echo "FAILED: a demo benchmark score is not clearly above guessing (see step 6)"
  exit 1
fi
echo "OK: every demo benchmark score is clearly above guessing"
echo "checkpoint:  ${OUT}/checkpoints"
echo "metrics:     ${OUT}/metrics.jsonl"
echo "benchmarks:  ${OUT}/benchmarks (results.json, *_predictions.tsv)"
$PY tools/scaling_law.py "${OUT}" --out "${OUT}/scaling" | tail -n 2 || true
echo "scaling:     ${OUT}/scaling (tools/scaling_law.py ${OUT}: score = a + b ln(tokens) from the in-training scores)"
echo "TensorBoard: ${OUT}/tensorboard   (view: .venv/bin/tensorboard --logdir ${OUT}/tensorboard)"
echo "done in $(( $(date +%s) - START ))s"
