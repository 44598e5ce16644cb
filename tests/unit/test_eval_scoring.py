"""Benchmark scoring rules on small cases whose scores are worked out by hand (and the VQA
accuracy's published two-annotator example), plus the TSV reader and the prompts."""

import base64
import io
import json

import pytest
from PIL import Image

from megatron_sail.eval import matching
from megatron_sail.eval.registry import get_benchmark, parse_benchmark_arg
from megatron_sail.eval.runner import score_predictions
from megatron_sail.eval.score_vqa import anls, relaxed_correct, vqa_accuracy
from megatron_sail.eval.tsv import BenchmarkFileError, Item, read_items, write_tsv


def item(index, **row):
    """An Item with the given columns and no image."""
    return Item(index=str(index), row={k: str(v) for k, v in row.items()}, images=[])


def png_b64(colour) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_yes_no_and_option_extraction():
    assert matching.extract_yes_no("Yes, there is a cat.") == "Yes"
    assert matching.extract_yes_no("no") == "No"
    assert matching.extract_yes_no("yes and no") == "Unknown"
    assert matching.extract_yes_no("The answer: yesterday") == "Unknown"
    opts = {"A": "red", "B": "blue", "C": "green"}
    assert matching.infer_option("B", opts) == "B"
    assert matching.infer_option("(C) green", opts) == "C"
    assert matching.infer_option("The answer is A.", opts) == "A"
    assert matching.infer_option("blue", opts) == "B"  # by option text
    assert matching.infer_option("A or B", opts) is None  # two letters, no text match
    assert matching.infer_option("purple", opts) is None


def test_vqa_normalization():
    assert matching.normalize_vqa_answer("Two dogs.") == "2 dogs"
    assert matching.normalize_vqa_answer("the cat") == "cat"
    assert matching.normalize_vqa_answer("dont") == "don't"
    assert matching.normalize_vqa_answer("1,000") == "1000"  # digit-comma-digit: marks dropped
    assert matching.normalize_vqa_answer("3.5") == "3.5"


def test_pope_f1_precision_recall():
    items = [
        item(i, question="q", answer=a, category=c)
        for i, (a, c) in enumerate(
            [("Yes", "random"), ("Yes", "random"), ("No", "popular"), ("No", "popular"), ("yes", "popular")]
        )
    ]
    preds = {"0": "Yes", "1": "no", "2": "Yes, there is.", "3": "No.", "4": "yes and no"}
    s = get_benchmark("pope").score(items, preds)
    # VLMEvalKit compares the truth exactly: item 4's 'yes' is a negative (and a bad item).
    # TP=1 (item 0), FP=1 (item 2), FN=1 (item 1): P=1/2, R=1/2, F1=0.5; acc 2/5.
    assert s.score == pytest.approx(50.0)
    assert s.details["overall"]["precision"] == pytest.approx(50.0)
    assert s.details["overall"]["recall"] == pytest.approx(50.0)
    assert s.details["overall"]["acc"] == pytest.approx(40.0)
    assert s.details["unknown"] == 1
    assert [b["index"] for b in s.bad_items] == ["4"] and "'yes'" in s.bad_items[0]["reason"]
    # random: TP=1, FN=1, no FP -> P=1, R=1/2, F1=2/3
    assert s.details["categories"]["random"]["f1"] == pytest.approx(200 / 3)


def test_mme_acc_plus_and_totals():
    rows = [
        ("color", "c1.jpg", "Yes", "Yes"),
        ("color", "c1.jpg", "No", "No"),
        ("color", "c2.jpg", "Yes", "Yes"),
        ("color", "c2.jpg", "No", "Yes"),
        ("code_reasoning", "r1.jpg", "Yes", "yes"),
        ("code_reasoning", "r1.jpg", "No", "no"),
    ]
    items = [item(i, question="q", answer=a, category=c, image_path=p) for i, (c, p, a, _) in enumerate(rows)]
    preds = {str(i): r[3] for i, r in enumerate(rows)}
    s = get_benchmark("mme").score(items, preds)
    # color: acc 3/4 = 75, acc+ 1/2 = 50 -> 125; code_reasoning: 100 + 100 = 200.
    assert s.details["categories"]["color"]["score"] == pytest.approx(125.0)
    assert s.details["perception"] == pytest.approx(125.0)
    assert s.details["cognition"] == pytest.approx(200.0)
    assert s.score == pytest.approx(325.0)


def test_hallusionbench_three_accuracies():
    # set 0: figure 0 has questions 0 and 1, figure 1 has question 0.
    idx = ["VD_figure_0_0_0_0", "VD_figure_0_0_0_1", "VD_figure_0_0_1_0"]
    items = [item(i, question="q", answer="Yes", **{"l2-category": "VD"}) for i in idx]
    preds = {idx[0]: "Yes", idx[1]: "No", idx[2]: "Yes"}
    s = get_benchmark("hallusionbench").score(items, preds)
    # aAcc 2/3; fAcc: figure 0 wrong, figure 1 right -> 1/2; qAcc: question 0 right on both
    # figures, question 1 wrong -> 1/2.
    assert s.details["aAcc"] == pytest.approx(200 / 3)
    assert s.details["fAcc"] == pytest.approx(50.0)
    assert s.details["qAcc"] == pytest.approx(50.0)
    assert s.score == pytest.approx((200 / 3 + 100) / 3)


def test_mcq_vanilla_and_circular():
    opts = {"A": "red", "B": "blue"}
    items = [
        item(1, question="q", answer="A", category="colour", **opts),
        item(2, question="q", answer="B", category="colour", **opts),
        item(3, question="q", answer="A", category="shape", **opts),
    ]
    s = get_benchmark("seed").score(items, {"1": "A", "2": "red", "3": "I think A"})
    assert s.details["mode"] == "vanilla"
    assert s.score == pytest.approx(200 / 3)
    assert s.details["categories"] == {"colour": 50.0, "shape": 100.0}
    # MMBench is always circular; questions without copies are their own groups
    s = get_benchmark("MMBench_DEV_EN").score(items, {"1": "A", "2": "red", "3": "I think A"})
    assert s.details["mode"] == "circular" and s.details["questions"] == 3
    assert s.score == pytest.approx(200 / 3)
    assert s.details["categories"] == {"colour": 50.0, "shape": 100.0}
    # Circular: question 5 and its rotated copy 1000005 (answer moves), question 7 alone.
    circ = [
        item(5, question="q", answer="A", **opts),
        item(1000005, question="q", answer="B", A="blue", B="red"),
        item(7, question="q", answer="B", **opts),
    ]
    s = get_benchmark("mmbench").score(circ, {"5": "A", "1000005": "A", "7": "B"})
    assert s.details["mode"] == "circular" and s.details["questions"] == 2
    assert s.score == pytest.approx(50.0)  # 5 fails on its copy, 7 is right
    assert s.details["vanilla_acc"] == pytest.approx(200 / 3)
    # a gold letter outside the options is scored (never right), counted and listed
    s = get_benchmark("mcq").score(
        [item(1, question="q", answer="E", **opts), item(2, question="q", answer="B", **opts)],
        {"1": "E", "2": "B"},
    )
    assert s.score == pytest.approx(50.0)
    assert len(s.bad_items) == 1 and "not one of the options" in s.bad_items[0]["reason"]


def test_mmmu_open_question_scored_by_answer_text():
    items = [item(1, question="What is 6*7?", answer="42"), item(2, question="q", answer="B", A="x", B="y")]
    s = get_benchmark("mmmu").score(items, {"1": "The result is 42", "2": "B"})
    assert s.score == pytest.approx(100.0)
    assert "Answer the question directly." in get_benchmark("mmmu").prompt(items[0])


def test_anls_relaxed_vqa_accuracy_and_ocrbench():
    assert anls(["hello"], "hallo") == pytest.approx(0.8)
    assert anls(["hello"], "hxllx") == pytest.approx(0.6)
    assert anls(["hello"], "abcde") == 0.0  # under the 0.5 threshold
    assert anls(["nope", "Hello"], " HELLO ") == pytest.approx(1.0)  # best of the golds
    assert relaxed_correct("10", "10.4") and not relaxed_correct("10", "10.6")
    assert relaxed_correct("20%", "0.2") and relaxed_correct("Yes", "yes")
    assert not relaxed_correct("0", "0.01")  # gold 0: exact text only
    # VQA accuracy, published example: 2 of 10 annotators gave the answer -> 0.6.
    assert vqa_accuracy(["cat"] * 2 + ["dog"] * 8, "cat") == pytest.approx(0.6)
    assert vqa_accuracy(["two"] * 3 + ["2"] * 7, "2") == pytest.approx(1.0)
    assert vqa_accuracy(["cat"] * 10, "dog") == 0.0
    spec = get_benchmark("docvqa")
    s = spec.score(
        [item(1, question="q", answer="['hello', 'hi']"), item(2, question="q", answer="['world']")],
        {"1": "hallo", "2": "zzzzz"},
    )
    assert s.score == pytest.approx(40.0)
    chart = get_benchmark("chartqa")
    assert chart.postprocess(" 10.2. ") == "10.2"  # generation: SAIL-VL's wrapper
    assert get_benchmark("docvqa").postprocess("Paris.") == "Paris."  # only ChartQA, OCR-VQA
    assert relaxed_correct("50%", "50%%")  # every trailing % goes
    ocr = get_benchmark("ocrbench")
    hme = "Handwritten Mathematical Expression Recognition"
    items = [
        item(1, question="q", answer="['Hello']", category="Regular Text Recognition"),
        item(2, question="q", answer="['x^2 + 1']", category=hme),
        item(3, question="q", answer="['x^2 + 1']", category=hme),
        item(4, question="q", answer="['cat']", category="Scene Text-centric VQA"),
    ]
    s = ocr.score(items, {"1": "it says HELLO world", "2": "$x^2+1$", "3": "X^2+1", "4": "dog"})
    assert s.score == 2.0
    assert s.details["groups"]["Text Recognition"] == 1
    assert s.details["groups"][hme] == 1


def test_prompts_follow_the_sail_vl_wrapper():
    it = Item("1", {"question": "What colour?", "hint": "Look.", "A": "red", "B": "blue"}, [b"x"])
    assert get_benchmark("mmbench").prompt(it) == (
        "<image>\nLook.\nWhat colour?\nA. red\nB. blue\n"
        "Answer with the option's letter from the given choices directly."
    )
    q = Item("2", {"question": "Is there a cat?"}, [b"x", b"y"])
    assert get_benchmark("pope").prompt(q) == "Image-1: <image>\nImage-2: <image>\nIs there a cat?"
    assert (
        get_benchmark("mme")
        .prompt(q)
        .endswith("Is there a cat? Answer the question using a single word or phrase.")
    )
    assert (
        get_benchmark("hallusionbench")
        .prompt(q)
        .endswith(
            "Is there a cat? Please answer yes or no. Answer the question using a single word or phrase."
        )
    )
    assert get_benchmark("textvqa").prompt(Item("3", {"question": "Brand?"}, [])) == (
        "Brand?\nAnswer the question using a single word or phrase."
    )
    with pytest.raises(ValueError, match="unknown benchmark"):
        parse_benchmark_arg("nosuch=x.tsv")
    with pytest.raises(ValueError, match="NAME=PATH"):
        parse_benchmark_arg("pope")


def test_tsv_images_references_paths_and_errors(tmp_path):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "pic.png")
    red, blue = png_b64("red"), png_b64("blue")
    header = ["index", "image", "image_path", "question", "answer"]
    write_tsv(
        str(tmp_path / "b.tsv"),
        header,
        [
            {"index": "1", "image": red, "question": 'a\tb "quoted"\nline', "answer": "Yes"},
            {"index": "2", "image": "1", "question": "same image", "answer": "No"},
            {"index": "3", "image": str([red, blue]), "question": "two", "answer": "No"},
            {"index": "4", "image_path": "pic.png", "question": "by path", "answer": "Yes"},
        ],
    )
    items = read_items(str(tmp_path / "b.tsv"))
    assert items[0].get("question") == 'a\tb "quoted"\nline'
    assert items[1].images == items[0].images
    assert Image.open(io.BytesIO(items[2].images[1])).getpixel((0, 0)) == (0, 0, 255)
    assert items[3].images == [str(tmp_path / "pic.png")]
    assert [it.index for it in read_items(str(tmp_path / "b.tsv"), limit=2)] == ["1", "2"]
    # a row whose image cannot be resolved is kept, saying why (the benchmark goes on)
    write_tsv(
        str(tmp_path / "bad.tsv"),
        header,
        [{"index": "1", "image": "9", "question": "q"}, {"index": "2", "image": red, "question": "q"}],
    )
    bad, good = read_items(str(tmp_path / "bad.tsv"))
    assert "index=1" in bad.problem and "refers to index '9'" in bad.problem and not good.problem
    write_tsv(str(tmp_path / "miss.tsv"), header, [{"index": "1", "image_path": "no.png", "question": "q"}])
    assert "no.png not found" in read_items(str(tmp_path / "miss.tsv"))[0].problem
    write_tsv(str(tmp_path / "dup.tsv"), header, [{"index": "1", "question": "q"}] * 2)
    with pytest.raises(BenchmarkFileError, match="repeats"):
        read_items(str(tmp_path / "dup.tsv"))


def test_score_an_existing_predictions_file(tmp_path):
    header = ["index", "question", "answer", "category"]
    rows = [
        {"index": str(i), "question": "q", "answer": a, "category": "random"}
        for i, a in enumerate(["Yes", "No", "Yes", "No"])
    ]
    write_tsv(str(tmp_path / "pope.tsv"), header, rows)
    preds = [dict(r, prediction=p) for r, p in zip(rows, ["Yes", "Yes", "Yes", "No"])]
    write_tsv(str(tmp_path / "pred.tsv"), header + ["prediction"], preds[:3] + preds[3:])
    s = score_predictions(get_benchmark("pope"), str(tmp_path / "pope.tsv"), str(tmp_path / "pred.tsv"))
    assert s.n == 4 and s.score == pytest.approx(80.0)  # TP 2, FP 1, FN 0: P 2/3, R 1
    json.dumps(s.details)  # the details go to results.json
