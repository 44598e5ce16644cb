#!/usr/bin/env bash
# The quickstart's benchmark step (docs/evaluation.md): write the demo benchmarks (POPE-style
# yes/no, colour/shape/count multiple choice, word reading) on images the demo training set never
# shows, answer them with the checkpoint, and print each score next to its guessing
# baseline (the better of random guessing and the best constant answer).
# Exits 1 unless every score is clearly above chance.
#
#   bash examples/demo_benchmarks.sh CHECKPOINT OUT_DIR [ITEMS]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
CKPT="$1"
OUT="$2"
ITEMS="${3:-100}"
PY="${PYTHON:-.venv/bin/python}"
$PY tools/make_demo_benchmark.py --out "${OUT}" --items "${ITEMS}" > /dev/null
$PY tools/evaluate.py --checkpoint "${CKPT}" --out "${OUT}/results.json" \
  --benchmark pope="${OUT}/demo_pope.tsv" mcq="${OUT}/demo_mcq.tsv" ocrbench="${OUT}/demo_ocr.tsv" \
  --baseline "${OUT}/chance.json"
