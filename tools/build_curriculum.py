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
    p.add_argument("--scores", required=True, help="sidecar folder of tools/score_complexity.py")
    p.add_argument("--stages", type=int, required=True)
    p.add_argument("--split", nargs="+", default=["quantile"], metavar="quantile|thresholds T1,T2")
    p.add_argument("--mix-previous", type=float, default=0.0, help="replay fraction of earlier stages")
    p.add_argument("--order", default="ascending", choices=["ascending", "descending", "shuffled"])
    p.add_argument("--output", required=True, help="plan YAML")
    p.add_argument("--lists-dir", default=None, help="stage sample lists (default: PLAN_lists/ beside it)")
    p.add_argument("--prefix-dir", default=None, help="packed datasets (default: PLAN_packed/ beside it)")
    p.add_argument("--preprocess-flags", default="", help="appended to every preprocess command")
    p.add_argument("--total-iters", type=int, default=None, help="steps of the whole chain, split by share")
    p.add_argument("--trainer-stages", default=None, help="comma-separated trainer --stage per plan stage")
    p.add_argument("--method", default=None, help="use only this method's records of the sidecar")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--python", default="python", help="interpreter named in the commands")
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
