"""The judge filter (SAIL-Caption2's VIR 1-5 and ITA yes/no, issue 26): reply parsing, thresholds
and records with a scripted OpenAI-compatible judge, and a whole filter run with the tiny random
InternVL as the judge through the megatron backend (its replies are noise: each sample is kept
with scores or rejected with a judge reason, never a crash)."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from megatron_sail.curate.filters.base import FilterSample
from megatron_sail.curate.filters.judge import Judge, JudgeConfig, parse_ita, parse_vir
from megatron_sail.curate.filters.pipeline import load_config, run_filters
from recaption_fixtures import FakeVLMServer, add_member, tiny_checkpoint

CAPTION = "a red square beside a small blue circle on a white table"


def png(w: int, h: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), (w % 256, 60, 200)).save(buf, format="PNG")
    return buf.getvalue()


def test_reply_parsing():
    assert [parse_vir(r) for r in ("4", "Score: 5/5", "3 - the main objects", " 2.", "I'd say 1")] == [
        4,
        5,
        3,
        2,
        1,
    ]
    assert [parse_vir(r) for r in ("", "six", "7", "0", "4.5", "rating 10")] == [None] * 6
    replies = ("Yes.", "no", "NO, it shows a dog", "The answer is yes")
    assert [parse_ita(r) for r in replies] == [True, False, False, True]
    assert [parse_ita(r) for r in ("", "maybe", "well, yes and no", "12")] == [None] * 4


def test_thresholds_and_records_with_a_scripted_judge():
    replies = {
        40: ("4", "yes"),
        41: ("2", "yes"),
        42: ("5", "No."),
        43: ("great", "yes"),
        44: ("3", "perhaps"),
    }

    def answer(prompt, w, h):
        assert CAPTION in prompt
        return replies[w][0] if "from 1 to 5" in prompt else replies[w][1]

    with FakeVLMServer(answer=answer) as server:
        judge = Judge(JudgeConfig(enabled=True, backend="openai", model="fake-judge", api_base=server.url))
        out = {}
        for w in replies:
            s = FilterSample(
                key=f"k{w}", shard="s", members={"png": png(w, 30)}, image_ext="png", caption=CAPTION
            )
            r = judge.process(s)
            out[w] = (r.reason if r else None, s.record["judge"]["vir"], s.record["judge"]["ita"])
        judge.close()
    assert out == {
        40: (None, 4, "yes"),
        41: ("judge_low_vir", 2, "yes"),
        42: ("judge_not_aligned", 5, "no"),
        43: ("judge_unparseable", None, "yes"),
        44: ("judge_unparseable", 3, None),
    }


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import torch

    from megatron_sail.platform import distributed

    started_before = torch.distributed.is_initialized()
    yield tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "hf")
    if not started_before and torch.distributed.is_initialized():
        distributed.shutdown()


def test_judge_on_the_tiny_model(tiny, tmp_path):
    shard = tmp_path / "in" / "s.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tar:
        for k, (w, h) in enumerate([(64, 48), (48, 64), (56, 56)]):
            add_member(tar, f"k{k}.png", png(w, h))
            add_member(tar, f"k{k}.txt", CAPTION.encode())
            add_member(tar, f"k{k}.json", json.dumps({"k": k}).encode())
    cfg_path = tmp_path / "filters.yaml"
    cfg_path.write_text(
        f"filters:\n  - image: {{}}\n  - judge: {{backend: megatron, model: '{tiny}', "
        f"max_new_tokens: 4, max_tiles: 1}}\n"
    )
    report = run_filters([str(shard)], str(tmp_path / "out"), load_config(str(cfg_path)))
    assert report["samples"] == 3 and set(report["removed_by_stage"]) <= {"judge"}
    rejects = [json.loads(ln) for ln in (tmp_path / "out" / "s.rejects.jsonl").read_text().splitlines()]
    assert all(r["reason"].startswith("judge_") and r["judge"]["model"] == tiny for r in rejects)
    assert all("reply" in r["detail"] for r in rejects if r["reason"] == "judge_unparseable")
    with tarfile.open(tmp_path / "out" / "s.tar") as tar:
        kept = [json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")]
    assert len(kept) + len(rejects) == 3
    assert all(k["judge"]["vir"] >= 3 and k["judge"]["ita"] == "yes" for k in kept)
