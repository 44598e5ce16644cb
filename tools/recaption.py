#!/usr/bin/env python
"""Recaption images with a VLM: WebDataset shards / caption or LLaVA JSONL / an image folder in,
one WebDataset shard per input shard out (image, new caption, original text, provenance).

    python tools/recaption.py --input 'shards/*.tar' --output-dir OUT --model ckpt/captioner \
        --backend megatron --max-new-tokens 256 --batch-size 8
    python tools/recaption.py --input pool.jsonl --image-root images/ --output-dir OUT \
        --backend openai --model my-vlm --api-base http://host:8000/v1 --requests-per-second 5
    # SLURM array: each task takes every N-th shard; a rerun skips finished shards
    python tools/recaption.py ... --shard-index $SLURM_ARRAY_TASK_ID --num-shards $SLURM_ARRAY_TASK_COUNT
    # a Ray cluster, one GPU per captioner actor
    python tools/recaption.py ... --backend vllm --executor ray --workers 64 --gpus-per-worker 1

See docs/curation.md ("Recaption").
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_sail import cli
from megatron_sail.curate.backends import BACKENDS, BackendConfig  # noqa: E402
from megatron_sail.curate.job import add_job_flags, job_fields  # noqa: E402
from megatron_sail.curate.recaption import RecaptionConfig, run  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="recaption.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument(
        "--input",
        action="append",
        required=True,
        help="tar shards (glob), a caption/LLaVA JSONL file or an image folder (repeatable)",
    )
    p.add_argument(
        "--output-dir", required=True, metavar="DIR", help="where the captioned shards, rejects and done/ go"
    )
    p.add_argument(
        "--model", required=True, help="checkpoint folder (megatron/hf/vllm) or served model name (openai)"
    )
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default="megatron",
        help=f"how the captioner runs: {', '.join(BACKENDS)} (default: megatron)",
    )
    p.add_argument("--image-root", help="root of relative image paths in JSONL inputs")
    p.add_argument("--prompt-file", help="prompt bank: one prompt a line, or a JSON list")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=256,
        metavar="N",
        help="caption length cap in tokens (default: 256)",
    )
    p.add_argument(
        "--batch-size", type=int, default=8, metavar="N", help="images per request batch (default: 8)"
    )
    p.add_argument(
        "--seed",
        type=int,
        default=1234,
        metavar="S",
        help="seed of prompt choice and sampling (default: 1234)",
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        metavar="T",
        help="sampling temperature, 0 greedy (default: 0)",
    )
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass (default: 1)")
    p.add_argument(
        "--max-tiles", type=int, default=12, metavar="N", help="image tiles per image (default: 12)"
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        help="parameter dtype: float32, bfloat16 or float16 (default: float32 on CPU, bfloat16 on GPU)",
    )
    p.add_argument(
        "--samples-per-shard", type=int, default=1000, help="records per shard of JSONL / folder inputs"
    )
    add_job_flags(p, "captioner processes (local) or actors (ray), one model each")
    p.add_argument(
        "--tensor-model-parallel-size",
        "--tp",
        "--tensor-parallel-size",
        dest="tensor_parallel_size",
        type=int,
        default=1,
        metavar="N",
        help="tensor-parallel size: GPUs per vLLM engine (vllm backend; default: 1)",
    )
    p.add_argument("--api-base", default="http://localhost:8000/v1", help="OpenAI-compatible server (openai)")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    p.add_argument("--max-retries", type=int, default=5, help="retries per request (openai)")
    p.add_argument("--backoff", type=float, default=1.0, help="first retry delay in s, doubled each retry")
    p.add_argument(
        "--requests-per-second", type=float, default=0.0, help="rate limit per worker (openai), 0: none"
    )
    p.add_argument(
        "--request-timeout",
        type=float,
        default=300.0,
        metavar="S",
        help="seconds one request may take (openai; default: 300)",
    )
    p.add_argument("--max-image-bytes", type=int, default=128 << 20, help="larger images are rejects")
    p.add_argument(
        "--max-sample-bytes",
        type=int,
        help="largest sum of a tar sample's members (default: 2x --max-image-bytes)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def config_from(args) -> RecaptionConfig:
    backend = BackendConfig(
        backend=args.backend,
        model=args.model,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        max_tiles=args.max_tiles,
        dtype=args.dtype,
        api_base=args.api_base,
        api_key_env=args.api_key_env,
        max_retries=args.max_retries,
        backoff_s=args.backoff,
        requests_per_second=args.requests_per_second,
        timeout_s=args.request_timeout,
        tensor_parallel_size=args.tensor_parallel_size,
    )
    return RecaptionConfig(
        inputs=args.input,
        output_dir=args.output_dir,
        backend=backend,
        image_root=args.image_root,
        prompt_file=args.prompt_file,
        seed=args.seed,
        samples_per_shard=args.samples_per_shard,
        **job_fields(args, "recaption.py"),
        max_image_bytes=args.max_image_bytes,
        max_sample_bytes=args.max_sample_bytes,
        progress=not args.no_progress,
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = config_from(args)
        summary = run(cfg)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"recaption.py: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1))
    print(
        f"recaptioned {summary['captioned']} of {summary['samples']} images in {len(summary['shards_done'])} "
        f"shards ({summary['skipped_done']} already done, {len(summary['failed_shards'])} failed), "
        f"{summary['rejected']} rejects, {summary['images_per_s']} images/s",
        file=sys.stderr,
    )
    return 1 if summary["failed_shards"] else 0


if __name__ == "__main__":
    cli.run(main)
