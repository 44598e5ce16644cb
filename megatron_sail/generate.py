"""Generate answers with a SAIL-VL checkpoint: ``python -m megatron_sail.generate`` (docs/inference.md).

    python -m megatron_sail.generate --checkpoint DIR --image cat.jpg --prompt "Describe the image."
    python -m megatron_sail.generate --checkpoint DIR --input questions.jsonl --output answers.jsonl
    torchrun --nproc-per-node 2 -m megatron_sail.generate --checkpoint DIR \\
        --tensor-model-parallel-size 2 --prompt "Hello"

DIR is a training checkpoint (run dir or iter dir), a converted Megatron checkpoint, or a Hugging
Face folder of either layout. ``--input`` records are JSON objects with ``prompt`` (or
``question``) and ``image`` (a path) or ``images`` (a list); relative image paths are read from
the JSONL file's folder. A record that cannot be used is skipped, counted and written to
``OUTPUT.rejects.jsonl``. Rank 0 prints each answer and writes ``--output``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

from megatron_sail import cli
from megatron_sail.inference.config import GenerationConfig, GenerationRequest
from megatron_sail.progress import Progress, ProgressConfig


@dataclass
class InputRecord:
    """One usable --input line."""

    line: int
    """1-based line number in the file."""
    request: GenerationRequest
    """What to generate."""
    extra: dict
    """The record's other fields (id, answer, ...), copied to the output record."""


def read_input(path: str) -> tuple[list[InputRecord], list[dict]]:
    """Requests of a JSONL file and the rejected lines (with file, line and reason)."""
    base = os.path.dirname(os.path.abspath(path))
    good, rejects = [], []
    with open(path, "rb") as f:  # decoded per line: one bad line is a reject, not the end
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                good.append(_record(json.loads(line), n, base))
            except UnicodeDecodeError as e:
                rejects.append(
                    {
                        "file": path,
                        "line": n,
                        "reason": f"not UTF-8 (byte {e.start}: {raw[e.start : e.start + 1]!r})",
                    }
                )
            except (ValueError, TypeError) as e:
                rejects.append({"file": path, "line": n, "reason": str(e)})
    return good, rejects


def _record(rec, line: int, base: str) -> InputRecord:
    """Validate one JSONL object; image paths resolved against the file's folder."""
    if not isinstance(rec, dict):
        raise ValueError("record is not a JSON object")
    prompt = rec.get("prompt", rec.get("question"))
    if not isinstance(prompt, str):
        raise ValueError("record has no 'prompt' (or 'question') string")
    images = rec.get("images", [rec["image"]] if "image" in rec else [])
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise ValueError("'image' must be a path string and 'images' a list of path strings")
    images = [p if os.path.isabs(p) else os.path.join(base, p) for p in images]
    budget = rec.get("max_new_tokens")
    if budget is not None and (not isinstance(budget, int) or budget < 0):
        raise ValueError(f"'max_new_tokens' must be a non-negative integer, got {budget!r}")
    extra = {k: v for k, v in rec.items() if k not in ("prompt", "question", "image", "images")}
    return InputRecord(line, GenerationRequest(prompt, images, budget), extra)


def _at_least(low: int):
    """argparse type: an integer >= ``low`` (checked before any model code is imported)."""

    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def _unit_interval(text: str) -> float:
    """argparse type: a float in (0, 1] (top-p)."""
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def _non_negative(text: str) -> float:
    """argparse type: a float >= 0 (temperature)."""
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags (every GenerationConfig field has one)."""
    p = argparse.ArgumentParser(
        prog="python -m megatron_sail.generate", description="Generate answers with a SAIL-VL checkpoint."
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        metavar="DIR",
        help="training run/iter dir, converted Megatron checkpoint or Hugging Face folder",
    )
    p.add_argument("--prompt", help="user text (with --image: the question about the image(s))")
    p.add_argument("--image", action="append", default=[], help="image path (repeatable, in order)")
    p.add_argument("--input", help="JSONL file of records with prompt/question and image/images")
    p.add_argument("--output", help="write one JSON record per prompt here (text, token_ids, prompt_ids)")
    d = GenerationConfig()
    p.add_argument(
        "--max-new-tokens",
        type=_at_least(0),
        default=d.max_new_tokens,
        metavar="N",
        help="most tokens generated per answer (default: %(default)s)",
    )
    p.add_argument(
        "--min-new-tokens",
        type=_at_least(0),
        default=d.min_new_tokens,
        metavar="N",
        help="stop tokens are ignored before this many (default: %(default)s)",
    )
    p.add_argument(
        "--max-tiles",
        type=_at_least(1),
        default=d.max_tiles,
        metavar="N",
        help="most tiles per image (default: %(default)s)",
    )
    p.add_argument(
        "--temperature",
        type=_non_negative,
        default=d.temperature,
        metavar="T",
        help="sampling temperature; 0 = greedy (default: %(default)s)",
    )
    p.add_argument(
        "--top-p",
        type=_unit_interval,
        default=d.top_p,
        metavar="P",
        help="nucleus sampling mass in (0, 1] (default: %(default)s)",
    )
    p.add_argument(
        "--seed", type=int, default=d.seed, metavar="N", help="sampling seed (default: %(default)s)"
    )
    p.add_argument(
        "--batch-size",
        type=_at_least(1),
        default=d.batch_size,
        metavar="N",
        help="prompts decoded together (default: %(default)s)",
    )
    p.add_argument("--system", default=None, help="system prompt (default: the training template's)")
    p.add_argument(
        "--stop-token-id",
        type=int,
        action="append",
        default=None,
        help="id that ends an answer (repeatable; default <|im_end|> and <|endoftext|>)",
    )
    p.add_argument(
        "--tensor-model-parallel-size",
        "--tp",
        dest="tp",
        type=_at_least(1),
        default=1,
        metavar="N",
        help="tensor-parallel ranks (default: %(default)s; the checkpoint is resharded while loading)",
    )
    p.add_argument(
        "--pipeline-model-parallel-size",
        "--pp",
        dest="pp",
        type=_at_least(1),
        default=1,
        metavar="N",
        help="pipeline stages (default: %(default)s)",
    )
    p.add_argument(
        "--expert-model-parallel-size",
        "--ep",
        dest="ep",
        type=int,
        default=1,
        help="ignored (a note is printed when > 1): generation loads every expert on "
        "each rank (EP=1), whatever EP the checkpoint was trained at",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default=None,
        help="parameter dtype (default: float32 on CPU, bfloat16 on GPU)",
    )
    p.add_argument("--tokenizer", default=None, help="override the tokenizer the checkpoint names")
    return p


def _requests(args, parser) -> tuple[list[InputRecord], list[dict]]:
    """Requests from --prompt/--image or --input (exactly one of them)."""
    if bool(args.input) == bool(args.prompt is not None):
        parser.error("give either --prompt (with optional --image) or --input FILE.jsonl")
    if args.input:
        if args.image:
            parser.error("--image goes with --prompt; --input records name their own images")
        if not os.path.isfile(args.input):
            parser.error(f"--input {args.input}: no such file")
    if args.output:  # found now, not after generating (the answers would be lost)
        folder = os.path.dirname(os.path.abspath(args.output))
        if not os.path.isdir(folder):
            parser.error(f"--output {args.output}: folder {folder} does not exist")
        if not os.access(folder, os.W_OK):
            parser.error(f"--output {args.output}: folder {folder} is not writable")
    if args.input:
        return read_input(args.input)
    return [InputRecord(0, GenerationRequest(args.prompt, list(args.image)), {})], []


def write_jsonl(path: str, records: list[dict]) -> None:
    """Write records atomically (temporary name, then rename)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def main(argv: Optional[list[str]] = None) -> int:
    """Load, generate, print (rank 0), write --output; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    records, rejects = _requests(args, parser)
    if args.ep < 1:
        parser.error(f"--expert-model-parallel-size {args.ep}: must be at least 1")
    cfg = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        max_tiles=args.max_tiles,
        batch_size=args.batch_size,
        system=args.system,
        min_new_tokens=args.min_new_tokens,
        stop_token_ids=tuple(args.stop_token_id) if args.stop_token_id else None,
    )
    import torch.distributed as dist

    from megatron_sail.inference.loading import LoadConfig, load_generator

    gen = load_generator(
        args.checkpoint, cfg, LoadConfig(tp=args.tp, pp=args.pp, dtype=args.dtype, tokenizer=args.tokenizer)
    )
    if args.ep > 1 and dist.get_rank() == 0:
        print(
            f"note: --expert-model-parallel-size {args.ep} ignored: generation loads every expert "
            "on each rank (EP=1; the checkpoint is resharded while loading), since expert-parallel "
            "ranks would be data-parallel replicas decoding the same prompts",
            file=sys.stderr,
        )
    prompts, kept = [], []
    for rec in records:
        try:
            prompts.append(gen.prompts.build(rec.request, cfg.max_new_tokens, rec.line, with_tiles=gen.first))
            kept.append(rec)
        except (ValueError, TypeError, OSError) as e:
            rejects.append({"file": args.input or "--image", "line": rec.line, "reason": str(e)})
    start = time.perf_counter()
    show = args.input is not None and dist.get_rank() == 0  # one prompt needs no bar
    with Progress(
        total=len(prompts),
        desc="generate",
        unit="prompts",
        config=None if show else ProgressConfig(enabled=False),
    ) as bar:
        results = gen.generate_prompts(prompts, on_batch=bar.update)
    elapsed = time.perf_counter() - start
    if dist.get_rank() == 0:
        _report(args, kept, results, rejects, elapsed)
    return 0 if results or not rejects else 1


def _report(args, kept: list[InputRecord], results, rejects: list[dict], elapsed: float) -> None:
    """Print answers and a summary; write --output and the rejects file."""
    for rec, res in zip(kept, results):
        print(res.text if len(results) == 1 else f"[{rec.line}] {res.text}", flush=True)
    if args.output:
        out = [
            {
                **rec.extra,
                "prompt": rec.request.prompt,
                "images": list(rec.request.images),
                "text": res.text,
                "token_ids": res.token_ids,
                "prompt_ids": res.prompt_ids,
                "finish_reason": res.finish_reason,
            }
            for rec, res in zip(kept, results)
        ]
        write_jsonl(args.output, out)
        if rejects:
            write_jsonl(args.output + ".rejects.jsonl", rejects)
    for r in rejects:
        print(f"skipped {r['file']}:{r['line']}: {r['reason']}", file=sys.stderr)
    new = sum(len(r.token_ids) for r in results)
    print(
        f"generated {new} tokens for {len(results)} prompts in {elapsed:.2f}s "
        f"({new / max(elapsed, 1e-9):.1f} tokens/s); {len(rejects)} skipped",
        file=sys.stderr,
    )


if __name__ == "__main__":
    cli.run(main)
