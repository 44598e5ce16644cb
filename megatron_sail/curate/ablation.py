"""The data-quality evaluation loop: train the same model on each candidate dataset for the
same token budget (same seed, same schedule), evaluate each checkpoint on the same benchmark
files with tools/evaluate.py, and rank the candidates with paired-bootstrap intervals.

Training and evaluation run as subprocesses (the trainer's and tools/evaluate.py's own CLIs),
so each candidate starts from a clean process and a crash of one names it; a candidate whose
checkpoint and results already exist is not retrained (rerun after a failure resumes)."""

from __future__ import annotations

import glob
import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Optional

from megatron_sail.curate.ablation_stats import BootstrapConfig, RankRow, paired_bootstrap, rank

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass
class AblationConfig:
    """One comparison of candidate datasets."""

    candidates: dict[str, str]
    """Name -> indexed-dataset prefix (tools/preprocess_data.py output)."""
    benchmarks: dict[str, str]
    """Benchmark name -> TSV path (names from the eval registry)."""
    tokens: int
    """Token budget per candidate: train iters = ceil(tokens / (seq_length * global_batch))."""
    out_dir: str
    """Per-candidate run dirs, eval results, the ranking JSON and PNG."""
    recipe: str = "tiny"
    """Trainer recipe."""
    stage: str = "pretrain-alignment"
    """Trainer stage."""
    seed: int = 1234
    """Training seed, the same for every candidate."""
    init_from: Optional[str] = None
    """Base checkpoint every candidate starts from (None: the recipe's random init)."""
    seq_length: Optional[int] = None
    """Row length (None: the recipe's); the datasets must be packed to it."""
    global_batch_size: Optional[int] = None
    """Rows per step (None: the recipe's)."""
    train_args: list[str] = field(default_factory=list)
    """Extra trainer flags, the same for every candidate."""
    eval_limit: Optional[int] = None
    """First N items of each benchmark."""
    bootstrap: BootstrapConfig = field(default_factory=BootstrapConfig)
    """Interval of the score differences."""
    python: str = sys.executable
    """Interpreter of the subprocesses."""
    launcher: list[str] = field(default_factory=list)
    """Training launcher (e.g. ``torchrun --nproc_per_node 8``); empty: ``python``."""


def train_iters(tokens: int, seq_length: int, global_batch: int) -> int:
    """Steps that consume the token budget (rows are packed to seq_length, so one step is
    seq_length * global_batch tokens, padding included)."""
    if tokens <= 0:
        raise ValueError(f"--tokens must be positive, got {tokens}")
    return max(1, math.ceil(tokens / (seq_length * global_batch)))


def schedule(cfg: AblationConfig) -> tuple[int, int, int]:
    """(seq_length, global_batch, iters) from the recipe and the overrides."""
    from megatron_sail.config.recipes import get_recipe

    run = get_recipe(cfg.recipe)(cfg.stage)
    seq = cfg.seq_length or run.data.seq_length
    gbs = cfg.global_batch_size or run.train.global_batch_size
    return seq, gbs, train_iters(cfg.tokens, seq, gbs)


def _run(cmd: list[str], log: str, what: str) -> None:
    """Run a step with its output in a log file; a failure names the step and the log."""
    with open(log, "w") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if r.returncode != 0:
        with open(log) as f:
            tail = f.read()[-2000:]
        raise RuntimeError(f"{what} failed (exit {r.returncode}); log {log}:\n{tail}")


def train_candidate(cfg: AblationConfig, name: str, prefix: str, iters: int, seq: int, gbs: int) -> str:
    """Train one candidate; returns its checkpoint folder (reused when already complete)."""
    run_dir = os.path.join(cfg.out_dir, name)
    ckpt = os.path.join(run_dir, "checkpoints")
    done = os.path.join(run_dir, "trained.json")
    if os.path.exists(done):
        return ckpt
    if os.path.isdir(ckpt):  # a run of ours that stopped before finishing: start it over
        shutil.rmtree(ckpt)
    os.makedirs(run_dir, exist_ok=True)
    cmd = [
        *(cfg.launcher or [cfg.python]),
        "-m",
        "megatron_sail.train",
        "--recipe",
        cfg.recipe,
        "--stage",
        cfg.stage,
        "--data-path",
        prefix,
        "--seq-length",
        str(seq),
        "--global-batch-size",
        str(gbs),
        "--train-iters",
        str(iters),
        "--seed",
        str(cfg.seed),
        "--eval-interval",
        "0",
        "--run-dir",
        run_dir,
        "--save",
        ckpt,
    ]
    if cfg.init_from:
        cmd += ["--init-from", cfg.init_from]
    _run(cmd + list(cfg.train_args), os.path.join(run_dir, "train.log"), f"training candidate {name}")
    with open(done + ".tmp", "w") as f:
        json.dump({"prefix": prefix, "iters": iters, "seq_length": seq, "global_batch_size": gbs}, f)
    os.replace(done + ".tmp", done)
    return ckpt


def evaluate_candidate(cfg: AblationConfig, name: str, ckpt: str) -> dict:
    """tools/evaluate.py on every benchmark; returns {benchmark: predictions TSV path}."""
    out = os.path.join(cfg.out_dir, name, "eval", "results.json")
    if not os.path.exists(out):
        cmd = [
            cfg.python,
            os.path.join(ROOT, "tools", "evaluate.py"),
            "--checkpoint",
            ckpt,
            "--out",
            out,
            "--benchmark",
            *[f"{b}={p}" for b, p in cfg.benchmarks.items()],
        ]
        if cfg.eval_limit:
            cmd += ["--limit", str(cfg.eval_limit)]
        _run(cmd, os.path.join(cfg.out_dir, name, "eval.log"), f"evaluating candidate {name}")
    with open(out) as f:
        results = json.load(f)["benchmarks"]
    return {b: results[b]["predictions"] for b in cfg.benchmarks}


def compare(cfg: AblationConfig, predictions: dict[str, dict[str, str]]) -> dict:
    """Scores per candidate and benchmark, the ranking by the mean over benchmarks, and for each
    candidate the paired-bootstrap interval of its difference to the best (items resampled per
    benchmark with the same indices for both, the mean over benchmarks recomputed)."""
    from megatron_sail.eval.prediction_files import canonical_index, read_predictions
    from megatron_sail.eval.registry import get_benchmark
    from megatron_sail.eval.tsv import read_items

    specs = {b: get_benchmark(b) for b in cfg.benchmarks}
    items = {b: read_items(p, cfg.eval_limit) for b, p in cfg.benchmarks.items()}

    def stored(b: str, path: str) -> dict:
        """index -> the prediction as evaluate.py stored it (already post-processed)."""
        by_canon = read_predictions(path)
        return {it.index: by_canon.get(canonical_index(it.index), "") for it in items[b]}

    preds = {c: {b: stored(b, path) for b, path in per.items()} for c, per in predictions.items()}

    def score(c: str, b: str, its: list) -> float:
        return specs[b].score(its, preds[c][b]).score

    per_bench = {c: {b: score(c, b, items[b]) for b in cfg.benchmarks} for c in preds}
    mean = {c: sum(v.values()) / len(v) for c, v in per_bench.items()}
    # one flat item list tagged by benchmark, resampled within each benchmark (stratified)
    tagged = [(b, it) for b in cfg.benchmarks for it in items[b]]

    def diff_ci(c: str, best: str) -> tuple[float, float, float]:
        def fn(sample: list) -> float:
            by_b: dict = {}
            for b, it in sample:
                by_b.setdefault(b, []).append(it)
            return sum(score(c, b, v) - score(best, b, v) for b, v in by_b.items()) / len(by_b)

        return stratified_bootstrap(tagged, fn, cfg.bootstrap)

    rows = rank(mean, diff_ci)
    return {"scores": per_bench, "mean": mean, "ranking": [r.__dict__ for r in rows], "rows": rows}


def stratified_bootstrap(tagged: list, fn, cfg: BootstrapConfig) -> tuple[float, float, float]:
    """paired_bootstrap with every benchmark resampled to its own size (each resample keeps
    each benchmark's item count, so one benchmark never vanishes from a resample)."""
    groups: dict = {}
    for t in tagged:
        groups.setdefault(t[0], []).append(t)
    if len(groups) == 1:
        return paired_bootstrap(tagged, fn, cfg)
    import random

    rng = random.Random(cfg.seed)
    draws = sorted(
        fn([g[rng.randrange(len(g))] for g in groups.values() for _ in g]) for _ in range(cfg.resamples)
    )
    alpha, last = (1.0 - cfg.confidence) / 2, len(draws) - 1
    return fn(tagged), draws[math.floor(alpha * last)], draws[math.ceil((1 - alpha) * last)]


def run_ablation(cfg: AblationConfig, progress=print) -> dict:
    """Train and evaluate every candidate, then compare; writes ranking.json and ranking.png."""
    from megatron_sail.curate.ablation_stats import format_table, plot_ranking, ranking_title

    if len(cfg.candidates) < 2:
        raise ValueError("give at least two --candidate NAME=PREFIX to compare")
    for name, prefix in cfg.candidates.items():
        if not glob.glob(glob.escape(prefix) + ".*"):
            raise FileNotFoundError(f"candidate {name}: no dataset at prefix {prefix}")
    for b, p in cfg.benchmarks.items():
        if not os.path.isfile(p):
            raise FileNotFoundError(f"benchmark {b}: no file {p}")
    seq, gbs, iters = schedule(cfg)
    progress(
        f"[ablation] {len(cfg.candidates)} candidates x {iters} steps ({seq} tokens x {gbs} rows = "
        f"{iters * seq * gbs} tokens each, budget {cfg.tokens}), seed {cfg.seed}"
    )
    os.makedirs(cfg.out_dir, exist_ok=True)
    predictions = {}
    for name, prefix in cfg.candidates.items():
        progress(f"[ablation] {name}: train on {prefix}")
        ckpt = train_candidate(cfg, name, prefix, iters, seq, gbs)
        progress(f"[ablation] {name}: evaluate")
        predictions[name] = evaluate_candidate(cfg, name, ckpt)
    result = compare(cfg, predictions)
    rows: list[RankRow] = result.pop("rows")
    table = format_table(
        rows,
        cfg.bootstrap.confidence,
        "mean over " + ", ".join(cfg.benchmarks) + "; diff interval: paired bootstrap over items, "
        f"{cfg.bootstrap.resamples} resamples, seed {cfg.bootstrap.seed}",
    )
    result.update(
        {
            "iters": iters,
            "seq_length": seq,
            "global_batch_size": gbs,
            "tokens": iters * seq * gbs,
            "seed": cfg.seed,
            "table": table,
        }
    )
    path = os.path.join(cfg.out_dir, "ranking.json")
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(path + ".tmp", path)
    plot_ranking(
        rows,
        os.path.join(cfg.out_dir, "ranking.png"),
        ranking_title(
            list(cfg.benchmarks),
            cfg.bootstrap.confidence,
            cfg.bootstrap.resamples,
            f"{cfg.recipe}, {iters * seq * gbs} tokens per candidate",
        ),
    )
    return result
