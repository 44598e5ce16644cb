#!/usr/bin/env python
"""Score the complexity of SFT samples: one score per sample in a sidecar folder that
tools/build_curriculum.py and tools/preprocess_data.py (--select) read (docs/sft_curriculum.md).

  python tools/score_complexity.py --input data/sft.jsonl --method heuristic --output-dir scores/heur
  python tools/score_complexity.py --input data/sft.jsonl --method ifd --model ckpt/base --output-dir scores/ifd
  torchrun --nproc_per_node 2 tools/score_complexity.py ... --method ifd --model CKPT --tp 2
  python tools/score_complexity.py --input data/sft.jsonl --method judge --model exports/judge \
      --backend vllm --output-dir scores/judge

Inputs are what tools/preprocess_data.py reads (LLaVA/InternVL JSON(L), chat messages, caption
pairs, WebDataset shards; --format, --image-root, --seed as there). Methods:
  heuristic  no model: question type, turns, answer length, images (curate/complexity/heuristic.py)
  ifd        Instruction-Following Difficulty, PPL(answer | image + question) / PPL(answer),
             with --model (any checkpoint generate loads) (curate/complexity/ifd.py)
  judge      a model rates 1-5 with a documented prompt through a recaption backend
             (curate/complexity/judge.py)
Output: DIR/<file>-<hash>-<shard>.scores.jsonl, one {"source", "key", "score", "method", ...}
per sample, .rejects.jsonl beside each, DIR/complexity.json. A rerun skips finished shards.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_sail import cli  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--input", nargs="+", required=True, metavar="PATH", help="files, directories or globs (required)"
    )
    p.add_argument(
        "--format",
        choices=["llava", "caption", "webdataset", "messages"],
        default=None,
        help="input format (default: detected per file, as tools/preprocess_data.py does)",
    )
    p.add_argument(
        "--image-root",
        default=None,
        metavar="DIR",
        help="base directory of relative image paths (default: beside each file)",
    )
    p.add_argument(
        "--seed", type=int, default=1234, metavar="N", help="preprocessing's --seed: caption prompts (1234)"
    )
    p.add_argument(
        "--method",
        required=True,
        choices=["heuristic", "ifd", "judge"],
        help="heuristic (no model), ifd (reference checkpoint) or judge (rating model); required",
    )
    p.add_argument(
        "--model", default="", metavar="CKPT", help="ifd: reference checkpoint; judge: judge model (none)"
    )
    p.add_argument(
        "--output-dir", required=True, metavar="DIR", help="sidecar folder, one method per folder (required)"
    )
    p.add_argument(
        "--samples-per-shard",
        type=int,
        default=1000,
        metavar="N",
        help="records of one file per shard (1000)",
    )
    p.add_argument("--batch-size", type=int, default=32, metavar="N", help="samples scored together (32)")
    p.add_argument(
        "--shard-index", type=int, default=0, metavar="I", help="this machine's share of the shards (0)"
    )
    p.add_argument("--num-shards", type=int, default=1, metavar="N", help="machines splitting the shards (1)")
    g = p.add_argument_group("ifd")
    g.add_argument(
        "--max-tiles", type=int, default=None, metavar="N", help="tiles per image (default: the checkpoint's)"
    )
    g.add_argument(
        "--max-batch-tokens",
        type=int,
        default=8192,
        metavar="N",
        help="tokens packed into one forward (8192)",
    )
    g.add_argument(
        "--tensor-model-parallel-size",
        "--tp",
        dest="tp",
        type=int,
        default=None,
        metavar="N",
        help="tensor-parallel size of the scorer (megatron backend, under torchrun; default: 1)",
    )
    g.add_argument(
        "--pipeline-model-parallel-size",
        "--pp",
        dest="pp",
        type=int,
        default=None,
        metavar="N",
        help="pipeline-parallel size of the scorer (megatron; default: 1)",
    )
    g.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="parameter dtype (default: float32 on CPU, bfloat16 on GPU)",
    )
    j = p.add_argument_group("judge")
    j.add_argument(
        "--backend",
        default="megatron",
        choices=["megatron", "hf", "vllm", "openai"],
        help="recaption backend that runs the judge (megatron)",
    )
    j.add_argument("--api-base", default=None, metavar="URL", help="openai: server root (none)")
    j.add_argument(
        "--judge-prompt-file",
        default=None,
        metavar="FILE",
        help="replaces the prompt; must hold {conversation} (default: JUDGE_PROMPT)",
    )
    a = p.parse_args(argv)

    from megatron_sail.config.data import TemplateConfig
    from megatron_sail.curate.complexity.runner import ScoreConfig, make_scorer, run_scoring
    from megatron_sail.curate.complexity.samples import InputConfig

    settings: dict = {}
    if a.method == "ifd":
        settings = {
            "max_tiles": a.max_tiles,
            "max_batch_tokens": a.max_batch_tokens,
            "tp": a.tp,
            "pp": a.pp,
            "dtype": a.dtype,
        }
    elif a.method == "judge":
        settings = {"backend": a.backend, "api_base": a.api_base, "batch_size": a.batch_size}
        if a.judge_prompt_file:
            with open(a.judge_prompt_file) as f:
                settings["prompt"] = f.read()
    try:
        cfg = ScoreConfig(
            InputConfig(tuple(a.input), a.format, a.image_root, TemplateConfig(), a.seed),
            a.output_dir,
            a.method,
            a.model,
            a.samples_per_shard,
            a.batch_size,
            a.shard_index,
            a.num_shards,
            {k: v for k, v in settings.items() if k != "prompt"},
        )
        scorer = make_scorer(cfg, settings)
        totals = run_scoring(cfg, scorer)
    except (ValueError, FileNotFoundError) as e:
        print(f"score_complexity.py: error: {e}", file=sys.stderr)
        return 2
    print(
        f"[complexity] {a.method}: {totals['samples']} samples scored, {totals['rejected']} rejected, "
        f"{totals['shards_scored']} shard(s) scored, {totals['shards_skipped']} already done "
        f"({totals['seconds']} s) -> {a.output_dir}"
    )
    return 0


if __name__ == "__main__":
    cli.run(main)
