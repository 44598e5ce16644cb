"""Data of the paper-claims study (examples/reproduce_paper.sh, docs/sft_curriculum.md): the
pretraining demo set, the graded SFT pool, their benchmarks, one tokenizer for all, and
in-process preprocessing (what tools/preprocess_data.py does, without a process start per
dataset)."""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass
from typing import Optional

from megatron_sail.demo import generator as demo
from megatron_sail.demo import graded

SEQ = 256
"""Row length of the tiny recipe."""
MAX_TILES = 4
"""Tiles per image (the quickstart's geometry)."""


@dataclass(frozen=True)
class StudyData:
    """Sizes of the study's data."""

    pretrain_samples: int = 4000
    """Demo conversations of the pretraining set (captions and questions about one shape group)."""
    sft_per_level: int = 1200
    """Graded SFT pool samples per level."""
    bench_items: int = 100
    """Items per benchmark set (demo pope/mcq/ocr and each level)."""
    seed: int = 1234
    """Seed of the generators."""


def make_data(out: str, cfg: StudyData) -> dict:
    """Write everything under ``out``/data (kept when done.json exists); returns the paths."""
    root = os.path.join(out, "data")
    done = os.path.join(root, "done.json")
    if os.path.isfile(done):
        with open(done) as f:
            info = json.load(f)
        if info.get("config", asdict(cfg)) != asdict(cfg):
            raise ValueError(
                f"{done}: the study's data was made with other sizes ({info['config']}, now "
                f"{asdict(cfg)}); use another --out or delete the folder"
            )
        return info
    os.makedirs(root, exist_ok=True)
    rng = random.Random(cfg.seed)
    texts = demo.write_split(
        root,
        "pretrain",
        cfg.pretrain_samples,
        rng,
        demo.DemoConfig(samples=cfg.pretrain_samples, seed=cfg.seed),
    )
    pool = graded.write_pool(root, graded.GradedConfig(cfg.sft_per_level, cfg.bench_items, cfg.seed))
    levels = graded.write_level_benchmarks(
        os.path.join(root, "bench", "levels"),
        graded.GradedConfig(cfg.sft_per_level, cfg.bench_items, cfg.seed),
    )
    from megatron_sail.demo.benchmarks import DemoBenchConfig, write_demo_benchmarks

    pre_bench = write_demo_benchmarks(
        os.path.join(root, "bench", "pretrain"), DemoBenchConfig(items=cfg.bench_items)
    )
    tok = os.path.join(root, "tokenizer.json")
    demo.train_tokenizer(texts + pool["texts"], tok)
    info = {
        "config": asdict(cfg),
        "root": root,
        "pretrain": os.path.join(root, "pretrain.jsonl"),
        "pool": pool["path"],
        "pool_samples": pool["samples"],
        "tokenizer": tok,
        "pretrain_bench": {k: v["path"] for k, v in pre_bench.items()},
        "pretrain_chance": {k: v["chance"] for k, v in pre_bench.items()},
        "level_bench": {k: v["path"] for k, v in levels.items()},
        "level_chance": {k: v["chance"] for k, v in levels.items()},
    }
    with open(done + ".tmp", "w") as f:
        json.dump(info, f, indent=1)
    os.replace(done + ".tmp", done)
    return info


def preprocess(inputs: list[str], tokenizer: str, prefix: str, select: Optional[str] = None) -> dict:
    """Pack ``inputs`` (only the records of the ``select`` list, when given) into ``prefix`` with
    the tiny recipe's geometry; returns the summary (kept when the dataset already exists)."""
    from megatron_sail.config.data import PackingConfig, PreprocessConfig
    from megatron_sail.data.geometry import resolve_tiling
    from megatron_sail.data.preprocess.pipeline import run
    from megatron_sail.data.tiling import TilingConfig

    if os.path.isfile(prefix + ".summary.json"):
        with open(prefix + ".summary.json") as f:
            return json.load(f)
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    tile, per_tile, geometry = resolve_tiling("tiny", None, None, None)
    cfg = PreprocessConfig(
        inputs=list(inputs),
        output_prefix=prefix,
        tokenizer=tokenizer,
        tiling=TilingConfig(tile, 1, MAX_TILES, True, per_tile),
        packing=PackingConfig(SEQ, 4096, 1234),
        geometry=geometry,
        select=select,
    )
    code, summary = run(cfg, log=lambda m: None)
    if code != 0:
        raise RuntimeError(f"preprocessing {prefix} failed: {summary.get('error')}")
    with open(prefix + ".summary.json.tmp", "w") as f:
        json.dump(summary, f)
    os.replace(prefix + ".summary.json.tmp", prefix + ".summary.json")
    return summary


def pool_levels(pool: str) -> dict[str, int]:
    """{key ('line N'): level} of the SFT pool (for the complexity-vs-level check)."""
    out = {}
    with open(pool) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                out[f"line {n}"] = int(json.loads(line)["level"])
    return out


def subset_list(records: list[dict], fraction: float, seed: int, path: str) -> int:
    """A random ``fraction`` of the scored pool as a sample list (nested: a smaller fraction
    with the same seed is a prefix of a larger one); returns its size."""
    order = sorted(records, key=lambda r: (r["source"], r["key"]))
    random.Random(seed).shuffle(order)
    n = max(1, round(fraction * len(order)))
    with open(path + ".tmp", "w") as f:
        for r in order[:n]:
            f.write(json.dumps({"source": r["source"], "key": r["key"], "score": r["score"]}) + "\n")
    os.replace(path + ".tmp", path)
    return n
