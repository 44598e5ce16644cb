"""tools/evaluate.py at its door: every unusable input is one line `error: ...` naming the file
(and line or rows) with exit status 2, never a traceback; bad items (unusable images, letters
outside the options, empty answers) are scored, counted and listed while the benchmark goes on;
SAIL-VL's answer post-processing applies to generated answers, never to a stored file."""

import base64
import io
import os
import shutil
import struct
import subprocess
import sys
import zlib

import pytest
from PIL import Image

from megatron_sail.eval.registry import get_benchmark
from megatron_sail.eval.runner import RunnerConfig, run_benchmark, score_predictions
from megatron_sail.eval.tsv import write_tsv
from testkit import ROOT, subprocess_env

FIXTURES = os.path.join(ROOT, "tests", "unit", "fixtures", "vlmevalkit")


def png_b64(colour="red") -> str:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def huge_png_b64(width=40_000, height=30_000) -> str:
    """A valid-looking PNG whose header claims 1.2 gigapixels (a few dozen bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )
    return base64.b64encode(data).decode()


class FakeModel:
    """generate(requests) -> answers looked up by the question in the prompt; counts requests."""

    def __init__(self, answers: dict):
        self.answers, self.asked = answers, []

    def __call__(self, requests):
        from megatron_sail.inference import GenerationResult

        out = []
        for r in requests:
            q = next(q for q in self.answers if q in r.prompt)
            self.asked.append(q)
            out.append(GenerationResult(text=self.answers[q], token_ids=[], prompt_ids=[]))
        return out


def run_cli(*args):
    """tools/evaluate.py in a subprocess: (exit status, stdout, stderr)."""
    p = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "evaluate.py"), *args],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=120,
    )
    return p.returncode, p.stdout, p.stderr


@pytest.fixture(scope="module")
def evaluate_tool():
    """tools/evaluate.py as a module (its main() runs in-process: no interpreter start)."""
    import evaluate

    return evaluate


def test_generated_answers_are_post_processed_stored_text_is_not(tmp_path):
    """ChartQA: the same answers ("Yes.", "5..", "blue.") are right when our model generates
    them (SAIL-VL's wrapper drops one trailing '.') and wrong in a stored file (VLMEvalKit's
    scorer does not): 10 of 12 end to end, VLMEvalKit's 58.33 on the stored file."""
    bench = os.path.join(FIXTURES, "ChartQA_TEST.tsv")
    spec = get_benchmark("ChartQA_TEST")
    stored = score_predictions(spec, bench, os.path.join(FIXTURES, "ChartQA_TEST_pred.xlsx"))
    assert stored.score == pytest.approx(58.3333, abs=0.01)
    import csv

    with open(os.path.join(FIXTURES, "ChartQA_TEST_pred.tsv"), newline="") as f:
        raw = {r["question"]: r["prediction"] for r in csv.DictReader(f, delimiter="\t")}
    model = FakeModel(raw)
    s, pred_path = run_benchmark(spec, bench, model, RunnerConfig(batch_size=5), str(tmp_path))
    assert len(model.asked) == 12
    assert s.score == pytest.approx(100 * 10 / 12)
    assert s.per_item["0"] == 1 and s.per_item["2"] == 1 and s.per_item["10"] == 1
    # the written file holds the processed answers, so rescoring it gives the same score
    assert score_predictions(spec, bench, pred_path).score == pytest.approx(s.score)


def test_bad_images_are_listed_and_the_benchmark_goes_on(tmp_path):
    rows = [
        ("1", png_b64("red"), "", "Is it red?", "Yes"),
        ("2", "@@@@" * 20, "", "Bad base64?", "No"),
        ("3", base64.b64encode(b"not an image at all " * 5).decode(), "", "Text?", "No"),
        ("4", huge_png_b64(), "", "Huge?", "Yes"),
        ("5", "", "missing.png", "Missing file?", "No"),
        ("6", "77", "", "Dangling reference?", "No"),
        ("7", png_b64("blue"), "", "Is it blue?", "Yes"),
    ]
    header = ["index", "image", "image_path", "question", "answer"]
    path = str(tmp_path / "pope.tsv")
    write_tsv(path, header, [dict(zip(header, r)) for r in rows])
    model = FakeModel({r[3]: "Yes" for r in rows})
    s, _ = run_benchmark(get_benchmark("pope"), path, model, RunnerConfig(), str(tmp_path))
    assert sorted(model.asked) == ["Is it blue?", "Is it red?"]
    bad = {b["index"]: b["reason"] for b in s.bad_items}
    assert set(bad) == {"2", "3", "4", "5", "6"}
    for index, reason in bad.items():
        assert path in reason and f"index={index}" in reason, reason
    assert "missing.png" in bad["5"] and "'77'" in bad["6"]
    assert "DecompressionBomb" in bad["4"] or "pixels" in bad["4"]
    # scored as empty answers: TP 2 (1, 7), FN 1 (4) -> P 1, R 2/3, F1 80
    assert s.n == 7 and s.score == pytest.approx(80.0)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A small POPE set and broken variants of it and of its predictions."""
    d = tmp_path_factory.mktemp("inputs")
    header = ["index", "question", "answer", "category"]
    rows = [
        {"index": str(i), "question": f"q{i}", "answer": a, "category": "random"}
        for i, a in enumerate(["Yes", "No", "Yes"])
    ]
    write_tsv(str(d / "pope.tsv"), header, rows)
    write_tsv(str(d / "noanswer.tsv"), ["index", "question"], rows)
    preds = [dict(r, prediction=p) for r, p in zip(rows, ["Yes", "No", "No"])]
    write_tsv(str(d / "pred.tsv"), header + ["prediction"], preds)
    write_tsv(str(d / "dup.tsv"), header + ["prediction"], preds + [dict(preds[2], prediction="Yes")])
    text = (d / "pred.tsv").read_bytes()
    (d / "latin1.tsv").write_bytes(text.replace(b"q2", b"q\xe92"))
    (d / "latin1_bench.tsv").write_bytes((d / "pope.tsv").read_bytes().replace(b"q1", b"\xff"))
    (d / "pred.xlsx").write_bytes(b"PK\x03\x04 this is not a workbook")
    return d


@pytest.mark.parametrize(
    "bench,pred,expect",
    [
        ("pope.tsv", "latin1.tsv", "latin1.tsv: line 4 is not UTF-8 text (byte 0xe9"),
        ("latin1_bench.tsv", "pred.tsv", "latin1_bench.tsv: line 3 is not UTF-8 text (byte 0xff"),
        ("noanswer.tsv", "pred.tsv", "noanswer.tsv: no 'answer' column"),
        ("pope.tsv", "dup.tsv", "dup.tsv: index '2' appears twice (lines 4 and 5)"),
        ("pope.tsv", "pred.xlsx", "pred.xlsx: not a readable .xlsx workbook"),
        ("pope.tsv", "nowhere.csv", "nowhere.csv: no such file"),
    ],
)
def test_input_errors_are_one_line_and_exit_2(evaluate_tool, capsys, inputs, bench, pred, expect):
    code = evaluate_tool.main(["--benchmark", f"POPE={inputs / bench}", "--predictions", str(inputs / pred)])
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert err.count("\n") == 1 and err.startswith("error: ") and expect in err, err


def test_the_command_line_exits_2_without_a_traceback(inputs):
    code, out, err = run_cli(
        "--benchmark", f"POPE={inputs / 'pope.tsv'}", "--predictions", str(inputs / "dup.tsv")
    )
    assert code == 2 and "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith("error: ") and "appears twice" in err


def test_predictions_csv_and_name_spellings(evaluate_tool, capsys, inputs, tmp_path):
    shutil.copy(inputs / "pred.tsv", tmp_path / "pred.csv")
    text = (tmp_path / "pred.csv").read_text().replace("\t", ",")
    (tmp_path / "pred.csv").write_text(text)
    for name in ("pope", "POPE", "Pope"):
        code = evaluate_tool.main(
            ["--benchmark", f"{name}={inputs / 'pope.tsv'}", "--predictions", str(tmp_path / "pred.csv")]
        )
        out, err = capsys.readouterr()
        assert code == 0, err
        # TP 1, FN 1, no FP: P 1, R 1/2 -> F1 66.67
        assert out.strip().splitlines()[-1] == f"benchmark={name} score=66.67 n=3"


def test_spreadsheet_cells_and_indices_read_as_vlmevalkit_stores_them(tmp_path):
    """Integer indices match however they are written; an integral number cell is its integer,
    as pandas reads it; empty rows are skipped; a repeated index names both rows."""
    import openpyxl

    from megatron_sail.eval.prediction_files import canonical_index, cell_text, read_predictions

    assert [canonical_index(x) for x in ("12", "0012", "12.0", "-3", "1e3", "VD_figure_0", "")] == [
        "12",
        "12",
        "12",
        "-3",
        "1e3",
        "VD_figure_0",
        "",
    ]
    assert [cell_text(v) for v in (None, 5, 5.0, 0.5, True, "x ")] == ["", "5", "5", "0.5", "True", "x "]
    wb = openpyxl.Workbook()
    ws = wb.active
    for row in (
        ["index", "question", "prediction"],
        [12, "q", 0.5],
        [None, None, None],
        ["0013", "q", " Yes. "],
    ):
        ws.append(row)
    wb.save(tmp_path / "p.xlsx")
    assert read_predictions(str(tmp_path / "p.xlsx")) == {"12": "0.5", "13": " Yes. "}
    ws.append([12.0, "q", "again"])
    wb.save(tmp_path / "p.xlsx")
    with pytest.raises(ValueError, match=r"index '12' appears twice \(rows 2 and 5\)"):
        read_predictions(str(tmp_path / "p.xlsx"))
