#!/usr/bin/env bash
# Every GPU check of the project in one run, with one JSON and one markdown report.
#
#   bash scripts/gpu_check.sh [--out DIR] [--wheels DIR] [--budget SECONDS] [--quick]
#
# On a single-GPU machine (H100/H200, bare or in our Docker image) it runs, in this order and
# within --budget seconds (default 510, under 9 minutes with the start-up):
#   gpu_tests      pytest tests/gpu (TE spec, local-spec checkpoint into TE, bf16/FP8 trainer,
#                  bf16 Qwen3-MoE trainer with TE grouped experts, async save, DALI GPU)
#   logits_bf16    a tiny transformers InternVL, converted, against our model in bf16 (logits)
#   trainer_bf16   the trainer on the demo data, --bf16 (TE spec when TE imports)
#   trainer_fp8    the same with --fp8-format hybrid (needs TE and an FP8 GPU)
#   dali_gpu       the DALI GPU image backend against PIL (tile differences) and both speeds
#   decode_speed   tools/bench_generate.py on the GPU: decode tokens/s of ours vs transformers,
#                  tiny model, batch 1 and 8, fp32, same greedy tokens required (issue 23)
#   compare_hf     benchmarks/compare.sh: ours vs transformers' InternVL, SAIL-VL-2B shape, bf16
#   fp8_speed      tools/benchmark.py, same shape, FP8 (needs TE and an FP8 GPU)
# A check whose needs are missing (no CUDA, no TE, no DALI, no megatron-core, budget spent) is
# reported as skipped with the reason; on a CPU machine every check is skipped and the script
# still writes both reports. Output: DIR/report.json, DIR/report.md, DIR/logs/<check>.log
# (default DIR: runs/gpu_check). Exit status 1 when a check failed or timed out.
#
# --wheels DIR installs the wheels in DIR first (offline, --no-deps, into DIR's own target
# folder put first on PYTHONPATH): how to prepare them within a 64 MiB transfer is in
# docs/performance.md ("GPU check"). --quick runs fewer steps (a smoke run of the script).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

OUT=runs/gpu_check WHEELS="${WHEELS:-}" BUDGET=510 QUICK=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --wheels) WHEELS="$2"; shift 2 ;;
    --budget) BUDGET="$2"; shift 2 ;;
    --quick) QUICK=1; shift ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
fi
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
WORK="$OUT/work" LOGS="$OUT/logs"
rm -rf "$LOGS" "$OUT/checks.jsonl" "$OUT/report.json" "$OUT/report.md"
mkdir -p "$WORK" "$LOGS"
START=$(date +%s)
DEADLINE=$((START + BUDGET))
if [ "$QUICK" = 1 ]; then ITERS=6 STEPS=3 SECS=2; else ITERS=20 STEPS=20 SECS=5; fi
export PY ROOT WORK ITERS STEPS SECS PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

if [ -n "$WHEELS" ]; then
  echo "[gpu_check] installing the wheels of $WHEELS into $WORK/site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$WORK/site" "$WHEELS"/*.whl > "$LOGS/wheels.log" 2>&1 \
    || { echo "[gpu_check] wheel install failed (see $LOGS/wheels.log)"; cat "$LOGS/wheels.log"; }
  export PYTHONPATH="$WORK/site:$PYTHONPATH"
fi

echo "[gpu_check] probing the machine ($PY)"
if ! "$PY" tools/gpu_check.py probe --out "$OUT" > "$LOGS/probe.log" 2>&1; then
  cat "$LOGS/probe.log"; echo "[gpu_check] the probe failed: no report"; exit 1
fi

# ------------------------------------------------------------------ the checks
check_gpu_tests() {
  "$PY" -m pytest -q -rs -p no:cacheprovider tests/gpu --junitxml "$WORK/gpu_tests.xml"
}

check_logits_bf16() {
  rm -rf "$WORK/tiny_hf" "$WORK/tiny_mc"
  "$PY" tools/make_tiny_hf_checkpoint.py --out "$WORK/tiny_hf" --layout hf
  "$PY" tools/convert_checkpoint.py hf-to-mcore --hf-dir "$WORK/tiny_hf" --out "$WORK/tiny_mc"
  "$PY" tools/compare_logits.py --hf-dir "$WORK/tiny_hf" --mcore-dir "$WORK/tiny_mc" --dtype bfloat16
}

demo_data() {  # the tiny recipe's demo set (32 px tiles, 4 tokens per tile, 256-token rows)
  [ -f "$WORK/demo/ready" ] && return 0
  rm -rf "$WORK/demo"
  "$PY" tools/make_demo_data.py --out "$WORK/demo/raw" --samples 200
  "$PY" tools/preprocess_data.py --input "$WORK/demo/raw/train.jsonl" \
    --tokenizer "$WORK/demo/raw/tokenizer.json" --output-prefix "$WORK/demo/train" \
    --seq-length 256 --tile-size 32 --tokens-per-tile 4 --max-tiles 4
  touch "$WORK/demo/ready"
}

train_tiny() {  # train_tiny TAG [extra flags]
  local tag=$1; shift
  demo_data
  rm -rf "$WORK/train_$tag"
  "$PY" -m megatron_sail.train --recipe tiny --stage sft-knowledge --data-path "$WORK/demo/train" \
    --train-iters "$ITERS" --lr-decay-iters "$ITERS" --global-batch-size 4 --micro-batch-size 2 \
    --seq-length 256 --log-interval 5 --eval-interval 0 --seed 7 --run-dir "$WORK/train_$tag" \
    --bf16 "$@"
}
check_trainer_bf16() { train_tiny bf16; }
check_trainer_fp8() { train_tiny fp8 --fp8-format hybrid; }

check_dali_gpu() {
  "$PY" tools/bench_images.py --images "$WORK/photos" --backend pil --threads 2 --seconds "$SECS" \
    --generate 30 | sed 's/^/[pil] /'
  "$PY" tools/bench_images.py --images "$WORK/photos" --backend dali --threads 2 --seconds "$SECS" \
    | sed 's/^/[dali] /'
  "$PY" tools/gpu_check.py dali-parity --images "$WORK/photos" | sed 's/^/[parity] /'
}

# point=NAME lines become [NAME] lines, so the report keeps each point's ours / peer / ratio
check_decode_speed() {
  "$PY" tools/bench_generate.py --work "$WORK/bench_generate" --points decode_tiny_b1 decode_tiny_b8 \
    --repeats 1 --inner 3 | sed -E 's/^point=([A-Za-z0-9_-]+) /[\1] /'
}
check_compare_hf() { OUT="$WORK/benchmark" STEPS="$STEPS" bash benchmarks/compare.sh; }

check_fp8_speed() {
  mkdir -p "$WORK/benchmark"
  "$PY" tools/benchmark.py --recipe sail_2b --seq-length 4096 --tiles-per-row 4 --steps "$STEPS" \
    --fp8-format hybrid --json "$WORK/benchmark/fp8.json"
}

# run_check NAME "NEEDS" LIMIT_S PARSER "FILES": run check_NAME under a time limit and record it.
run_check() {
  local name=$1 needs=$2 limit=$3 parse=$4 files=$5 reason left t0 rc status
  reason="$("$PY" tools/gpu_check.py need --out "$OUT" $needs)"
  left=$((DEADLINE - $(date +%s)))
  if [ -z "$reason" ] && [ "$left" -lt 30 ]; then
    reason="the script's time budget (--budget ${BUDGET}s) is spent"
  fi
  if [ -n "$reason" ]; then
    "$PY" tools/gpu_check.py record --out "$OUT" --name "$name" --status skipped --reason "$reason"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "[gpu_check] $name: running (at most ${limit} s; log $LOGS/$name.log)"
  t0=$(date +%s)
  timeout --kill-after=15 "$limit" bash -c "set -euo pipefail; $(declare -f); check_$name" \
    > "$LOGS/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=passed reason="" ;;
    124|137) status=timed_out reason="stopped after ${limit} s" ;;
    *) status=failed reason="exit status $rc; last lines: $(tail -n 3 "$LOGS/$name.log" | tr '\n|' '  ' | cut -c1-300)" ;;
  esac
  # shellcheck disable=SC2086
  "$PY" tools/gpu_check.py record --out "$OUT" --name "$name" --status "$status" \
    --reason "$reason" --seconds $(( $(date +%s) - t0 )) --log "$LOGS/$name.log" \
    --parse "$parse" --files $files
}

run_check gpu_tests    "megatron cuda"          240 junit     "$WORK/gpu_tests.xml"
run_check logits_bf16  "megatron cuda internvl" 90  kv        ""
run_check trainer_bf16 "megatron cuda"          120 metrics   "$WORK/train_bf16/metrics.jsonl"
run_check trainer_fp8  "megatron cuda fp8"      120 metrics   "$WORK/train_fp8/metrics.jsonl"
run_check dali_gpu     "megatron cuda dali"     90  kv        ""
run_check decode_speed "megatron cuda internvl" 120 kv        ""
run_check compare_hf   "megatron cuda internvl" 240 benchmark "$WORK/benchmark/hf.json $WORK/benchmark/ours.json"
run_check fp8_speed    "megatron cuda fp8"      120 benchmark "$WORK/benchmark/fp8.json"

"$PY" tools/gpu_check.py report --out "$OUT" \
  --command "bash scripts/gpu_check.sh --out $OUT --budget $BUDGET$([ "$QUICK" = 1 ] && echo ' --quick')$([ -n "$WHEELS" ] && echo " --wheels $WHEELS")"
rc=$?
echo "[gpu_check] done in $(( $(date +%s) - START )) s"
exit $rc
