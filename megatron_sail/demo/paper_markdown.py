"""report.md of the paper-claims study: the tables of report.json, the figures, and what each
number means (written from the measurements; no number here is typed in)."""

from __future__ import annotations

import os


def _r2(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _replay_line(d: dict, cfgd: dict) -> list[str]:
    """The replay arm's stages (none when the study ran without one)."""
    rs = d.get("replay_stages") or []
    if not rs:
        return []
    return [
        "",
        f"`ascending_replay`: the same ascending stages, stage k > 1 also replaying "
        f"{cfgd['replay']:g} x its size of random samples of the earlier stages "
        "(tools/build_curriculum.py --mix-previous), the same steps in total: "
        + "; ".join(
            f"{st['name']} {st['samples']} + {st['replayed']} replayed, {n} steps"
            for st, n in zip(rs, d["curriculum_steps"]["replay_per_stage"])
        )
        + ".",
    ]


def write_markdown(path: str, r: dict) -> None:
    """Write the report (atomically)."""
    d = r["details"]
    cfgd = d["config"]
    lines = [
        "# SAIL-VL's claims at toy scale",
        "",
        f"Study output: `{cfgd['out']}`; this invocation took {d['timing_s']['total']} s (per part: "
        + ", ".join(
            f"{k} {v} s" for k, v in d["timing_s"].items() if isinstance(v, (int, float)) and k != "total"
        )
        + "); the training runs took, when they ran (their done.json, kept when a rerun resumes): "
        + ", ".join(f"{k} {v} s" for k, v in d["timing_s"].get("runs_recorded", {}).items())
        + ".",
        "",
        "## (a) Benchmark score against pretraining tokens",
        "",
        "One pretraining run on the demo set, scored during training at geometrically spaced steps "
        f"(token counts {', '.join(f'{t:.3g}' for t in d['scaling_token_counts'])}); fit "
        "score = a + b ln(tokens); the average is over scores normalized to 0-100.",
        "",
        "| benchmark | a | b | R^2 | points | at 10x the tokens | chance |",
        "|---|---|---|---|---|---|---|",
    ]
    for k, v in r["scaling"].items():
        chance = d["pretrain_chance"].get(k)
        lines.append(
            f"| {k} | {v['a']:.2f} | {v['b']:.3f} | {_r2(v['r2'])} | {v['points']} | "
            f"{v['at_10x_tokens']:.1f}{' (capped)' if v['capped'] else ''} | "
            f"{'' if chance is None else f'{chance:.1f}'} |"
        )
    lines += [
        "",
        "![scaling](scaling.png)",
        "",
        "## (b) SFT data quantity",
        "",
        f"SFT from the pretrained checkpoint on nested random subsets of the graded pool, "
        f"{cfgd['sft_epochs']:g} epochs each; mean accuracy over the three held-out level sets "
        f"(chance: {', '.join(f'{k} {v:.1f}' for k, v in d['level_chance'].items())}).",
        "",
        "| SFT samples | mean | " + " | ".join(next(iter(d["sft_quantity_levels"].values()))) + " |",
        "|---|---|" + "---|" * len(next(iter(d["sft_quantity_levels"].values()))),
    ]
    for q, v in r["sft_quantity"].items():
        lv = d["sft_quantity_levels"][q]
        lines.append(f"| {q} | {v:.1f} | " + " | ".join(f"{x:.1f}" for x in lv.values()) + " |")
    cur = r["curriculum"]
    arms = [a for a in cur if not a.endswith("_minus_one_stage")]
    lines += [
        "",
        "![quantity](quantity.png)",
        "",
        "## (c) Curriculum against one-stage SFT",
        "",
        f"The whole pool, {d['curriculum_steps']['total']} steps in every arm (stages: "
        f"{d['curriculum_steps']['per_stage']}), seeds {cfgd['seeds']}, complexity method "
        f"`{d['complexity_method']}` (Spearman correlation of its score with the generator's level: "
        f"{d['complexity_vs_level_spearman']:.3f}). Differences: paired bootstrap over the level "
        f"items ({cfgd['resamples']} resamples, 95%).",
        "",
        "Stages of the ascending plan (descending runs them in reverse): "
        + "; ".join(
            f"{st['name']} scores {st['score_min']:.2f}-{st['score_max']:.2f}, {st['samples']} samples "
            f"(levels 1/2/3: {'/'.join(str(v) for v in st.get('levels', {}).values())}), "
            f"{n} steps"
            for st, n in zip(d["stages"], d["curriculum_steps"]["per_stage"])
        )
        + ".",
        *_replay_line(d, cfgd),
        "",
        "| arm | mean | per seed | " + " | ".join(next(iter(d["curriculum_levels"].values()))) + " |",
        "|---|---|---|" + "---|" * len(next(iter(d["curriculum_levels"].values()))),
    ]
    for a in arms:
        lines.append(
            f"| {a} | {cur[a]:.2f} | {', '.join(f'{x:.1f}' for x in d['curriculum_per_seed'][a])} | "
            + " | ".join(f"{x:.1f}" for x in d["curriculum_levels"][a].values())
            + " |"
        )
    lines.append("")
    for a in arms:
        c = cur.get(f"{a}_minus_one_stage")
        if c:
            verdict = (
                "better (the interval excludes 0)"
                if c["ci_low"] > 0
                else "worse (the interval excludes 0)"
                if c["ci_high"] < 0
                else "not distinguishable from one-stage (the interval contains 0)"
            )
            lines.append(
                f"- {a} minus one-stage: {c['diff']:+.2f} points, 95% CI "
                f"[{c['ci_low']:+.2f}, {c['ci_high']:+.2f}]: {verdict}."
            )
    lines += [
        "",
        "![curriculum](curriculum.png)",
        "",
        "## (d) Recaptioned data against the original text",
        "",
    ]
    cap = d["caption"]
    if cap:
        f1 = cap["caption_word_f1"]
        lines += [
            f"From `{cap['source']}`: held-out caption word F1, recaptioned+filtered "
            f"{f1['recaptioned']:.1f} vs original text {f1['original']:.1f}, gain {cap['gain']:+.1f} "
            f"(95% CI [{cap['gain_ci95'][0]:+.1f}, {cap['gain_ci95'][1]:+.1f}]).",
            "",
            "![caption](caption.png)",
        ]
    else:
        lines += [
            "Not run here: give `CAPTION_SUMMARY=runs/sail_caption/summary.json` (from "
            "`bash examples/sail_caption.sh`) or `CAPTION=1` to run it."
        ]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, path)
