"""Run one benchmark: read its TSV, prompt the model in batches, keep a response cache so an
interrupted evaluation resumes where it stopped, write the predictions TSV and score it; or score
an existing predictions file (.xlsx, .tsv, .csv) as VLMEvalKit would.

An item whose images cannot be used (bad base64, not an image, over the pixel limit, a missing
file) is not generated: its prediction is empty, it is scored as such and listed in the score's
bad_items, and the benchmark goes on."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable, Optional

from megatron_sail.config.images import DEFAULT_MAX_IMAGE_PIXELS
from megatron_sail.eval.prediction_files import canonical_index, read_predictions
from megatron_sail.eval.registry import BenchmarkSpec
from megatron_sail.eval.replicas import ReplicaShare
from megatron_sail.eval.result import BenchmarkScore, bad_item
from megatron_sail.eval.tsv import BenchmarkFileError, read_items, read_rows, write_predictions
from megatron_sail.progress import Progress, ProgressConfig


@dataclass
class RunnerConfig:
    """How a benchmark is run through a generator."""

    limit: Optional[int] = None
    """Only the first N items of the file (None: all)."""
    batch_size: int = 8
    """Requests handed to the generator at once (and cached together)."""
    max_new_tokens: Optional[int] = None
    """Answer budget (None: the benchmark's own)."""
    writer: bool = True
    """Whether this rank writes files (rank 0); every rank generates under TP/PP."""
    model_id: str = ""
    """Identifies the model in the cache: answers of another model are not reused."""
    replicas: Optional[ReplicaShare] = None
    """Data-parallel replicas that split the requests (eval/replicas.py); None: this rank's
    replica decodes every request."""
    progress: bool = False
    """Report items answered, rate and ETA on stderr (the writer rank; tools/evaluate.py)."""


def _load_cache(path: str, model_id: str) -> dict[str, dict]:
    """index -> cached record of this model (lines cut short by a crash are ignored)."""
    out = {}
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("model") == model_id:
                out[str(rec["index"])] = rec
    return out


def _barrier() -> None:
    """Wait for every rank when torch.distributed runs (TP/PP ranks generate together)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def image_problem(item, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> str:
    """Why an item's images cannot be fed to the model ('' when they can): the reader's reason,
    or the first image that is missing, undecodable or over the pixel limit (checked before the
    pixels are decoded)."""
    from megatron_sail.data.images.imageinfo import check_decodable

    if item.problem:
        return item.problem
    for k, img in enumerate(item.images):
        if isinstance(img, (str, os.PathLike)):
            try:
                with open(img, "rb") as f:
                    img = f.read()
            except OSError as e:
                return f"image {k} ({img}): cannot read ({e.strerror or e})"
        why = check_decodable(bytes(img), max_pixels)
        if why:
            return f"image {k}: not usable ({why})"
    return ""


def generate_answers(
    spec: BenchmarkSpec,
    items,
    generate: Callable,
    cfg: RunnerConfig,
    cache_path: Optional[str] = None,
    bad: Optional[list] = None,
    source: str = "",
) -> dict[str, str]:
    """index -> raw answer for every item, from the cache where it holds the same prompt, from
    ``generate`` (a list of (prompt, images, max_new_tokens) -> list of texts) otherwise. An
    item whose images are unusable gets '' and an entry in ``bad`` (naming ``source``, the
    benchmark file, and the row)."""
    from megatron_sail.inference import GenerationRequest

    cache = _load_cache(cache_path, cfg.model_id) if cache_path else {}
    answers, todo = {}, []
    for it in items:
        prompt = spec.prompt(it)
        rec = cache.get(it.index)
        if not it.problem and rec is not None and rec.get("prompt") == prompt:
            answers[it.index] = rec["raw"]  # its images were checked when it was generated
            continue
        problem = image_problem(it)
        if problem:  # every rank sees the same files, so every rank skips the same items
            answers[it.index] = ""
            if bad is not None:
                where = "" if it.problem else f"{source}: row index={it.index}: "
                bad.append(bad_item(it.index, f"not generated: {where}{problem}"))
        else:
            todo.append((it, prompt))
    budget = cfg.max_new_tokens or spec.max_new_tokens
    _barrier()  # every rank has read the cache before rank 0 appends to it: same todo lists
    share = cfg.replicas
    step = cfg.batch_size * (share.size if share else 1)
    f = open(cache_path, "a", buffering=1) if cache_path and cfg.writer else None
    bar = Progress(
        total=len(todo),
        desc=spec.name,
        unit="items",
        config=None if cfg.progress and cfg.writer else ProgressConfig(enabled=False),
    )
    try:
        for start in range(0, len(todo), step):
            round_ = todo[start : start + step]
            lo, hi = share.slice(len(round_)) if share else (0, len(round_))
            mine = round_[lo:hi]
            reqs = [
                GenerationRequest(prompt=p, images=list(it.images), max_new_tokens=budget) for it, p in mine
            ]
            # every replica calls generate once per round, even with nothing to decode: under
            # overlapped param gather it starts with a collective over the DP group
            texts = [res.text for res in generate(reqs)]
            if share:  # every replica's answers, in DP rank order = the round's order
                texts = [t for part in share.gather(texts) for t in part]
            bar.update(len(round_))
            for (it, p), text in zip(round_, texts):
                answers[it.index] = text
                if f is not None:
                    f.write(
                        json.dumps({"index": it.index, "model": cfg.model_id, "prompt": p, "raw": text})
                        + "\n"
                    )
    finally:
        bar.close()
        if f is not None:
            f.close()
    return answers


def run_benchmark(
    spec: BenchmarkSpec, path: str, generate: Callable, cfg: RunnerConfig, out_dir: Optional[str] = None
) -> tuple[BenchmarkScore, Optional[str]]:
    """Generate, write ``<out_dir>/<name>_predictions.tsv`` (with a response cache beside it)
    and score; returns the score and the predictions path (None when nothing is written)."""
    items = read_items(path, cfg.limit)
    cache = pred_path = None
    if out_dir:
        if cfg.writer:
            os.makedirs(out_dir, exist_ok=True)
        cache = os.path.join(out_dir, f"{spec.name}_cache.jsonl")
        pred_path = os.path.join(out_dir, f"{spec.name}_predictions.tsv")
    bad: list = []
    raw = generate_answers(spec, items, generate, cfg, cache, bad, source=path)
    preds = {k: spec.postprocess(v) for k, v in raw.items()}
    if pred_path and cfg.writer:
        header, _ = read_rows(path)
        write_predictions(pred_path, header, items, preds)
    score = spec.score(items, preds)
    skipped = {b["index"] for b in bad}  # their empty answer is already explained
    score.bad_items = bad + [
        b for b in score.bad_items if not (b["index"] in skipped and b["reason"].startswith("empty answer"))
    ]
    return score, pred_path


def score_predictions(
    spec: BenchmarkSpec, path: str, predictions_path: str, limit: Optional[int] = None
) -> BenchmarkScore:
    """Score an existing predictions file (.xlsx, .tsv or .csv; ours or VLMEvalKit's) against
    the benchmark file, the stored text as it is: the items are the benchmark's rows that have a
    prediction (all of them, or the first ``limit``); the answers and columns come from the
    benchmark file. Prediction rows whose index the benchmark lacks are counted in
    ``details['unmatched_predictions']``."""
    preds = read_predictions(predictions_path)
    all_items = read_items(
        path, need_images=spec.prompt_style == "mme", require=("answer",), images_if_no=("image_path",)
    )
    items = [it for it in all_items if canonical_index(it.index) in preds]
    if limit:
        items = items[:limit]
    if not items:
        raise BenchmarkFileError(f"{predictions_path}: no prediction matches an index of {path}")
    score = spec.score(items, {it.index: preds[canonical_index(it.index)] for it in items})
    matched = {canonical_index(it.index) for it in all_items}
    score.details["unmatched_predictions"] = sum(k not in matched for k in preds)
    return score
