"""Our scores equal VLMEvalKit's on the same predictions files.

The oracle is VLMEvalKit's own code: tools/vlmevalkit_oracle.py ran its unmodified ``evaluate``
(judge ``exact_matching``) on the predictions files in tests/unit/fixtures/vlmevalkit/ (.xlsx and
.tsv as VLMEvalKit's inference writes them, and the .tsv our evaluate.py writes) and stored the
scores and per-item verdicts in expected.json with VLMEvalKit's commit hash (regenerate.md says
how). Each case holds the hard answer forms of its benchmark kind: trailing punctuation and
whitespace, percent signs, letter vs option text, two letters, refusals, circular groups (both
grouping forms, a question whose main row is missing), MME image pairs, MMMU's dev and
validation splits and open questions."""

import json
import os

import pytest

from megatron_sail.eval.registry import get_benchmark
from megatron_sail.eval.runner import score_predictions

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "vlmevalkit")
with open(os.path.join(HERE, "expected.json")) as _f:
    EXPECTED = json.load(_f)
TOL = 0.01


def _name(dataset: str, case: dict) -> str:
    """VLMEvalKit's dataset name where it is one of ours, else our name (a custom set)."""
    try:
        get_benchmark(dataset)
        return dataset
    except ValueError:
        return case["ours"]


def _verdict(value) -> float:
    """A stored per-item verdict as a number (yes/no sets store the extracted word too)."""
    return float(value["score"]) if isinstance(value, dict) else float(value)


def _sub_scores(kind: str, s, m: dict) -> list[tuple[str, float, float | None]]:
    """(what, ours, VLMEvalKit's) for the sub-scores VLMEvalKit reports."""
    d = s.details
    out = []
    if kind == "pope":
        for split, row in m.items():
            mine = d["overall"] if split == "Overall" else d["categories"][split]
            out += [
                (f"{split} {k}", mine[o], row[k])
                for k, o in (
                    ("Overall", "f1"),
                    ("acc", "acc"),
                    ("precision", "precision"),
                    ("recall", "recall"),
                )
            ]
    elif kind == "mme":
        out += [
            ("perception", d["perception"], m["perception"]),
            ("reasoning", d["cognition"], m["reasoning"]),
        ]
        out += [
            (c, d["categories"][c]["score"], v) for c, v in m.items() if c not in ("perception", "reasoning")
        ]
    elif kind == "hallusionbench":
        for split, row in m.items():
            mine = d if split == "Overall" else (d["categories"].get(split) or d["l2_categories"][split])
            out += [(f"{split} {k}", mine[k], row[k]) for k in ("aAcc", "fAcc", "qAcc")]
    elif kind == "ocrbench":
        out += [
            (g, d["groups"].get(g, 0), v)
            for g, v in m.items()
            if g not in ("Final Score", "Final Score Norm")
        ]
        out.append(("Final Score Norm", d["final_score_norm"], m["Final Score Norm"]))
    elif get_benchmark(kind).kind == "mcq":
        for split, row in m.items():
            mine = d if split == "none" else d["splits"][split]
            cats = {**mine.get("categories", {}), **mine.get("l2_categories", {})}
            overall = s.score if split == "none" else mine["overall"]
            out.append((f"{split} Overall", overall, 100 * row["Overall"]))
            out += [
                (f"{split} {c}", cats.get(c), None if v is None else 100 * v)
                for c, v in row.items()
                if c not in ("Overall", "nan")
            ]
    else:
        groups = d.get("splits") or d.get("categories", {})
        out += [(k, s.score if k == "Overall" else groups.get(k), v) for k, v in m.items()]
    return out


@pytest.mark.parametrize("dataset", sorted(EXPECTED["cases"]))
@pytest.mark.parametrize("fmt", ["_pred.xlsx", "_pred.tsv", "_ours.tsv"])
def test_scores_equal_vlmevalkit(dataset, fmt):
    case = EXPECTED["cases"][dataset]
    name = _name(dataset, case)
    s = score_predictions(
        get_benchmark(name), os.path.join(HERE, f"{dataset}.tsv"), os.path.join(HERE, dataset + fmt)
    )
    assert s.score == pytest.approx(case["headline"], abs=TOL), (
        f"{name}: ours {s.score}, VLMEvalKit {case['headline']} (commit {EXPECTED['vlmevalkit_commit']})"
    )
    wrong = {
        i: (s.per_item.get(i), _verdict(v))
        for i, v in case["items"].items()
        if s.per_item.get(i) is None or abs(s.per_item[i] - _verdict(v)) > TOL
    }
    assert not wrong, f"{name}: per-item verdicts differ (ours, VLMEvalKit's): {wrong}"
    assert set(s.per_item) == set(case["items"])
    for what, ours, theirs in _sub_scores(case["ours"], s, case["metrics"]):
        if theirs is None:  # a category absent from a split: NaN there, absent here
            assert ours is None, what
        else:
            assert ours == pytest.approx(theirs, abs=TOL), f"{name}: {what}"


@pytest.fixture(scope="module")
def evaluate_tool():
    """tools/evaluate.py as a module, its main() run in-process."""
    import evaluate

    return evaluate


@pytest.mark.parametrize("fmt", ["_pred.xlsx", "_pred.tsv"])
def test_evaluate_prints_vlmevalkits_score(evaluate_tool, capsys, fmt):
    """The command line's last line, for every case, under VLMEvalKit's dataset name."""
    for dataset, case in sorted(EXPECTED["cases"].items()):
        name = _name(dataset, case)
        code = evaluate_tool.main(
            [
                "--benchmark",
                f"{name}={os.path.join(HERE, dataset)}.tsv",
                "--predictions",
                os.path.join(HERE, dataset + fmt),
            ]
        )
        out = capsys.readouterr().out.strip().splitlines()[-1]
        assert code == 0 and out.startswith(f"benchmark={name} score="), out
        printed = float(out.split("score=")[1].split()[0])
        assert printed == pytest.approx(case["headline"], abs=TOL), (dataset, out)
