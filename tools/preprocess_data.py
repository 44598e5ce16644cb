#!/usr/bin/env python
"""Raw image-text data -> tokenized, tiled, packed Megatron indexed dataset (see docs/data.md).

Example (demo data, tiny recipe):
  python tools/preprocess_data.py --input demo/train.jsonl --tokenizer demo/tokenizer.json \
      --output-prefix data/demo_train --seq-length 1024 --recipe tiny --max-tiles 4
The tile size and tokens per tile come from --recipe's vision family (default: sail_2b's InternViT,
448 px tiles, 256 tokens) and are recorded with that geometry in meta.json; the trainer refuses
data built for a geometry that makes another number of tokens per tile.
Prints one JSON summary line; exits 1 on --strict rejects or a reject rate above --max-reject-rate,
2 (with a one-line error) on missing inputs or bad flags, 3 (with a one-line error naming the
records in flight) when a worker process died twice (e.g. the out-of-memory killer); nothing is
published then, and a rerun gives the same output as an undisturbed run.

An InternVL meta file as the one --input (internvl_chat/shell/data/*.json) builds one dataset per
entry under --output-prefix (a directory), prints one summary line per entry and then the
--data-path blend (also written to OUT/blend.json and OUT/data_path.txt); see
megatron_sail/data/preprocess/internvl_meta.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_sail import cli
from megatron_sail.config.data import DEFAULT_MAX_IMAGE_BYTES, PackingConfig, PreprocessConfig, TemplateConfig  # noqa: E402
from megatron_sail.config.images import DEFAULT_MAX_IMAGE_PIXELS, TilingConfig  # noqa: E402
from megatron_sail.data.geometry import resolve_tiling  # noqa: E402
from megatron_sail.data.integrity import OutputWriteError  # noqa: E402
from megatron_sail.data.preprocess.block_pool import WorkerDied  # noqa: E402
from megatron_sail.data.preprocess.internvl_meta import is_meta_file, run_meta  # noqa: E402
from megatron_sail.data.preprocess.pipeline import run  # noqa: E402


def parse_args(argv=None) -> PreprocessConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="files, directories or globs")
    p.add_argument(
        "--format",
        choices=["llava", "caption", "webdataset", "messages", "internvl_meta"],
        default=None,
        help="default: detected (an InternVL meta JSON builds one dataset per entry)",
    )
    p.add_argument("--image-root", default=None, help="base directory of relative image paths")
    p.add_argument(
        "--tokenizer", required=True, help="tokenizer.json, HF tokenizer dir, or sentencepiece .model"
    )
    p.add_argument(
        "--output-prefix",
        required=True,
        metavar="PREFIX",
        help="where the indexed dataset goes: PREFIX.bin/.idx, meta.json, rejects (required)",
    )
    p.add_argument(
        "--seq-length",
        type=int,
        required=True,
        metavar="N",
        help="tokens per packed row; equal to the trainer's --seq-length (required)",
    )
    p.add_argument(
        "--recipe",
        default=None,
        help="the training recipe the data is for: tokens per tile come from its vision "
        "family's geometry and are recorded in meta.json (default: sail_2b, "
        "unless --tokens-per-tile is given)",
    )
    p.add_argument(
        "--config",
        default=None,
        help="the trainer's YAML overriding --recipe fields (e.g. the ViT's patch size)",
    )
    p.add_argument("--tile-size", type=int, default=None, help="default: the recipe's ViT image size")
    p.add_argument(
        "--tokens-per-tile",
        type=int,
        default=None,
        help="must equal what --recipe makes; without --recipe, taken as given (no geometry recorded)",
    )
    p.add_argument(
        "--min-tiles",
        type=int,
        default=1,
        help="fewest dynamic-resolution tiles per image (default: %(default)s)",
    )
    p.add_argument(
        "--max-tiles",
        type=int,
        default=12,
        help="most dynamic-resolution tiles per image, thumbnail excluded (default: %(default)s)",
    )
    p.add_argument(
        "--no-thumbnail",
        action="store_true",
        help="no whole-image thumbnail tile after a multi-tile grid (default: added, as InternVL does)",
    )
    p.add_argument("--system-prompt", default="", help="system message for samples without one")
    p.add_argument("--caption-prompts", default=None, help="file with one caption prompt per line")
    p.add_argument("--packing-buffer", type=int, default=4096, help="records per shuffle/packing block")
    p.add_argument(
        "--seed",
        type=int,
        default=1234,
        help="seed of the shuffle and caption prompt choice (default: %(default)s)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes; the output is the same for any count (default: %(default)s)",
    )
    p.add_argument(
        "--shard-index",
        type=int,
        default=0,
        help="this job's shard: it keeps the blocks with block %% num_shards == index (default: %(default)s)",
    )
    p.add_argument(
        "--num-shards",
        type=int,
        default=1,
        help="jobs splitting the input; merge with tools/merge_datasets.py (default: %(default)s)",
    )
    p.add_argument("--strict", action="store_true", help="exit 1 on any rejected sample")
    p.add_argument(
        "--max-reject-rate",
        type=float,
        default=0.05,
        help="exit 1 when more than this fraction of samples is rejected (default: %(default)s)",
    )
    p.add_argument(
        "--allow-absolute-paths",
        action="store_true",
        help="read absolute image paths in records (default: refused; relative paths must "
        "always resolve inside --image-root)",
    )
    p.add_argument(
        "--max-image-bytes",
        type=int,
        default=DEFAULT_MAX_IMAGE_BYTES,
        help="largest image file or tar member read (default %(default)s)",
    )
    p.add_argument(
        "--max-image-pixels",
        type=int,
        default=DEFAULT_MAX_IMAGE_PIXELS,
        help="largest width x height accepted; the trainer's decoders use the same default "
        "(default %(default)s)",
    )
    p.add_argument(
        "--video-frames",
        type=int,
        default=8,
        help="frames sampled per InternVL video sample, one tile each (0: reject videos)",
    )
    p.add_argument(
        "--select",
        default=None,
        help="keep only the records this sample list names: a curriculum stage list "
        "(tools/build_curriculum.py) or a complexity sidecar folder (tools/score_complexity.py)",
    )
    p.add_argument("--select-min-score", type=float, default=None, help="with --select: score >= this")
    p.add_argument("--select-max-score", type=float, default=None, help="with --select: score < this")
    a = p.parse_args(argv)
    if (a.select_min_score is not None or a.select_max_score is not None) and not a.select:
        p.error("--select-min-score / --select-max-score need --select")
    if a.video_frames < 0:
        p.error("--video-frames must be >= 0")
    if a.seq_length <= 0 or a.packing_buffer <= 0 or a.workers <= 0:
        p.error("--seq-length, --packing-buffer and --workers must be positive")
    if a.max_image_bytes <= 0 or a.max_image_pixels <= 0:
        p.error("--max-image-bytes and --max-image-pixels must be positive")
    if not 1 <= a.min_tiles <= a.max_tiles:
        p.error("need 1 <= --min-tiles <= --max-tiles")
    try:
        tile_size, tokens_per_tile, geometry = resolve_tiling(
            a.recipe, a.config, a.tile_size, a.tokens_per_tile
        )
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    template = TemplateConfig(system_prompt=a.system_prompt)
    if a.caption_prompts:
        with open(a.caption_prompts, encoding="utf-8") as f:
            prompts = tuple(line.strip() for line in f if line.strip())
        if not prompts:
            p.error(f"{a.caption_prompts}: no prompts")
        template = TemplateConfig(system_prompt=a.system_prompt, caption_prompts=prompts)
    return PreprocessConfig(
        inputs=a.input,
        output_prefix=a.output_prefix,
        tokenizer=a.tokenizer,
        format=a.format,
        image_root=a.image_root,
        tiling=TilingConfig(tile_size, a.min_tiles, a.max_tiles, not a.no_thumbnail, tokens_per_tile),
        template=template,
        packing=PackingConfig(a.seq_length, a.packing_buffer, a.seed),
        workers=a.workers,
        shard_index=a.shard_index,
        num_shards=a.num_shards,
        strict=a.strict,
        max_reject_rate=a.max_reject_rate,
        allow_absolute_paths=a.allow_absolute_paths,
        max_image_bytes=a.max_image_bytes,
        max_image_pixels=a.max_image_pixels,
        video_frames=a.video_frames,
        geometry=geometry,
        select=a.select,
        select_min_score=a.select_min_score,
        select_max_score=a.select_max_score,
        progress=True,
    )


def main_meta(cfg) -> int:
    """An InternVL meta file: one dataset per entry under the output prefix (a directory), one
    summary line each, then the blend line (see megatron_sail/data/preprocess/internvl_meta.py)."""
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    if len(cfg.inputs) != 1:
        print("error: --format internvl_meta takes one meta file as --input", file=sys.stderr)
        return 2
    try:
        code, summaries = run_meta(
            dataclasses.replace(cfg, format=None), cfg.inputs[0], lambda c: run(c, log=log), log=log
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except WorkerDied as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except OutputWriteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 4
    for summary in summaries:
        print(json.dumps(summary))
        if "error" in summary:
            print(f"error: {summary.get('dataset', 'blend')}: {summary['error']}", file=sys.stderr)
    return code


def main(argv=None) -> int:
    cfg = parse_args(argv)
    if cfg.format == "internvl_meta" or (
        cfg.format is None and len(cfg.inputs) == 1 and is_meta_file(cfg.inputs[0])
    ):
        return main_meta(cfg)
    try:
        code, summary = run(cfg, log=lambda m: print(m, file=sys.stderr))
    except (ValueError, FileNotFoundError) as e:  # bad inputs or flags: one line, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except WorkerDied as e:  # a worker killed twice (OOM killer): one line naming the records
        print(f"error: {e}", file=sys.stderr)
        return 3
    except OutputWriteError as e:  # a full disk: one line naming the file, temporaries removed
        print(f"error: {e}", file=sys.stderr)
        return 4
    print(json.dumps(summary))
    if "error" in summary:
        print(f"error: {summary['error']}", file=sys.stderr)
    return code


if __name__ == "__main__":
    cli.run(main)
