"""Complexity scoring (megatron_sail/curate/complexity/, tools/score_complexity.py): the IFD of
a tiny random InternVL equals the two answer losses computed by hand with transformers on the
same weights; the heuristic's documented types; sidecar shards resume; judge ratings parse."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

import score_complexity
from megatron_sail.curate.complexity import sidecar
from megatron_sail.curate.complexity.heuristic import heuristic_score, question_types
from megatron_sail.curate.complexity.judge import RatingError, parse_rating
from megatron_sail.curate.complexity.samples import Sample
from recaption_fixtures import demo_png, tiny_checkpoint


def _sft_file(root: Path) -> Path:
    """Two image conversations (one with two turns), a text-only one and a broken line."""
    rng = random.Random(5)
    (root / "images").mkdir(parents=True)
    rows = []
    for i in range(2):
        data, _ = demo_png(rng)
        (root / "images" / f"{i}.png").write_bytes(data)
        rows.append(
            {
                "image": f"images/{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat colour is the shape?"},
                    {"from": "gpt", "value": "red"},
                ]
                + (
                    [
                        {"from": "human", "value": "How many shapes are there?"},
                        {"from": "gpt", "value": "two"},
                    ]
                    if i == 0
                    else []
                ),
            }
        )
    rows.append(
        {
            "conversations": [
                {"from": "human", "value": "Count to three."},
                {"from": "gpt", "value": "one two three"},
            ]
        }
    )
    path = root / "sft.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny HF checkpoint; the process group load_generator starts is shut down afterwards."""
    import torch

    from megatron_sail.platform import distributed

    started_before = torch.distributed.is_initialized()
    root = tmp_path_factory.mktemp("cx")
    yield {"ckpt": tiny_checkpoint(root / "hf"), "data": _sft_file(root / "data")}
    if not started_before and torch.distributed.is_initialized():
        distributed.shutdown()


def _by_hand(ckpt: str, rows: list[dict], root: Path) -> list[tuple[float, float]]:
    """(mean CE of the answers in the conversation, mean CE of the answers alone) per row, with
    transformers' model: ids written out as ChatML by hand, answer positions found by scanning."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForImageTextToText

    from megatron_sail.data.tokenizer import load_tokenizer
    from megatron_sail.inference import GenerationRequest, inspect_checkpoint
    from megatron_sail.inference.prompts import PromptBuilder

    info = inspect_checkpoint(ckpt)
    tok = load_tokenizer(str(info.tokenizer_path))
    sp = tok.special
    model = AutoModelForImageTextToText.from_pretrained(ckpt, dtype=torch.float32).eval()
    builder = PromptBuilder(tok, info.settings, 2)
    out = []
    for row in rows:
        turns = row["conversations"]
        ids, pixels = [], None
        if "image" in row:  # image tokens and tiles as the processor makes them for one request
            p = builder.build(GenerationRequest("x", [str(root / row["image"])]), 1)
            start = p.ids.index(sp.img_start)
            image_run = p.ids[start : p.ids.index(sp.img_end) + 1]
            pixels = p.tiles
        answers = []
        for t in turns:
            role = "user" if t["from"] == "human" else "assistant"
            text = t["value"]
            ids += [sp.im_start] + tok.encode(role + "\n")
            if "<image>" in text:
                ids += image_run + tok.encode("\n")
                text = text.replace("<image>\n", "")
            if role == "assistant":
                first = len(ids)
                ids += tok.encode(text) + [sp.im_end]
                answers.append((first, len(ids)))
            else:
                ids += tok.encode(text) + [sp.im_end]
            ids += tok.encode("\n")
        with torch.no_grad():
            kw = {"pixel_values": pixels} if pixels is not None else {}
            logp = F.log_softmax(model(input_ids=torch.tensor([ids]), **kw).logits[0].float(), -1)
        cond = [-logp[k - 1, ids[k]].item() for a, b in answers for k in range(a, b)]
        alone = []
        for a, b in answers:
            solo = [sp.im_start] + tok.encode("assistant\n") + ids[a:b] + tok.encode("\n")
            h = len(solo) - (b - a) - len(tok.encode("\n"))
            with torch.no_grad():
                lp = F.log_softmax(model(input_ids=torch.tensor([solo])).logits[0].float(), -1)
            alone += [-lp[k - 1, solo[k]].item() for k in range(h, h + b - a)]
        out.append((sum(cond) / len(cond), sum(alone) / len(alone)))
    return out


def test_ifd_equals_the_losses_by_hand_with_transformers(tiny, tmp_path):
    out = tmp_path / "ifd"
    args = [
        "--input",
        str(tiny["data"]),
        "--method",
        "ifd",
        "--model",
        tiny["ckpt"],
        "--output-dir",
        str(out),
        "--max-tiles",
        "2",
        "--samples-per-shard",
        "2",
        "--max-batch-tokens",
        "64",
    ]
    assert score_complexity.main(args) == 0
    recs = sidecar.read_scores(str(out))
    assert [r["key"] for r in recs] == ["line 1", "line 2", "line 3"]
    rows = [json.loads(line) for line in tiny["data"].read_text().splitlines()[:3]]
    for rec, (ce_c, ce_a) in zip(recs, _by_hand(tiny["ckpt"], rows, tiny["data"].parent)):
        assert rec["ce_conditioned"] == pytest.approx(ce_c, abs=1e-4)
        assert rec["ce_answer_only"] == pytest.approx(ce_a, abs=1e-4)
        assert rec["score"] == pytest.approx(math.exp(ce_c - ce_a), rel=1e-4)
    rejects = [json.loads(line) for f in out.glob("*.rejects.jsonl") for line in f.read_text().splitlines()]
    assert [(r["key"], r["reason"]) for r in rejects] == [("line 4", "invalid_json")]
    # a rerun skips both finished shards; a lost shard is scored again, the same
    (next(out.glob("*-00001.scores.jsonl"))).unlink()
    assert score_complexity.main(args) == 0
    again = sidecar.read_scores(str(out))
    assert [r["score"] for r in again] == pytest.approx([r["score"] for r in recs], rel=1e-6)
    assert json.loads((out / "complexity.json").read_text())["last_run"]["shards_skipped"] == 1


def test_heuristic_types_and_order():
    assert question_types("Is there a cat?", "Yes")[0] == "yes/no"
    assert question_types("What colour?\nA. red\nB. blue\nAnswer with the option's letter", "A")[0] == "mcq"
    assert question_types("Describe the image.", "a red circle")[0] == "caption"
    assert question_types("What word is written?", "cat")[0] == "ocr"
    assert question_types("How many shapes are there?", "two")[0] == "counting"
    assert question_types("Why is the sky blue?", "because")[0] == "reasoning"
    assert question_types("What colour is it?", "red") == ["short"]
    multi = question_types("How many shapes are left of the square?", "two")
    assert multi[:2] == ["reasoning", "counting"]

    def sample(*pairs, images=1):
        turns = [t for q, a in pairs for t in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]
        return Sample("/x", "line 1", turns, [b""] * images)

    easy = heuristic_score(sample(("Is there a cat?", "yes")))["score"]
    attr = heuristic_score(sample(("What colour is the shape?", "red")))["score"]
    count = heuristic_score(sample(("How many shapes are left of the square?", "two")))["score"]
    long = heuristic_score(sample(("Why?", " ".join(["word"] * 40)), ("Explain more.", "ok"), images=2))[
        "score"
    ]
    assert easy < attr < count < long
    assert easy == pytest.approx(1.0 + 0.5 * math.log2(1.1) + 0.25 * math.log2(1 + 4 / 8))


def test_heuristic_tool_sidecar_and_judge_parsing(tiny, tmp_path):
    out = tmp_path / "h"
    assert (
        score_complexity.main(
            ["--input", str(tiny["data"]), "--method", "heuristic", "--output-dir", str(out)]
        )
        == 0
    )
    recs = sidecar.read_scores(str(out))
    assert [(r["key"], r["type"], r["turns"]) for r in recs] == [
        ("line 1", "counting", 2),
        ("line 2", "short", 1),
        ("line 3", "counting", 1),
    ]
    assert recs[0]["source"] == str(tiny["data"].resolve())
    # another method into the same folder is refused, naming what it holds
    assert (
        score_complexity.main(
            [
                "--input",
                str(tiny["data"]),
                "--method",
                "ifd",
                "--model",
                tiny["ckpt"],
                "--output-dir",
                str(out),
            ]
        )
        == 2
    )
    (out / "bad.scores.jsonl").write_text('{"source": "a", "key": "line 1"}\n')
    with pytest.raises(ValueError, match="bad.scores.jsonl line 1: not a score record"):
        sidecar.read_scores(str(out))
    # judge through the megatron backend on the tiny random model: each image sample is rated 1-5
    # or an unparsable_rating reject naming the answer; the text-only one is no_image
    jd = tmp_path / "j"
    assert (
        score_complexity.main(
            [
                "--input",
                str(tiny["data"]),
                "--method",
                "judge",
                "--model",
                tiny["ckpt"],
                "--backend",
                "megatron",
                "--output-dir",
                str(jd),
            ]
        )
        == 0
    )
    rated = {r["key"]: r["score"] for r in sidecar.read_scores(str(jd))}
    rejected = {
        json.loads(line)["key"]: json.loads(line)["reason"]
        for f in jd.glob("*.rejects.jsonl")
        for line in f.read_text().splitlines()
    }
    assert rejected.pop("line 3") == "no_image" and rejected.pop("line 4") == "invalid_json"
    assert set(rated) | set(rejected) == {"line 1", "line 2"} and not set(rated) & set(rejected)
    assert all(v in (1, 2, 3, 4, 5) for v in rated.values())
    assert all(v == "unparsable_rating" for v in rejected.values())
    assert parse_rating("Rating: 4 (counting)") == 4 and parse_rating("3") == 3
    with pytest.raises(RatingError, match="no digit 1-5"):
        parse_rating("seven")


def test_a_glob_of_mixed_formats_reads_each_file_as_what_it_is(tmp_path):
    """A LLaVA file and a caption file under one --input glob: each is read in its own format
    (detecting from the first file alone read the caption pairs as broken conversations)."""
    data = tmp_path / "data"
    data.mkdir()
    conv = [{"from": "human", "value": "Count to three."}, {"from": "gpt", "value": "one two three"}]
    (data / "a.jsonl").write_text(json.dumps({"conversations": conv}) + "\n")
    (data / "img.png").write_bytes(demo_png(random.Random(1))[0])
    (data / "b.jsonl").write_text(json.dumps({"image": "img.png", "caption": "a red circle"}) + "\n")
    out = tmp_path / "h"
    argv = ["--input", str(data / "*.jsonl"), "--method", "heuristic", "--output-dir", str(out)]
    assert score_complexity.main(argv) == 0
    recs = {Path(r["source"]).name: r for r in sidecar.read_scores(str(out))}
    assert sorted(recs) == ["a.jsonl", "b.jsonl"]
    assert all(f.read_text() == "" for f in out.glob("*.rejects.jsonl"))
    assert recs["b.jsonl"]["type"] == "caption" and recs["a.jsonl"]["type"] == "counting"
