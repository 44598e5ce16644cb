"""The paper-claims study at toy scale (examples/reproduce_paper.sh; docs/sft_curriculum.md).

(a) one pretraining run on the demo set, scored on the demo benchmarks during training at
    geometrically spaced steps -> score = a + b ln(tokens) per benchmark and on the average;
(b) SFT from that checkpoint on nested random subsets of the graded SFT pool (levels 1-3), the
    same number of epochs each -> score against SFT quantity;
(c) SFT on the whole pool, the same steps (tokens) in every arm: one stage on the shuffled
    pool, a 3-stage curriculum in ascending complexity (tools/score_complexity.py scores,
    tools/build_curriculum.py stages), and the same stages descending; each for every seed;
    the difference to one-stage with a paired-bootstrap interval;
(d) SAIL-Caption's recaption-vs-original comparison (examples/sail_caption.sh's summary.json).

Every training run is a subprocess with a done mark (paper_runs.py): a rerun resumes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

from megatron_sail.demo.paper_data import StudyData, make_data, pool_levels, preprocess, subset_list
from megatron_sail.demo.paper_runs import ROOT, RunSpec, train, train_chain

GBS = 8
"""Rows per step of the tiny recipe."""


@dataclass
class StudyConfig:
    """Sizes and settings of one study."""

    out: str
    """Output folder (data, runs, report.md, report.json, figures)."""
    data: StudyData = field(default_factory=StudyData)
    """Data sizes."""
    pretrain_iters: int = 1024
    """Steps of the pretraining run."""
    eval_points: int = 7
    """In-training evaluations of the pretraining run: at iters / 2^k, k = eval_points-1 .. 0."""
    sft_epochs: float = 6.0
    """Epochs over its data of every SFT run (quantity runs and curriculum arms alike)."""
    seeds: tuple = (1, 2)
    """Training seeds of every curriculum arm."""
    quantities: tuple = (0.125, 0.25, 0.5)
    """Pool fractions of the quantity curve (the whole pool: the one-stage run of the first seed)."""
    method: str = "heuristic"
    """Complexity method (heuristic, or ifd with the pretrained checkpoint as reference)."""
    stages: int = 3
    """Curriculum stages."""
    replay: float = 0.5
    """The extra arm ``ascending_replay``: the ascending stages, stage k > 1 also replaying
    ``replay`` x |stage k| random samples of the earlier stages (build_curriculum --mix-previous),
    the same steps in total; 0: no such arm."""
    sft_lr: float = 5e-4
    """Constant SFT learning rate (no decay: chained stages and one stage see the same LR)."""
    caption_summary: Optional[str] = None
    """examples/sail_caption.sh's summary.json to report for claim 1."""
    run_caption: bool = False
    """Run examples/sail_caption.sh (into OUT/sail_caption) when there is no summary."""
    caption_smoke: bool = False
    """Run it with SMOKE=1."""
    resamples: int = 1000
    """Bootstrap resamples."""
    python: str = sys.executable
    """Interpreter of the subprocesses."""


def geometric_steps(iters: int, points: int) -> list[int]:
    """iters / 2^k for k = points-1 .. 1 (the final step is evaluated anyway)."""
    return sorted({max(1, iters >> k) for k in range(1, points)})


def sft_flags(cfg: StudyConfig) -> list[str]:
    return ["--lr", str(cfg.sft_lr), "--lr-decay-style", "constant", "--lr-warmup-iters", "0"]


def steps_for(rows: int, epochs: float) -> int:
    """Steps that cover ``rows`` packed rows ``epochs`` times."""
    return max(1, math.ceil(epochs * rows / GBS))


class _Clock:
    """Seconds per part of the study, logged as each part ends."""

    def __init__(self, log):
        self.log, self.timing, self.t0, self.start = log, {}, time.perf_counter(), time.perf_counter()

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.timing[name] = round(now - self.t0, 1)
        self.t0 = now
        self.log(f"[study] {name}: {self.timing[name]} s")


def run_study(cfg: StudyConfig, log: Callable[[str], None] = print) -> dict:
    """Run (or resume) every part and write the report; returns report.json's content."""
    from megatron_sail.curate.ablation_stats import BootstrapConfig
    from megatron_sail.demo import paper_report as rep

    clock = _Clock(log)
    out = cfg.out = os.path.abspath(cfg.out)  # recorded paths stay valid from any directory
    os.makedirs(out, exist_ok=True)
    data = make_data(out, cfg.data)
    pre = preprocess([data["pretrain"]], data["tokenizer"], os.path.join(out, "packed", "pretrain"))
    clock.mark("data")
    pre_run, start = pretrain(cfg, data, log)
    clock.mark("pretrain")
    scores_dir = os.path.join(out, "scores", cfg.method)
    records = score_pool(cfg, data["pool"], scores_dir, start)
    levels = pool_levels(data["pool"])
    rho = rep.spearman([r["score"] for r in records], [levels[r["key"]] for r in records])
    clock.mark("complexity")
    arms, plan, steps, pool_samples = curriculum_arms(cfg, data, records, scores_dir, start, log)
    for st in plan["stages"] + plan.get("replay_stages", []):  # generator levels of its new samples
        with open(st["list"]) as f:
            keys = [json.loads(line)["key"] for line in f]
        st["levels"] = {str(lv): sum(levels[k] == lv for k in keys) for lv in (1, 2, 3)}
    clock.mark("curriculum")
    qruns = {pool_samples: arms["one_stage"][0], **quantity_runs(cfg, data, records, start, log)}
    clock.mark("quantity")
    summary = cfg.caption_summary or (run_caption(cfg, log) if cfg.run_caption else None)
    clock.mark("caption")

    scorer = rep.LevelScorer(data["level_bench"])
    with open(os.path.join(pre_run, "metrics.jsonl")) as f:
        budget = 10.0 * max(json.loads(line).get("consumed_tokens", 0) for line in f)
    scaling = rep.scaling([pre_run], budget, os.path.join(out, "scaling.png"))
    quant = rep.quantity(qruns, scorer, os.path.join(out, "quantity.png"))
    cur = rep.curriculum(
        arms, scorer, os.path.join(out, "curriculum.png"), BootstrapConfig(cfg.resamples, 0.95, 0)
    )
    cap = rep.caption(summary, os.path.join(out, "caption.png"))
    clock.mark("report")
    clock.timing["total"] = round(time.perf_counter() - clock.start, 1)
    clock.timing["runs_recorded"] = recorded_seconds(os.path.join(out, "runs"))
    result = assemble(cfg, data, pre, scaling, quant, cur, cap, plan, steps, rho, budget, clock.timing)
    from megatron_sail.demo.paper_markdown import write_markdown

    write_json(os.path.join(out, "report.json"), result)
    write_markdown(os.path.join(out, "report.md"), result)
    return result


def pretrain(cfg: StudyConfig, data: dict, log) -> tuple[str, str]:
    """(a): one run from random weights, scored on the demo sets at geometric steps; returns
    (run dir, checkpoint folder)."""
    run = os.path.join(cfg.out, "runs", "pretrain")
    train(
        RunSpec(
            run,
            os.path.join(cfg.out, "packed", "pretrain"),
            cfg.pretrain_iters,
            seed=1234,
            benchmarks=data["pretrain_bench"],
            eval_at=geometric_steps(cfg.pretrain_iters, cfg.eval_points),
        ),
        cfg.python,
        log,
    )
    return run, os.path.join(run, "checkpoints")


def curriculum_arms(cfg: StudyConfig, data: dict, records: list, scores_dir: str, start: str, log):
    """(c): per seed, one stage on the pool, the packed stages ascending and descending, and (with
    ``cfg.replay``) ascending with replay, the same steps in total; returns ({arm: [final run dir
    per seed]}, plan, {total, per_stage[, replay_per_stage]}, samples in the pool)."""
    plan = make_plan(cfg, records, scores_dir, data["tokenizer"])
    rows = [s["rows"] for s in plan["stages"]]
    total = steps_for(sum(rows), cfg.sft_epochs)
    steps = {"total": total, "per_stage": split_steps(total, rows)}
    chains = [
        ("ascending", plan["stages"], steps["per_stage"]),
        ("descending", plan["stages"][::-1], steps["per_stage"][::-1]),
    ]
    if cfg.replay:
        rplan = make_plan(cfg, records, scores_dir, data["tokenizer"], mix_previous=cfg.replay)
        steps["replay_per_stage"] = split_steps(total, [s["rows"] for s in rplan["stages"]])
        plan["replay_stages"] = rplan["stages"]
        chains.append(("ascending_replay", rplan["stages"], steps["replay_per_stage"]))
    pool_prefix = os.path.join(cfg.out, "packed", "pool")
    pool = preprocess([data["pool"]], data["tokenizer"], pool_prefix, select=scores_dir)
    bench, base = data["level_bench"], os.path.join(cfg.out, "runs", "sft")
    arms: dict = {"one_stage": [], **{name: [] for name, _, _ in chains}}
    for seed in cfg.seeds:
        one = os.path.join(base, f"one_stage_s{seed}")
        train(RunSpec(one, pool_prefix, total, seed, start, bench, extra=sft_flags(cfg)), cfg.python, log)
        arms["one_stage"].append(one)
        for name, stages, per_stage in chains:
            chain = [
                RunSpec(
                    os.path.join(base, f"{name}_s{seed}", f"stage{k + 1}"),
                    st["prefix"],
                    n,
                    seed,
                    start if k == 0 else None,
                    bench if k == len(stages) - 1 else {},
                    extra=sft_flags(cfg),
                )
                for k, (st, n) in enumerate(zip(stages, per_stage))
            ]
            arms[name].append(train_chain(chain, cfg.python, log))
    return arms, plan, steps, pool["samples"]


def quantity_runs(cfg: StudyConfig, data: dict, records: list, start: str, log) -> dict:
    """(b): nested random subsets of the pool, the same epochs each; {samples: run dir}."""
    runs = {}
    for frac in cfg.quantities:
        lst = os.path.join(cfg.out, "lists", f"quantity_{frac:g}.jsonl")
        os.makedirs(os.path.dirname(lst), exist_ok=True)
        n = subset_list(records, frac, 7, lst)
        prefix = os.path.join(cfg.out, "packed", f"quantity_{frac:g}")
        summ = preprocess([data["pool"]], data["tokenizer"], prefix, select=lst)
        run = os.path.join(cfg.out, "runs", "quantity", f"n{n}")
        train(
            RunSpec(
                run,
                prefix,
                steps_for(summ["rows"], cfg.sft_epochs),
                cfg.seeds[0],
                start,
                data["level_bench"],
                extra=sft_flags(cfg),
            ),
            cfg.python,
            log,
        )
        runs[n] = run
    return runs


def score_pool(cfg: StudyConfig, pool: str, scores_dir: str, start: str) -> list[dict]:
    """Complexity scores of the pool (in this process; ifd loads the pretrained checkpoint)."""
    from megatron_sail.curate.complexity.runner import ScoreConfig, make_scorer, run_scoring
    from megatron_sail.curate.complexity.samples import InputConfig
    from megatron_sail.curate.complexity.sidecar import read_scores

    sc = ScoreConfig(
        InputConfig((pool,)),
        scores_dir,
        cfg.method,
        start if cfg.method != "heuristic" else "",
        samples_per_shard=2000,
        batch_size=64,
    )
    settings = {"max_tiles": 4} if cfg.method == "ifd" else {}
    run_scoring(sc, make_scorer(sc, settings), log=lambda m: None)
    return read_scores(scores_dir)


def make_plan(
    cfg: StudyConfig, records: list[dict], scores_dir: str, tok: str, mix_previous: float = 0.0
) -> dict:
    """The ascending plan (tools/build_curriculum.py's format, also written as plan.yaml, or
    plan_replay.yaml with ``mix_previous``), its stages packed (each stage's data: its blend);
    descending runs the same packed stages in reverse."""
    import yaml

    from megatron_sail.curate.curriculum import CurriculumConfig, PlanPaths, build_plan
    from megatron_sail.demo.paper_data import MAX_TILES, SEQ

    out = cfg.out
    tag = "_replay" if mix_previous else ""
    flags = f"--tokenizer {tok} --seq-length {SEQ} --recipe tiny --max-tiles {MAX_TILES}"
    plan = build_plan(
        records,
        CurriculumConfig(cfg.stages, order="ascending", mix_previous=mix_previous),
        PlanPaths(
            os.path.join(out, f"plan{tag}_lists"),
            os.path.join(out, "packed", f"stages{tag}"),
            sorted({r["source"] for r in records}),
            flags,
        ),
        {"scores": scores_dir, "method": cfg.method},
    )
    with open(os.path.join(out, f"plan{tag}.yaml"), "w") as f:
        yaml.safe_dump(plan, f, sort_keys=False, width=200)
    sources = sorted({r["source"] for r in records})
    stages = []
    for s in plan["stages"]:
        rows = sum(
            preprocess(sources, tok, s["prefixes"][part], select=s["lists"][part])["rows"]
            for part in s["lists"]
        )
        stages.append(
            {
                "name": s["name"],
                "prefix": s["blend"] if s["replayed"] else s["prefixes"]["new"],
                "list": s["lists"]["new"],
                "samples": s["samples"],
                "replayed": s["replayed"],
                "rows": rows,
                "score_min": s["score_min"],
                "score_max": s["score_max"],
            }
        )
    return {"stages": stages, "plan": os.path.join(out, f"plan{tag}.yaml")}


def split_steps(total: int, rows: list[int]) -> list[int]:
    """``total`` steps over the stages by their rows (same epochs each; the last takes the rest)."""
    out, left = [], total
    for k, r in enumerate(rows):
        s = left if k == len(rows) - 1 else max(1, round(total * r / sum(rows)))
        out.append(s)
        left -= s
    if out[-1] < 1:
        raise ValueError(f"cannot split {total} steps over stages of {rows} rows")
    return out


def run_caption(cfg: StudyConfig, log) -> Optional[str]:
    """examples/sail_caption.sh into OUT/sail_caption; its summary.json (None if it failed)."""
    out = os.path.join(cfg.out, "sail_caption")
    env = dict(os.environ, OUT=out, SMOKE="1" if cfg.caption_smoke else "0", PYTHON=cfg.python)
    with open(os.path.join(cfg.out, "sail_caption.log"), "w") as f:
        rc = subprocess.run(
            ["bash", "examples/sail_caption.sh"], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT
        ).returncode
    summary = os.path.join(out, "summary.json")
    if rc != 0 or not os.path.isfile(summary):
        log(f"[study] examples/sail_caption.sh failed (exit {rc}); see {cfg.out}/sail_caption.log")
        return None
    return summary


def recorded_seconds(runs_root: str) -> dict:
    """{part: seconds} summed over the done.json marks under each folder of ``runs_root``
    (pretrain, sft, quantity): what the training runs took when they ran, so a resumed study
    still reports them."""
    out = {}
    for part in sorted(os.listdir(runs_root)) if os.path.isdir(runs_root) else []:
        total = 0.0
        for d, _, files in os.walk(os.path.join(runs_root, part)):
            if "done.json" in files:
                with open(os.path.join(d, "done.json")) as f:
                    total += float(json.load(f).get("seconds", 0.0))
        out[part] = round(total, 1)
    return out


def write_json(path: str, value: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=1)
    os.replace(path + ".tmp", path)


def assemble(cfg, data, pre, scaling, quant, cur, cap, plan, steps, rho, budget, timing) -> dict:
    """report.json: the three required keys first, then the details."""
    fits = scaling["fits"]
    diff = cur["diff_vs_one_stage"]
    return {
        "scaling": {
            k: {
                "a": v["a"],
                "b": v["b"],
                "r2": v["r2"],
                "points": v["points"],
                "at_10x_tokens": v["at_budget"],
                "capped": v["capped"],
            }
            for k, v in fits.items()
        },
        "sft_quantity": {str(q): v["mean"] for q, v in quant.items()},
        "curriculum": {
            **{a: cur["mean"][a] for a in cur["mean"]},
            **{f"{a}_minus_one_stage": v for a, v in diff.items()},
        },
        "details": {
            "scaling_token_counts": scaling["token_counts"],
            "scaling_budget_tokens": budget,
            "pretrain_chance": data["pretrain_chance"],
            "level_chance": data["level_chance"],
            "sft_quantity_levels": {str(q): v["levels"] for q, v in quant.items()},
            "curriculum_levels": cur["levels"],
            "curriculum_per_seed": cur["per_seed"],
            "curriculum_steps": steps,
            "stages": plan["stages"],
            "replay_stages": plan.get("replay_stages", []),
            "complexity_method": cfg.method,
            "complexity_vs_level_spearman": rho,
            "caption": cap,
            "pretrain_rows": pre["rows"],
            "config": _config(cfg),
            "timing_s": timing,
        },
    }


def _config(cfg: StudyConfig) -> dict:
    d = asdict(cfg)
    d["seeds"], d["quantities"] = list(cfg.seeds), list(cfg.quantities)
    return d
