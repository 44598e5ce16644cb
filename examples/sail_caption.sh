#!/usr/bin/env bash
# The SAIL-Caption recipe end to end (docs/curation.md): a reference subset with captions from a
# stronger source -> preprocess -> fine-tune a captioner from a base checkpoint (SFT stage) ->
# recaption an unlabeled pool with it (tools/recaption.py --backend megatron) -> deduplicate
# (tools/dedup.py signatures + group; near-dedup for photos) -> filter (tools/filter_data.py, the judge
# too when JUDGE_MODEL is set) -> preprocess -> pretrain-alignment on the result. Then the
# comparison that justifies the work: the same alignment on the pool's original (noisy or empty)
# text, both models captioning held-out images, scored by word F1 against the exact captions
# (tools/evaluate.py, benchmark `caption`).
#
# Demo (default): the demo generator provides everything: the reference subset is its training
# images with their exact captions, the pool is other demo images whose text is empty, alt-text
# boilerplate or another image's caption (tools/make_demo_data.py --pool), and the base
# checkpoint is the tiny recipe trained on the demo's question/answer conversations without any
# caption request, so captioning is learnt only from the caption data under comparison.
# Runs on a CPU in minutes:
#   bash examples/sail_caption.sh
#   SMOKE=1 bash examples/sail_caption.sh        # every stage with a few samples and steps (tests)
#
# Real recipe: give the data, the base checkpoint and the recipe by environment, e.g.
#   RECIPE=sail_2b BASE=ckpt/sail_2b_base TOKENIZER=ckpt/sail_2b_base/tokenizer \
#   REF_CAPTIONS=ref/captions.jsonl REF_IMAGE_ROOT=ref/ POOL_INPUT='pool/*.tar' \
#   GEOMETRY="--recipe sail_2b --max-tiles 12" SEQ=16384 \
#   TRAIN_LAUNCH="torchrun --nproc_per_node 8" BACKEND=vllm CAPTIONER_MODEL=exports/captioner \
#   RECAPTION_FLAGS="--executor ray --workers 64 --gpus-per-worker 1" \
#   ITERS_SFT=5000 ITERS_ALIGN=20000 ALIGN_FLAGS= COMPARE=0 \
#   JUDGE_MODEL=exports/judge JUDGE_BACKEND=vllm FILTER_FLAGS="--executor ray --workers 64 --gpus-per-worker 1" \
#   bash examples/sail_caption.sh
# (CAPTIONER_MODEL: an HF export of the captioner for the hf/vllm backends; default: the
# captioner's training checkpoint with the megatron backend.)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-.venv/bin/python}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"

SMOKE="${SMOKE:-0}"
if [ "${SMOKE}" = 1 ]; then D_REF=60 D_POOL=24 D_ITERS=2 D_ITEMS=6; else D_REF=2000 D_POOL=600 D_ITERS=0 D_ITEMS=100; fi
OUT="${OUT:-runs/sail_caption}"
RECIPE="${RECIPE:-tiny}"
SEQ="${SEQ:-256}"
GEOMETRY=(${GEOMETRY:---recipe ${RECIPE} --max-tiles 4})   # tile and tokens per tile: the recipe's ViT
REF="${REF:-${D_REF}}"                  # demo: reference images (conversations; ~88% have a caption)
POOL="${POOL:-${D_POOL}}"               # demo: unlabeled pool images
ITERS_BASE="${ITERS_BASE:-$([ "${D_ITERS}" = 0 ] && echo 400 || echo "${D_ITERS}")}"
ITERS_SFT="${ITERS_SFT:-$([ "${D_ITERS}" = 0 ] && echo 800 || echo 60)}"   # smoke: enough for well-formed captions
ITERS_ALIGN="${ITERS_ALIGN:-$([ "${D_ITERS}" = 0 ] && echo 250 || echo "${D_ITERS}")}"
CAPTION_ITEMS="${CAPTION_ITEMS:-${D_ITEMS}}"
# The tiny base never learnt the caption format and pretrain-alignment trains the projector
# only, so the demo also trains the language model in that stage (same for both arms of the
# comparison); the real recipe keeps the stage's modules (ALIGN_FLAGS=).
ALIGN_FLAGS=(${ALIGN_FLAGS---train-language true})
BACKEND="${BACKEND:-megatron}"
RECAPTION_FLAGS=(${RECAPTION_FLAGS:-})
TRAIN_LAUNCH=(${TRAIN_LAUNCH:-${PY}})
FILTERS="${FILTERS:-examples/sail_caption_filters.yaml}"
COMPARE="${COMPARE:-1}"                 # also train the baseline on the pool's original text
MIN_GAIN="${MIN_GAIN:-10}"              # word-F1 points the recaptioned model must win by (not in SMOKE)
# TRAIN_LAUNCH_ABLATION: launcher of the comparison's training runs, e.g. "torchrun --nproc_per_node 8"
START=$(date +%s)
step() { echo; echo "== [$(( $(date +%s) - START ))s] $*"; }
train() { "${TRAIN_LAUNCH[@]}" -m megatron_sail.train --recipe "${RECIPE}" --seq-length "${SEQ}" "$@"; }
# train_arm DIR FLAGS...: a finished arm (DIR/done) is kept, so a rerun resumes after the last one
train_arm() {
  local dir="$1"; shift
  if [ -f "${dir}/done" ]; then echo "(kept: ${dir})"; return; fi
  rm -rf "${dir}"
  train "$@" --eval-interval 0 --log-interval 100 --run-dir "${dir}" --save "${dir}/checkpoints"
  touch "${dir}/done"
}
prep() { "$PY" tools/preprocess_data.py --tokenizer "${TOKENIZER}" --seq-length "${SEQ}" "${GEOMETRY[@]}" "$@"; }
mkdir -p "${OUT}"

step "1/8 reference subset, unlabeled pool, held-out caption benchmark"
if [ -z "${REF_CAPTIONS:-}" ]; then
  "$PY" tools/make_demo_data.py --out "${OUT}/demo" --samples "${REF}" --pool "${POOL}" --seed 1234 --overwrite > "${OUT}/demo.json"
  REF_CAPTIONS="${OUT}/demo/train_captions.jsonl" REF_IMAGE_ROOT="${OUT}/demo"
  POOL_INPUT="${OUT}/demo/pool.jsonl" POOL_IMAGE_ROOT="${OUT}/demo"
  TOKENIZER="${TOKENIZER:-${OUT}/demo/tokenizer.json}"
  "$PY" tools/make_demo_benchmark.py --out "${OUT}/bench" --items 2 --caption-items "${CAPTION_ITEMS}" > /dev/null
  CAPTION_BENCH="${CAPTION_BENCH:-${OUT}/bench/demo_caption.tsv}"
fi
: "${TOKENIZER:?set TOKENIZER}" "${POOL_INPUT:?set POOL_INPUT}"
POOL_ROOT=(); [ -n "${POOL_IMAGE_ROOT:-}" ] && POOL_ROOT=(--image-root "${POOL_IMAGE_ROOT}")
REF_ROOT=(); [ -n "${REF_IMAGE_ROOT:-}" ] && REF_ROOT=(--image-root "${REF_IMAGE_ROOT}")

step "2/8 base checkpoint"
if [ -z "${BASE:-}" ]; then
  # demo: question/answer conversations only (caption requests dropped)
  "$PY" - "${OUT}/demo/train.jsonl" "${OUT}/demo/base_train.jsonl" <<'EOF'
import json, sys
from megatron_sail.config.data import DEFAULT_CAPTION_PROMPTS
kept = 0
with open(sys.argv[1]) as src, open(sys.argv[2], "w") as dst:
    for line in src:
        first = json.loads(line)["conversations"][0]["value"].replace("<image>\n", "")
        if first not in DEFAULT_CAPTION_PROMPTS:
            dst.write(line)
            kept += 1
print(f"base data: {kept} conversations without a caption request")
EOF
  prep --input "${OUT}/demo/base_train.jsonl" --output-prefix "${OUT}/packed/base" > /dev/null
  train_arm "${OUT}/base" --stage sft-knowledge --data-path "${OUT}/packed/base" --train-iters "${ITERS_BASE}"
  BASE="${OUT}/base/checkpoints"
fi

step "3/8 preprocess the reference subset"
prep --input "${REF_CAPTIONS}" "${REF_ROOT[@]}" --output-prefix "${OUT}/packed/reference" > /dev/null

step "4/8 fine-tune the captioner from ${BASE} (SFT)"
train_arm "${OUT}/captioner" --stage sft-knowledge --init-from "${BASE}" \
  --data-path "${OUT}/packed/reference" --train-iters "${ITERS_SFT}"

step "5/8 recaption the pool (${BACKEND})"
printf '%s\n' "Describe the image." > "${OUT}/caption_prompt.txt"
PROMPT=(--prompt-file "${PROMPT_FILE:-${OUT}/caption_prompt.txt}")
"$PY" tools/recaption.py --input "${POOL_INPUT}" "${POOL_ROOT[@]}" --output-dir "${OUT}/recaptioned" \
  --model "${CAPTIONER_MODEL:-${OUT}/captioner/checkpoints}" --backend "${BACKEND}" "${PROMPT[@]}" \
  --max-new-tokens "${MAX_NEW_TOKENS:-32}" --batch-size "${BATCH:-16}" --samples-per-shard "${SHARD:-400}" \
  --no-progress "${RECAPTION_FLAGS[@]}" > "${OUT}/recaption_summary.json"   # its one-line summary: stderr

step "6/8 deduplicate (signatures, groups) and filter$([ -n "${JUDGE_MODEL:-}" ] && echo ", judge")"
# Three passes, each sharded and resumable on a cluster (docs/curation.md): signatures per shard,
# grouping into keep-lists, then the filters with the keep-lists applied; the judge (SAIL-Caption2's
# VIR/ITA) runs last when JUDGE_MODEL names a judge model (the demo has none: its tiny captioner
# cannot rate captions).
CONFIG="${FILTERS}"
if [ -n "${JUDGE_MODEL:-}" ]; then
  CONFIG="${OUT}/filters_with_judge.yaml"
  "$PY" - "${FILTERS}" "${CONFIG}" "${JUDGE_BACKEND:-vllm}" "${JUDGE_MODEL}" <<'EOF'
import sys, yaml
raw = yaml.safe_load(open(sys.argv[1]))
raw["filters"].append({"judge": {"backend": sys.argv[3], "model": sys.argv[4], "min_vir": 3, "require_ita": True}})
yaml.safe_dump(raw, open(sys.argv[2], "w"), sort_keys=False)
EOF
fi
"$PY" tools/dedup.py signatures --input "${OUT}/recaptioned/*.tar" --output-dir "${OUT}/dedup/signatures" \
  --config "${CONFIG}" ${FILTER_FLAGS:-} > /dev/null
"$PY" tools/dedup.py group --signatures "${OUT}/dedup/signatures" --output-dir "${OUT}/dedup/keep" \
  --config "${CONFIG}" --input "${OUT}/recaptioned/*.tar" > "${OUT}/dedup/group.json"
"$PY" tools/filter_data.py --input "${OUT}/recaptioned/*.tar" --output-dir "${OUT}/clean" --config "${CONFIG}" \
  --keep-lists "${OUT}/dedup/keep" --quiet ${FILTER_FLAGS:-}
KEPT=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["kept"])' "${OUT}/clean/filter_report.json")
if [ "${KEPT}" = 0 ]; then
  echo "FAILED: no recaptioned sample passed the filters (see ${OUT}/recaptioned/*.rejects.jsonl and" \
       "${OUT}/clean/*.rejects.jsonl); train the captioner longer (ITERS_SFT)" >&2
  exit 3
fi

step "7/8 preprocess the filtered captions (and the pool's original text, for the comparison)"
prep --input "${OUT}/clean/*.tar" --output-prefix "${OUT}/packed/recaptioned" > "${OUT}/packed/recaptioned.json"
if [ "${COMPARE}" != 1 ] || [ -z "${CAPTION_BENCH:-}" ]; then
  step "8/8 pretrain-alignment on the result"
  train_arm "${OUT}/final" --stage pretrain-alignment --init-from "${BASE}" \
    --data-path "${OUT}/packed/recaptioned" --train-iters "${ITERS_ALIGN}" "${ALIGN_FLAGS[@]}"
  echo "final model: ${OUT}/final/checkpoints"; exit 0
fi
prep --input "${POOL_INPUT}" "${POOL_ROOT[@]}" --format caption --max-reject-rate 1.0 \
  --output-prefix "${OUT}/packed/original" > "${OUT}/packed/original.json"

step "8/8 pretrain-alignment on the result and, same budget, on the original text; caption held-out images"
# The data-quality loop (tools/data_ablation.py) trains both arms with the same seed, schedule
# and base, evaluates them on the caption benchmark and ranks them with a paired bootstrap.
GBS="${GBS:-$("$PY" -c 'import sys; from megatron_sail.config.recipes import get_recipe
print(get_recipe(sys.argv[1])("pretrain-alignment").train.global_batch_size)' "${RECIPE}")}"
LAUNCHER=(); [ -n "${TRAIN_LAUNCH_ABLATION:-}" ] && LAUNCHER=(--launcher "${TRAIN_LAUNCH_ABLATION}")
"$PY" tools/data_ablation.py --candidate recaptioned="${OUT}/packed/recaptioned" \
  --candidate original="${OUT}/packed/original" --tokens $(( ITERS_ALIGN * SEQ * GBS )) \
  --recipe "${RECIPE}" --stage pretrain-alignment --init-from "${BASE}" --seq-length "${SEQ}" \
  --global-batch-size "${GBS}" --benchmark caption="${CAPTION_BENCH}" --out "${OUT}/ablation" \
  "${LAUNCHER[@]}" -- "${ALIGN_FLAGS[@]}"
"$PY" - "${OUT}" "${MIN_GAIN}" "${SMOKE}" <<'EOF'
import json, sys
out, min_gain, smoke = sys.argv[1], float(sys.argv[2]), sys.argv[3] == "1"
rank = json.load(open(f"{out}/ablation/ranking.json"))
filt = json.load(open(f"{out}/clean/filter_report.json"))
recap = json.load(open(f"{out}/recaptioned/done_manifest.json"))
packed = {k: json.load(open(f"{out}/packed/{k}.json")) for k in ("recaptioned", "original")}
f1 = {c: rank["scores"][c]["caption"] for c in ("recaptioned", "original")}
first, other = rank["ranking"]
gain = f1["recaptioned"] - f1["original"]
ci = (-other["high"], -other["low"]) if first["name"] == "recaptioned" else (other["low"], other["high"])
res = json.load(open(f"{out}/ablation/recaptioned/eval/results.json"))["benchmarks"]["caption"]
summary = {"caption_word_f1": f1, "gain": gain, "gain_ci95": ci, "items": res["n"],
           "recaption": {"samples": recap["samples"], "captioned": recap["captioned"]},
           "filter": {"samples": filt["samples"], "kept": filt["kept"], "removed_by_reason": filt["removed_by_reason"]},
           "train_samples": {k: v["samples"] for k, v in packed.items()},
           "iters": rank["iters"], "tokens": rank["tokens"]}
json.dump(summary, open(f"{out}/summary.json", "w"), indent=1)
print(f"held-out caption word F1 over {res['n']} images: recaptioned+filtered pool {f1['recaptioned']:.1f}, "
      f"original pool text {f1['original']:.1f}: gain {gain:+.1f} (95% CI [{ci[0]:+.1f}, {ci[1]:+.1f}])")
if not smoke and gain < min_gain:
    sys.exit(f"FAILED: the recaptioned model is not {min_gain} word-F1 points better than the baseline")
EOF
echo "final model: ${OUT}/ablation/recaptioned/checkpoints"
echo "done in $(( $(date +%s) - START ))s: ${OUT}/summary.json"
