#!/usr/bin/env python
"""Build an SFT curriculum from complexity scores (docs/sft_curriculum.md): K stages by score,
their sample lists, the preprocess commands that pack them, the blends, and the stage chain.

  python tools/build_curriculum.py --scores scores/heur --stages 3 --output plan.yaml \
      [--split quantile | --split thresholds 1.5,2.5] [--mix-previous 0.1] \
      [--order ascending|descending|shuffled] [--total-iters 3000] \
      [--preprocess-flags "--tokenizer tok.json --seq-length 16384 --recipe sail_8b"]
  PLAN=plan.yaml bash examples/sft_sail_8b.sh        # trains the chain

Writes the plan (YAML) and, next to it (--lists-dir), one sample list per stage
(stageK.jsonl, stageK_replay.jsonl with --mix-previous); tools/preprocess_data.py --select reads
them. Packed prefixes go under --prefix-dir. Prints one line per stage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_sail import cli  # noqa: E402


def _split(values: list[str]) -> tuple[str, tuple]:
    kind = values[0]
    if kind == "quantile" and len(values) == 1:
        return kind, ()
    if kind == "thresholds" and len(values) == 2:
        try:
            return kind, tuple(float(t) for t in values[1].split(","))
        except ValueError:
            pass
    raise SystemExit(
        f"build_curriculum.py: --split {' '.join(values)}: expected 'quantile' or 'thresholds T1,T2,...'"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--scores",
        required=True,
        metavar="DIR",
        help="sidecar folder of tools/score_complexity.py (required)",
    )
    p.add_argument("--stages", type=int, required=True, metavar="K", help="number of stages (required)")
    p.add_argument(
        "--split",
        nargs="+",
        default=["quantile"],
        metavar="SPLIT",
        help="quantile (equal-count stages) or thresholds T1,T2,... (K-1 increasing scores); default quantile",
    )
    p.add_argument(
        "--mix-previous",
        type=float,
        default=0.0,
        metavar="F",
        help="replay F x |stage| samples of earlier stages (0.0)",
    )
    p.add_argument(
        "--order",
        default="ascending",
        choices=["ascending", "descending", "shuffled"],
        help="stage order: ascending (easy to hard), descending, shuffled (random stages of the same sizes); default ascending",
    )
    p.add_argument("--output", required=True, metavar="PLAN", help="plan YAML to write (required)")
    p.add_argument(
        "--lists-dir", default=None, metavar="DIR", help="stage sample lists (default: PLAN_lists/ beside it)"
    )
    p.add_argument(
        "--prefix-dir", default=None, metavar="DIR", help="packed datasets (default: PLAN_packed/ beside it)"
    )
    p.add_argument(
        "--preprocess-flags", default="", metavar="FLAGS", help="appended to every preprocess command (none)"
    )
    p.add_argument(
        "--total-iters",
        type=int,
        default=None,
        metavar="N",
        help="steps of the whole chain, split by share (default: none in the plan)",
    )
    p.add_argument(
        "--trainer-stages",
        default=None,
        metavar="S1,S2,...",
        help="trainer --stage per plan stage (default: sft-knowledge, sft-instruction, last sft-preference)",
    )
    p.add_argument(
        "--method",
        default=None,
        metavar="NAME",
        help="use only this method's records of the sidecar (default: all)",
    )
    p.add_argument(
        "--seed", type=int, default=1234, metavar="N", help="seed of shuffling and replay draws (1234)"
    )
    p.add_argument(
        "--python", default="python", metavar="EXE", help="interpreter named in the commands (python)"
    )
    a = p.parse_args(argv)
    import yaml

    from megatron_sail.curate.complexity.sidecar import read_scores
    from megatron_sail.curate.curriculum import CurriculumConfig, PlanPaths, build_plan

    split, thresholds = _split(a.split)
    stem = os.path.splitext(os.path.abspath(a.output))[0]
    try:
        records = read_scores(a.scores, a.method)
        manifest = {}
        if os.path.isfile(os.path.join(a.scores, "complexity.json")):
            with open(os.path.join(a.scores, "complexity.json")) as f:
                manifest = json.load(f)
        cfg = CurriculumConfig(
            a.stages,
            split,
            thresholds,
            a.order,
            a.mix_previous,
            a.seed,
            a.total_iters,
            tuple(a.trainer_stages.split(",")) if a.trainer_stages else (),
        )
        paths = PlanPaths(
            a.lists_dir or stem + "_lists",
            a.prefix_dir or stem + "_packed",
            sorted({r["source"] for r in records}),
            a.preprocess_flags,
            manifest.get("image_root"),
            manifest.get("format"),
            a.python,
        )
        plan = build_plan(
            records,
            cfg,
            paths,
            {"scores": os.path.abspath(a.scores), "method": manifest.get("method", a.method)},
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"build_curriculum.py: error: {e}", file=sys.stderr)
        return 2
    tmp = a.output + ".tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(plan, f, sort_keys=False, width=200)
    os.replace(tmp, a.output)
    for s in plan["stages"]:
        print(
            f"{s['name']} ({s['trainer_stage']}): {s['samples']} samples + {s['replayed']} replayed, "
            f"scores {s['score_min']:.4g}..{s['score_max']:.4g}, share {s['share']:.3f}"
            + (f", {s['iters']} steps" if "iters" in s else "")
        )
    print(f"plan: {a.output}")
    return 0


if __name__ == "__main__":
    cli.run(main)
