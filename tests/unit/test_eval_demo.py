"""The demo benchmarks: VLMEvalKit-format files the readers and rules accept, balanced yes/no,
well-formed options, images that never occur in the demo training set, and chance baselines that
match the guessing odds."""

import hashlib
import os

import pytest

from megatron_sail.demo.benchmarks import DemoBenchConfig, write_demo_benchmarks
from megatron_sail.demo.generator import DemoConfig, make_demo
from megatron_sail.eval.registry import get_benchmark
from megatron_sail.eval.tsv import read_items


def test_demo_benchmarks_are_held_out_and_scored(tmp_path):
    info = write_demo_benchmarks(str(tmp_path / "bench"), DemoBenchConfig(items=40, chance_draws=100))
    pope = read_items(info["pope"]["path"])
    assert [it.get("answer") for it in pope].count("Yes") == 20
    mcq = read_items(info["mcq"]["path"])
    for it in mcq:
        opts = [it.get(c) for c in "ABCD" if it.get(c)]
        assert len(opts) == len(set(opts)) >= 3 and it.get("answer") in "ABCD"[: len(opts)]
    ocr = read_items(info["ocrbench"]["path"])
    # A perfect model scores the top of each scale; the baselines sit at the guessing odds.
    assert get_benchmark("pope").score(pope, {i.index: i.get("answer") for i in pope}).score == 100
    truth = {i.index: i.get(i.get("answer")) for i in mcq}  # answering with the text
    assert get_benchmark("mcq").score(mcq, truth).score == 100
    words = {i.index: "it reads " + i.get("answer")[2:-2] for i in ocr}
    assert get_benchmark("ocrbench").score(ocr, words).score == 40
    assert info["pope"]["chance"] == pytest.approx(200 / 3)  # always "yes": P 1/2, R 1
    # MCQ: random guessing scores 1/4 (colour) or 1/3 (shape, count), about 31%; a constant
    # letter scores its share of the answers; the baseline is the larger.
    letters = [it.get("answer") for it in mcq]
    assert info["mcq"]["chance"] >= 100 * max(letters.count(c) for c in "ABCD") / 40
    assert 26 < info["mcq"]["chance"] < 60
    # OCR: random guessing reads 40/8 = 5 words; the most frequent word alone scores more.
    golds = [it.get("answer") for it in ocr]
    assert info["ocrbench"]["chance"] == max(golds.count(g) for g in golds)
    # No benchmark image is one of the training images (the quickstart's seed).
    demo = make_demo(str(tmp_path / "demo"), DemoConfig(samples=300, val_samples=10, seed=1234))
    train = {
        hashlib.sha1(open(os.path.join(demo["out"], "images", f), "rb").read()).hexdigest()
        for f in os.listdir(os.path.join(demo["out"], "images"))
    }
    bench = {hashlib.sha1(img).hexdigest() for items in (pope, mcq, ocr) for it in items for img in it.images}
    assert len(train) > 50 and not train & bench
    # The training conversations hold the benchmark forms.
    text = open(demo["train"]).read()
    assert "in the image?" in text and "Answer with the option" in text
    assert "single word or phrase" in text
