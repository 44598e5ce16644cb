"""SFT curricula from complexity scores (tools/build_curriculum.py, docs/sft_curriculum.md).

The scored samples are split into K stages by score: equal-count quantiles, or thresholds
T1 < T2 < ... (stage k holds T_{k-1} <= score < T_k). ``order`` says which stage trains first:
ascending (easy to hard, SAIL-VL's curriculum), descending (the reverse control), or shuffled
(the same stage sizes, samples drawn at random: the no-curriculum control; with K=1 it is
one-stage training on everything). ``mix_previous`` F replays earlier stages: stage k also gets
a random F x |stage k| of the samples of stages 1..k-1 (as many as exist), as its own dataset in
the blend, weighted by sample count.

The plan (YAML) lists per stage its sample lists (JSONL of source/key/score, what
``tools/preprocess_data.py --select`` reads), the packed prefixes the preprocess commands write,
the blend, the trainer stage, the share of all samples and, with a total step budget, the steps;
then the stage chain (each stage starting from the previous one's weights).
examples/sft_sail_8b.sh runs it with ``PLAN=plan.yaml``."""

from __future__ import annotations

import json
import os
import random
import shlex
from dataclasses import dataclass, field
from typing import Optional

ORDERS = ("ascending", "descending", "shuffled")
SPLITS = ("quantile", "thresholds")


@dataclass(frozen=True)
class CurriculumConfig:
    """How scored samples become stages."""

    stages: int = 3
    """K, the number of stages."""
    split: str = "quantile"
    """quantile (equal counts) or thresholds."""
    thresholds: tuple = ()
    """K-1 increasing score thresholds (split=thresholds)."""
    order: str = "ascending"
    """ascending, descending or shuffled."""
    mix_previous: float = 0.0
    """Replay fraction of earlier stages (relative to the stage's own size)."""
    seed: int = 1234
    """Seed of shuffling and replay draws."""
    total_iters: Optional[int] = None
    """Step budget of the whole chain, split over stages by sample share (None: not planned)."""
    trainer_stages: tuple = ()
    """Trainer --stage per plan stage (default: sft-knowledge, sft-instruction ..., sft-preference)."""

    def __post_init__(self) -> None:
        if self.stages < 1:
            raise ValueError(f"--stages must be >= 1, got {self.stages}")
        if self.split not in SPLITS:
            raise ValueError(f"--split must be quantile or thresholds, got {self.split!r}")
        if self.order not in ORDERS:
            raise ValueError(f"--order must be one of {', '.join(ORDERS)}, got {self.order!r}")
        if self.split == "thresholds":
            t = list(self.thresholds)
            if len(t) != self.stages - 1 or any(b <= a for a, b in zip(t, t[1:])):
                raise ValueError(f"--split thresholds needs {self.stages - 1} increasing thresholds, got {t}")
        if not 0.0 <= self.mix_previous <= 1.0:
            raise ValueError(f"--mix-previous must be in [0, 1], got {self.mix_previous}")
        if self.trainer_stages and len(self.trainer_stages) != self.stages:
            raise ValueError(f"{len(self.trainer_stages)} trainer stages for {self.stages} plan stages")


def default_trainer_stages(k: int) -> list[str]:
    """SAIL-VL's SFT stage names over K plan stages: knowledge first, preference last,
    instruction between."""
    if k == 1:
        return ["sft-knowledge"]
    return ["sft-knowledge"] + ["sft-instruction"] * (k - 2) + ["sft-preference"]


def split_by_score(records: list[dict], cfg: CurriculumConfig) -> list[list[dict]]:
    """Groups of records from lowest to highest score (ties broken by source and key, so the
    split is deterministic)."""
    ranked = sorted(records, key=lambda r: (float(r["score"]), r["source"], r["key"]))
    if cfg.split == "thresholds":
        groups: list[list[dict]] = [[] for _ in range(cfg.stages)]
        for r in ranked:
            groups[sum(float(r["score"]) >= t for t in cfg.thresholds)].append(r)
        return groups
    n, k = len(ranked), cfg.stages
    return [ranked[i * n // k : (i + 1) * n // k] for i in range(k)]


def ordered_stages(records: list[dict], cfg: CurriculumConfig) -> list[list[dict]]:
    """The stages in training order (see the module docstring)."""
    groups = split_by_score(records, cfg)
    if cfg.order == "descending":
        return groups[::-1]
    if cfg.order == "shuffled":
        pool = sorted(records, key=lambda r: (r["source"], r["key"]))
        random.Random(cfg.seed).shuffle(pool)
        sizes, out, start = [len(g) for g in groups], [], 0
        for s in sizes:
            out.append(pool[start : start + s])
            start += s
        return out
    return groups


def replay(stages: list[list[dict]], fraction: float, seed: int) -> list[list[dict]]:
    """Per stage, the replayed samples of earlier stages (empty for the first)."""
    rng = random.Random(seed + 1)
    out: list[list[dict]] = [[]]
    for k in range(1, len(stages)):
        earlier = [r for s in stages[:k] for r in s]
        n = min(len(earlier), round(fraction * len(stages[k])))
        out.append(rng.sample(earlier, n) if n else [])
    return out


def write_list(path: str, records: list[dict]) -> None:
    """A sample list (source, key, score), written atomically."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for r in records:
            f.write(json.dumps({"source": r["source"], "key": r["key"], "score": r["score"]}) + "\n")
    os.replace(tmp, path)


@dataclass
class PlanPaths:
    """Where the plan's files go and how preprocessing is called."""

    out_dir: str
    """Folder of the sample lists."""
    prefix_dir: str
    """Folder of the packed datasets the preprocess commands write."""
    inputs: list = field(default_factory=list)
    """Input files of the scored samples."""
    preprocess_flags: str = ""
    """Extra flags of every preprocess command (tokenizer, row length, tiling)."""
    image_root: Optional[str] = None
    """--image-root of the preprocess commands."""
    format: Optional[str] = None
    """--format of the preprocess commands."""
    python: str = "python"
    """Interpreter named in the commands."""


def preprocess_command(paths: PlanPaths, select: str, prefix: str) -> str:
    """The preprocessing of one sample list."""
    cmd = [
        paths.python,
        "tools/preprocess_data.py",
        "--input",
        *paths.inputs,
        "--select",
        select,
        "--output-prefix",
        prefix,
    ]
    if paths.image_root:
        cmd += ["--image-root", paths.image_root]
    if paths.format:
        cmd += ["--format", paths.format]
    return " ".join(shlex.quote(c) for c in cmd) + (
        " " + paths.preprocess_flags if paths.preprocess_flags else ""
    )


def build_plan(
    records: list[dict], cfg: CurriculumConfig, paths: PlanPaths, meta: Optional[dict] = None
) -> dict:
    """Write the stage lists and return the plan (see the module docstring)."""
    if not records:
        raise ValueError("no scored samples")
    os.makedirs(paths.out_dir, exist_ok=True)
    stages = ordered_stages(records, cfg)
    replays = replay(stages, cfg.mix_previous, cfg.seed)
    names = list(cfg.trainer_stages) or default_trainer_stages(cfg.stages)
    total = sum(len(s) + len(r) for s, r in zip(stages, replays))
    plan_stages, iters_left = [], cfg.total_iters
    for k, (own, rep) in enumerate(zip(stages, replays), 1):
        name = f"stage{k}"
        lists = {"new": os.path.join(paths.out_dir, f"{name}.jsonl")}
        write_list(lists["new"], own)
        prefixes = {"new": os.path.join(paths.prefix_dir, name)}
        if rep:
            lists["replay"] = os.path.join(paths.out_dir, f"{name}_replay.jsonl")
            write_list(lists["replay"], rep)
            prefixes["replay"] = os.path.join(paths.prefix_dir, f"{name}_replay")
        n = len(own) + len(rep)
        blend = (
            " ".join(f"{c / n:.6g} {prefixes[p]}" for p, c in (("new", len(own)), ("replay", len(rep))) if c)
            if n
            else ""
        )
        scores = [float(r["score"]) for r in own]
        entry = {
            "name": name,
            "trainer_stage": names[k - 1],
            "samples": len(own),
            "replayed": len(rep),
            "share": round(n / total, 6),
            "score_min": min(scores) if scores else None,
            "score_max": max(scores) if scores else None,
            "lists": lists,
            "prefixes": prefixes,
            "blend": blend,
            "preprocess": [preprocess_command(paths, lists[p], prefixes[p]) for p in lists],
        }
        if cfg.total_iters is not None:  # the last stage takes the rounding remainder
            steps = iters_left if k == cfg.stages else max(1, round(cfg.total_iters * n / total))
            iters_left -= steps
            entry["iters"] = steps
        plan_stages.append(entry)
    empty = [s["name"] for s in plan_stages if not s["samples"]]
    if empty:
        raise ValueError(
            f"stages {', '.join(empty)} hold no sample (thresholds outside the scores, or "
            f"fewer samples than stages)"
        )
    chain, prev = [], "INIT_FROM"
    for s in plan_stages:
        chain.append(
            {
                "stage": s["name"],
                "trainer_stage": s["trainer_stage"],
                "data_path": s["blend"],
                "init_from": prev,
                "iters": s.get("iters"),
            }
        )
        prev = s["name"]
    return {
        "curriculum": {
            "stages": cfg.stages,
            "split": cfg.split,
            "thresholds": list(cfg.thresholds),
            "order": cfg.order,
            "mix_previous": cfg.mix_previous,
            "seed": cfg.seed,
            "total_iters": cfg.total_iters,
            "samples": len(records),
            **(meta or {}),
        },
        "stages": plan_stages,
        "chain": chain,
    }


def stage_iters(plan: dict, total: int) -> list[int]:
    """Steps per stage of a plan for a total budget (by sample share; the last takes the
    remainder) - the same split build_plan makes with total_iters."""
    out, left = [], total
    for k, s in enumerate(plan["stages"]):
        steps = left if k == len(plan["stages"]) - 1 else max(1, round(total * s["share"]))
        out.append(steps)
        left -= steps
    return out


__all__ = [
    "CurriculumConfig",
    "PlanPaths",
    "build_plan",
    "default_trainer_stages",
    "ordered_stages",
    "split_by_score",
    "stage_iters",
]
