#!/usr/bin/env python
"""Evaluate a checkpoint on benchmark files in VLMEvalKit's TSV format (docs/evaluation.md).

  python tools/evaluate.py --checkpoint CKPT --benchmark pope=POPE.tsv mme=MME.tsv \
      [--limit N] [--out eval/results.json]
  torchrun --nproc_per_node 2 tools/evaluate.py --checkpoint CKPT --tp 2 --benchmark ...
  python tools/evaluate.py --benchmark pope=POPE.tsv --predictions pope_predictions.tsv

CKPT: a training checkpoint (run dir or iter dir), a converted Megatron checkpoint, or a Hugging
Face folder of either layout. Per benchmark the predictions TSV (the benchmark's columns plus
``prediction``) and a response cache go next to --out; rerunning resumes from the cache. The last
lines are ``benchmark=NAME score=X n=N``, one per benchmark. With --predictions an existing
predictions file (.xlsx, .tsv or .csv, ours or VLMEvalKit's) is scored with NAME's rule, without a
model, exactly as VLMEvalKit scores it. NAME is ours (pope, mmbench, ...) or VLMEvalKit's dataset
name (POPE, MMBench_DEV_EN, MMMU_DEV_VAL, ...), in any case.

Bad items (an answer letter outside the options, an empty answer, an unusable image) are scored as
VLMEvalKit scores them, counted and listed; they never stop a benchmark. A file that cannot be
used is one line ``error: ...`` naming it, and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_sail import cli  # noqa: E402
from megatron_sail.eval.registry import BENCHMARKS, get_benchmark, parse_benchmark_arg  # noqa: E402
from megatron_sail.eval.runner import RunnerConfig, run_benchmark, score_predictions  # noqa: E402
from megatron_sail.eval.tsv import BenchmarkFileError, read_items  # noqa: E402

SHOWN_BAD_ITEMS = 10
"""Bad items printed per benchmark (all of them go to results.json)."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="checkpoint folder (not needed with --predictions)")
    p.add_argument(
        "--benchmark",
        nargs="+",
        action="extend",
        required=True,
        metavar="NAME=PATH",
        help=f"NAME one of: {', '.join(BENCHMARKS)}, or VLMEvalKit's dataset name "
        "(POPE, MMBench_DEV_EN, SEEDBench_IMG, MMMU_DEV_VAL, ...)",
    )
    p.add_argument(
        "--predictions",
        help="score this predictions file (.xlsx, .tsv or .csv, ours or VLMEvalKit's) instead of generating",
    )
    p.add_argument("--limit", type=int, default=None, help="first N items of each file")
    p.add_argument(
        "--out",
        default="eval/results.json",
        help="scores (JSON); predictions and caches go into the same folder",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="answer budget (default: per benchmark, 16-128 tokens)",
    )
    p.add_argument(
        "--max-tiles",
        default="checkpoint",
        help="tiles per image: a number, 'checkpoint' (what the model was trained "
        "with; default) or 'vlmevalkit' (per benchmark as VLMEvalKit's SAIL-VL "
        "wrapper: 10, 12 for ChartQA/MMMU/OCR-VQA, 18 DocVQA, 24 InfoVQA/OCRBench)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
    p.add_argument(
        "--tensor-model-parallel-size",
        "--tp",
        dest="tp",
        type=int,
        default=None,
        metavar="N",
        help="tensor-parallel size under torchrun (default: 1)",
    )
    p.add_argument(
        "--pipeline-model-parallel-size",
        "--pp",
        dest="pp",
        type=int,
        default=None,
        metavar="N",
        help="pipeline-parallel size under torchrun (default: 1)",
    )
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16")
    p.add_argument("--tokenizer", default=None, help="override the checkpoint's tokenizer")
    p.add_argument(
        "--baseline",
        default=None,
        help="JSON {NAME: {'chance': score}} (make_demo_benchmark.py's chance.json): "
        "print each score next to it; exit 1 unless every score beats it clearly",
    )
    p.add_argument(
        "--min-gain",
        type=float,
        default=0.2,
        help="with --baseline: a score must close this share of the gap between "
        "chance and the best possible score (default 0.2)",
    )
    a = p.parse_args(argv)
    try:
        a.benchmarks = [parse_benchmark_arg(b) for b in a.benchmark]
    except ValueError as e:
        p.error(str(e))
    if a.predictions and len(a.benchmarks) != 1:
        p.error("--predictions scores one benchmark: give exactly one --benchmark NAME=PATH")
    if not a.predictions and not a.checkpoint:
        p.error("--checkpoint is required (or --predictions to score an existing file)")
    if a.limit is not None and a.limit < 1:
        p.error("--limit must be positive")
    if a.baseline and not os.path.isfile(a.baseline):
        p.error(f"--baseline {a.baseline}: no such file")
    if a.max_tiles not in ("checkpoint", "vlmevalkit") and not a.max_tiles.isdigit():
        p.error("--max-tiles: a positive number, 'checkpoint' or 'vlmevalkit'")
    return a


def score_line(name: str, score: float, n: int) -> str:
    """The last-line format scripts grep for."""
    return f"benchmark={name} score={round(score, 2):g} n={n}"


def report(name: str, s) -> None:
    """The score with its sub-scores, then the bad items (counted, the first few listed)."""
    print(
        f"[eval] {name}: {s.metric} {s.score:.2f} over {s.n} items ({json.dumps(s.details)[:300]})",
        flush=True,
    )
    if s.bad_items:
        shown = "; ".join(f"index {b['index']}: {b['reason']}" for b in s.bad_items[:SHOWN_BAD_ITEMS])
        more = len(s.bad_items) - SHOWN_BAD_ITEMS
        print(
            f"[eval] {name}: {len(s.bad_items)} bad item(s), scored as VLMEvalKit scores "
            f"them: {shown}" + (f"; ... {more} more" if more > 0 else ""),
            flush=True,
        )


def result_record(s) -> dict:
    """A score as results.json holds it (the per-item verdicts stay out: the predictions file
    has the answers)."""
    out = dataclasses.asdict(s)
    out.pop("per_item")
    return out


def best_possible(name: str, s) -> float:
    """The top of a benchmark's scale: 100 for percentages, the item count for OCRBench,
    200 points per scored subtask for MME."""
    name = get_benchmark(name).name.split("@")[0]
    if name == "ocrbench":
        return float(s.n)
    if name == "mme":
        return 200.0 * len(s.details.get("categories", {}))
    return 100.0


def compare_baseline(path: str, scores: dict, min_gain: float) -> bool:
    """Print every score next to its guessing baseline; True when all beat it clearly."""
    try:
        with open(path) as f:
            base = json.load(f)
    except (OSError, ValueError) as e:
        raise BenchmarkFileError(f"{path}: not a readable baseline JSON ({e})") from None
    ok = True
    for name, s in scores.items():
        if name not in base:
            print(f"[eval] {name}: no baseline in {path}")
            continue
        chance = float(base[name]["chance"])
        need = chance + min_gain * (best_possible(name, s) - chance)
        good = s.score >= need
        ok &= good
        print(
            f"[eval] {name:10s} score {s.score:8.2f}   chance {chance:8.2f}   "
            f"{'OK' if good else 'NOT clearly above chance'} (needs >= {need:.2f})",
            flush=True,
        )
    return ok


def write_json(path: str, value: dict) -> None:
    """Write JSON under a temporary name, then rename."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1)
    os.replace(tmp, path)


def _generators(a):
    """(generator factory per max-tiles value, rank-0 flag, model id)."""
    from megatron_sail.inference import (
        GenerationConfig,
        Generator,
        LoadConfig,
        inspect_checkpoint,
        load_generator,
    )

    ckpt = inspect_checkpoint(a.checkpoint)
    base_tiles = ckpt.settings.max_tiles if not a.max_tiles.isdigit() else int(a.max_tiles)
    cfg = GenerationConfig(
        max_new_tokens=a.max_new_tokens or 64, max_tiles=base_tiles, batch_size=a.batch_size
    )
    gen = load_generator(
        a.checkpoint, cfg, LoadConfig(tp=a.tp, pp=a.pp, dtype=a.dtype, tokenizer=a.tokenizer)
    )
    cache = {base_tiles: gen}

    def for_tiles(tiles: int):
        """A generator on the same weights with another tile budget (no reload)."""
        if tiles not in cache:
            cache[tiles] = Generator(
                gen.wrapped,
                gen.model_config,
                gen.tokenizer,
                gen.settings,
                dataclasses.replace(cfg, max_tiles=tiles),
            )
        return cache[tiles]

    import torch

    rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    return for_tiles, base_tiles, rank0, str(ckpt.path)


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        return run(a)
    except BenchmarkFileError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2


def run(a) -> int:
    """Score or generate every benchmark of the parsed arguments; the exit status."""
    results, lines, scores = {}, [], {}
    if a.predictions:
        ((name, path),) = a.benchmarks
        s = score_predictions(get_benchmark(name), path, a.predictions, a.limit)
        results[name] = {"file": path, "predictions": a.predictions, **result_record(s)}
        lines.append(score_line(name, s.score, s.n))
        scores[name] = s
        report(name, s)
        rank0 = True
    else:
        for _, path in a.benchmarks:  # an unusable file fails before the model loads
            read_items(path, limit=1, need_images=False)
        for_tiles, base_tiles, rank0, model_path = _generators(a)
        out_dir = os.path.dirname(os.path.abspath(a.out))
        for name, path in a.benchmarks:
            spec = get_benchmark(name)
            tiles = spec.max_tiles if a.max_tiles == "vlmevalkit" else base_tiles
            gen = for_tiles(tiles)
            rc = RunnerConfig(
                limit=a.limit,
                batch_size=a.batch_size,
                max_new_tokens=a.max_new_tokens,
                writer=rank0,
                progress=True,
                model_id=f"{model_path}|tiles={tiles}|tokens={a.max_new_tokens}",
            )
            s, pred_path = run_benchmark(spec, path, gen.generate, rc, out_dir)
            results[name] = {"file": path, "predictions": pred_path, "max_tiles": tiles, **result_record(s)}
            lines.append(score_line(name, s.score, s.n))
            scores[name] = s
            if rank0:
                report(name, s)
                write_json(a.out, {"checkpoint": a.checkpoint, "benchmarks": results})
    code = 0
    if rank0:
        if not a.predictions:
            print(f"[eval] scores: {a.out}", flush=True)
        if a.baseline and not compare_baseline(a.baseline, scores, a.min_gain):
            code = 1
        for line in lines:
            print(line, flush=True)
    return code


if __name__ == "__main__":
    cli.run(main)
