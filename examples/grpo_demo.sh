#!/usr/bin/env bash
# Post-training demo on the CPU (docs/post_training.md): from deliberately under-trained SFT
# checkpoints of the tiny recipe on the demo data,
#   1. demo data (reused when present); SFT for SFT_ITERS steps (checkpoint A: still answers
#      every yes/no question "no"), then SFT_MORE steps from A of a schedule planned for four
#      times as many (checkpoint B: yes/no learned, multiple choice far from what SFT reaches)
#   2. held-out demo benchmarks (background no training image uses) + post-training demo data:
#      verifiable prompts (MCQ on colour / shape / count, yes/no, counts) and DPO pairs
#      (correct vs hallucinated answer)
#   3. scores of A and B (MCQ accuracy, POPE-style F1)
#   4. GRPO from B on the verifiable MCQ prompts (reward: accuracy) -> held-out MCQ accuracy
#   5. DPO (MPO loss: DPO + BCO + LM) from A on the pairs -> held-out POPE-style F1
#   6. reward_curve.png, a summary, and the last line
#      reward_start=X reward_end=Y score_start=A score_end=B
#      (GRPO's mean reward over its first / last steps; held-out MCQ accuracy before / after).
#      The full run fails unless score_end is above the 95% interval of score_start.
#
#   bash examples/grpo_demo.sh           # full: at most 15 minutes on 2 cores
#   SMOKE=1 bash examples/grpo_demo.sh   # about 3 minutes; same outputs, no pass/fail
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY="${PYTHON:-.venv/bin/python}"
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
SMOKE="${SMOKE:-0}"
OUT="${OUT:-runs/grpo_demo}"
DEMO="${DEMO:-demo}"                  # the quickstart's demo data directory (made when absent)
SEQ=256
if [ "${SMOKE}" = 1 ]; then
  SFT_ITERS="${SFT_ITERS:-60}" SFT_MORE="${SFT_MORE:-20}" GRPO_ITERS="${GRPO_ITERS:-8}"
  DPO_ITERS="${DPO_ITERS:-8}" ITEMS="${ITEMS:-40}" PROMPTS="${PROMPTS:-64}" PAIRS="${PAIRS:-64}"
else
  SFT_ITERS="${SFT_ITERS:-300}" SFT_MORE="${SFT_MORE:-100}" GRPO_ITERS="${GRPO_ITERS:-150}"
  DPO_ITERS="${DPO_ITERS:-60}" ITEMS="${ITEMS:-200}" PROMPTS="${PROMPTS:-400}" PAIRS="${PAIRS:-400}"
fi
START=$(date +%s)
step() { echo; echo "== [$(( $(date +%s) - START ))s] $*"; }
mkdir -p "${OUT}"

step "1/6 demo data (${DEMO}/) and under-trained SFT checkpoints (${SFT_ITERS} + ${SFT_MORE} steps)"
if [ ! -f "${DEMO}/packed/train.meta.json" ]; then
  $PY tools/make_demo_data.py --out "${DEMO}" --samples 4000 --seed 1234 > /dev/null
  $PY tools/preprocess_data.py --input "${DEMO}/train.jsonl" --tokenizer "${DEMO}/tokenizer.json" \
    --output-prefix "${DEMO}/packed/train" --seq-length "${SEQ}" --recipe tiny --max-tiles 4 > /dev/null
fi
SFT=(--recipe tiny --stage sft-knowledge --seq-length "${SEQ}" --data-path "${DEMO}/packed/train"
     --eval-interval 0 --log-interval 50)
if [ ! -e "${OUT}/sft_a/checkpoints/latest" ]; then
  $PY -m megatron_sail.train "${SFT[@]}" --train-iters "${SFT_ITERS}" --run-dir "${OUT}/sft_a" \
    --save "${OUT}/sft_a/checkpoints" --overwrite-save
fi
if [ ! -e "${OUT}/sft_b/checkpoints/latest" ]; then
  $PY -m megatron_sail.train "${SFT[@]}" --train-iters "${SFT_MORE}" --seed 99 \
    --lr-decay-iters $((4 * SFT_MORE)) --lr-warmup-iters $((12 * SFT_MORE / 100)) --init-from "${OUT}/sft_a/checkpoints" --run-dir "${OUT}/sft_b" \
    --save "${OUT}/sft_b/checkpoints" --overwrite-save
fi

step "2/6 held-out benchmarks (${ITEMS} items) and post-training demo data"
$PY tools/make_demo_benchmark.py --out "${OUT}/bench" --items "${ITEMS}" > /dev/null
$PY tools/make_posttrain_demo.py --out "${OUT}/post" --prompts "${PROMPTS}" --pairs "${PAIRS}" > /dev/null
grep '"choices"' "${OUT}/post/grpo.jsonl" > "${OUT}/post/grpo_mcq.jsonl"

evaluate() {  # evaluate CKPT DIR BENCH...: greedy answers, scored as VLMEvalKit does
  local ckpt="$1" dir="$2"
  shift 2
  local args=()
  for b in "$@"; do args+=("${b}=${OUT}/bench/demo_${b}.tsv"); done
  $PY tools/evaluate.py --checkpoint "${ckpt}" --benchmark "${args[@]}" \
    --out "${OUT}/${dir}/results.json" | grep '^benchmark='
}

step "3/6 scores of the SFT checkpoints A and B"
evaluate "${OUT}/sft_a/checkpoints" eval_sft_a pope
evaluate "${OUT}/sft_b/checkpoints" eval_sft_b mcq

step "4/6 GRPO from B on the verifiable MCQ prompts (${GRPO_ITERS} steps, 8 prompts x 8 samples)"
rm -rf "${OUT}/grpo"
$PY -m megatron_sail.train --stage grpo --init-from "${OUT}/sft_b/checkpoints" \
  --data-path "${OUT}/post/grpo_mcq.jsonl" --seq-length "${SEQ}" --train-iters "${GRPO_ITERS}" \
  --global-batch-size 64 --micro-batch-size 4 --num-generations 8 --max-new-tokens 8 \
  --temperature 1.0 --lr 1e-4 --reward accuracy --log-interval 25 \
  --run-dir "${OUT}/grpo" --save "${OUT}/grpo/checkpoints"
evaluate "${OUT}/grpo/checkpoints" eval_grpo mcq

step "5/6 DPO (MPO loss) from A on correct vs hallucinated pairs (${DPO_ITERS} steps)"
rm -rf "${OUT}/dpo"
$PY -m megatron_sail.train --stage dpo --init-from "${OUT}/sft_a/checkpoints" \
  --data-path "${OUT}/post/pairs.jsonl" --seq-length "${SEQ}" --train-iters "${DPO_ITERS}" \
  --global-batch-size 8 --micro-batch-size 4 --pref-loss mpo --dpo-beta 0.1 --lr 5e-4 \
  --log-interval 20 --run-dir "${OUT}/dpo" --save "${OUT}/dpo/checkpoints"
evaluate "${OUT}/dpo/checkpoints" eval_dpo pope

step "6/6 summary"
$PY - "${OUT}" "${SMOKE}" <<'EOF'
import json, math, sys
from pathlib import Path

out, smoke = Path(sys.argv[1]), sys.argv[2] == "1"
score = lambda d, b: json.loads((out / d / "results.json").read_text())["benchmarks"][b]["score"]  # noqa: E731
recs = [json.loads(l) for l in (out / "grpo" / "metrics.jsonl").read_text().splitlines()]
rewards = [r["extra"]["grpo/reward_mean"] for r in recs if "extra" in r]
k = max(1, len(rewards) // 5)
r0, r1 = sum(rewards[:k]) / k, sum(rewards[-k:]) / k
items = sum(1 for _ in open(out / "bench" / "demo_mcq.tsv")) - 1
a, b = score("eval_sft_b", "mcq"), score("eval_grpo", "mcq")
p = a / 100
half = 100 * 1.96 * math.sqrt(max(p * (1 - p), 1e-9) / items)  # 95% interval of the start
f0, f1 = score("eval_sft_a", "pope"), score("eval_dpo", "pope")
try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(rewards) + 1), rewards, lw=1, label="mean reward per step")
    w = max(1, len(rewards) // 10)
    smooth = [sum(rewards[max(0, i - w + 1):i + 1]) / len(rewards[max(0, i - w + 1):i + 1])
              for i in range(len(rewards))]
    ax.plot(range(1, len(rewards) + 1), smooth, lw=2, label=f"moving mean ({w} steps)")
    ax.set_xlabel("GRPO step"); ax.set_ylabel("accuracy reward"); ax.legend(); fig.tight_layout()
    fig.savefig(out / "reward_curve.png", dpi=100)
    print(f"reward curve: {out / 'reward_curve.png'}")
except ImportError:
    print("matplotlib missing: no reward_curve.png")
print(f"GRPO: held-out MCQ accuracy {a:.1f} -> {b:.1f} (95% interval of the start: "
      f"{a - half:.1f}..{a + half:.1f}, {items} items)")
print(f"MPO:  held-out POPE-style F1 {f0:.1f} -> {f1:.1f}")
print(f"reward_start={r0:.3f} reward_end={r1:.3f} score_start={a:.1f} score_end={b:.1f}")
if not smoke and not (b > a + half and f1 > f0):
    sys.exit("FAILED: GRPO did not lift MCQ accuracy beyond the start's interval or DPO did not "
             "raise POPE F1")
EOF
