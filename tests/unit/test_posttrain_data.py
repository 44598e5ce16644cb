"""Post-training data: preference-pair formats and rejects, pair rows, rollout rows, rewards."""

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pytest
from PIL import Image

from megatron_sail.data.preprocess.preference import PairFile, PreferencePair, Reject, read_pairs
from megatron_sail.posttrain import rewards as R


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two images, a small BPE tokenizer with the template's special tokens, processor settings."""
    from megatron_sail.checkpoint.processor import ProcessorSettings
    from megatron_sail.data.tokenizer import load_tokenizer
    from megatron_sail.demo import generator as demo

    root = tmp_path_factory.mktemp("pref")
    for name, size in (("a.png", (64, 64)), ("b.png", (96, 64))):
        Image.new("RGB", size, (200, 10, 10)).save(root / name)
    demo.train_tokenizer(
        ["Is there a red circle?", "Yes", "No", "two blue squares", "What colour is it?", "red", "green"],
        str(root / "tok.json"),
        320,
    )
    tok = load_tokenizer(str(root / "tok.json"))
    return root, tok, ProcessorSettings(tile_size=32, max_tiles=4, tokens_per_tile=4)


def _write(path, records):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return str(path)


def test_three_formats_parse_and_bad_records_are_rejects_with_reasons(files):
    root, _, _ = files
    png = base64.b64encode((root / "a.png").read_bytes()).decode()
    path = _write(
        root / "pairs.jsonl",
        [
            {"image": "a.png", "question": "Is there a red circle?", "chosen": "Yes", "rejected": "No"},
            {
                "images": ["a.png", "b.png"],
                "prompt": "<image><image>Compare.",
                "chosen": "red",
                "rejected": "green",
            },
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {
                        "role": "user",
                        "content": [
                            {"type": "image", "image": f"data:image/png;base64,{png}"},
                            {"type": "text", "text": "What colour is it?"},
                        ],
                    },
                    {"role": "assistant", "content": "red"},
                ],
                "rejected_response": "green",
            },
            "{not json",
            {"image": "a.png", "question": "Q?", "chosen": "Yes"},
            {"image": "a.png", "question": "Q?", "chosen": "Yes", "rejected": " Yes "},
            {"image": "missing.png", "question": "Q?", "chosen": "Yes", "rejected": "No"},
            {"messages": [{"role": "user", "content": "Q?"}], "rejected_response": "No"},
        ],
    )
    out = list(read_pairs(PairFile([path])))
    pairs = [o for o in out if isinstance(o, PreferencePair)]
    rejects = {o.source.rsplit(":", 1)[1]: o.reason for o in out if isinstance(o, Reject)}
    assert len(pairs) == 3 and [len(p.images) for p in pairs] == [1, 2, 1]
    assert pairs[2].turns[0] == {"from": "system", "value": "Be brief."}
    assert pairs[2].chosen == "red" and pairs[2].rejected == "green"
    assert rejects == {
        "4": "bad_json",
        "5": "missing_field",
        "6": "same_answers",
        "7": "missing_image",
        "8": "no_assistant_turn",
    }


def test_pair_rows_hold_whole_pairs_as_adjacent_segments(files):
    from megatron_sail.posttrain.pair_rows import build_rows

    root, tok, settings = files
    pairs = [
        PreferencePair(
            [{"from": "human", "value": "Is there a red circle?"}],
            [(root / "a.png").read_bytes()],
            "Yes",
            "No",
            f"p{i}",
        )
        for i in range(5)
    ]
    pairs.append(
        PreferencePair([{"from": "human", "value": "What colour is it?"}], [], "red " * 200, "green", "long")
    )
    data = build_rows(pairs, tok, settings, seq_length=128)
    assert [r.reason for r in data.rejects] == ["too_long"]
    assert sum(data.pairs_per_row) == 5 and len(data.rows) >= 2
    for row, n in zip(data.rows, data.pairs_per_row):
        cu = row.cu_seqlens
        assert row.num_samples == 2 * n
        segs = [(cu[k], cu[k + 1]) for k in range(2 * n)]
        for (a0, a1), (b0, b1) in zip(segs[0::2], segs[1::2]):
            chosen, rejected = row.tokens[a0:a1], row.tokens[b0:b1]
            # the conversations share their prompt (and image tokens), then differ
            k = next(i for i in range(min(len(chosen), len(rejected))) if chosen[i] != rejected[i])
            assert row.loss_mask[a0 : a0 + k - 1].sum() == 0 and row.loss_mask[a0 + k - 1] == 1
            assert tok.decode(chosen[k:].tolist()).startswith("Yes")
            assert tok.decode(rejected[k:].tolist()).startswith("No")
        assert [img.sample for img in row.images] == list(range(2 * n))
        assert row.loss_mask[cu[2 * n] if len(cu) > 2 * n + 1 else len(row.tokens) :].sum() == 0
    first = data.rows[0]
    k = int(
        np.nonzero(
            first.tokens[: first.cu_seqlens[1]]
            != first.tokens[first.cu_seqlens[1] : first.cu_seqlens[2]][: first.cu_seqlens[1]]
        )[0][0]
    )
    assert data.shared_prefix_tokens == 5 * k


def test_rollout_rows_align_engine_logps_with_completion_labels():
    from megatron_sail.inference.rollout import Rollout
    from megatron_sail.posttrain.rollout_rows import pack_rollouts

    rolls = [
        Rollout([1, 2, 3], None, [7, 8], [-0.5, -0.25], "", "stop"),
        Rollout([1, 2], None, [9, 9, 4], [-1.0, -2.0, -3.0], "", "length"),
        Rollout([5] * 6, None, [6], [-0.125], "", "stop"),
    ]
    batches = pack_rollouts(rolls, [1.0, -1.0, 0.5], seq_length=10, rows_per_mb=2, pad=0, with_tiles=False)
    assert len(batches) == 1
    b = batches[0]
    assert b.mb.tokens[0, :10].tolist() == [1, 2, 3, 7, 8, 1, 2, 9, 9, 4]
    assert b.mb.cu_seqlens.tolist() == [0, 5, 10, 17, 20]
    pos = b.mb.loss_mask[0].nonzero().squeeze(1).tolist()
    assert pos == [2, 3, 6, 7, 8]  # label = the completion token at the next position
    assert b.mb.labels[0, pos].tolist() == [7, 8, 9, 9, 4]
    assert b.old_logp[0, pos].tolist() == [-0.5, -0.25, -1.0, -2.0, -3.0]
    assert b.advantages[0, pos].tolist() == [1.0, 1.0, -1.0, -1.0, -1.0]
    assert b.seq_id[0, pos].tolist() == [0, 0, 1, 1, 1]
    assert b.mb.loss_mask[1].nonzero().squeeze(1).tolist() == [5] and b.seq_id[1, 5] == 2
    with pytest.raises(ValueError, match="--seq-length 4"):
        pack_rollouts(rolls, [0.0] * 3, seq_length=4, rows_per_mb=1, pad=0, with_tiles=False)


# ------------------------------------------------------------------------------- rewards
def test_answer_extraction_and_accuracy_by_benchmark_rule():
    assert R.boxed(r"so \boxed{\frac{1}{2}} done") == r"\frac{1}{2}"
    assert R.final_answer("<think>count them</think> two") == "two"
    assert R.final_answer("x <answer> B </answer>") == "B"
    mcq = {"answer": "B", "choices": {"A": "red", "B": "blue"}}
    assert R.accuracy("<think>it is blue</think>\\boxed{B}", mcq) == 1.0
    assert R.accuracy("The answer is A", mcq) == 0.0
    assert R.accuracy("blue", mcq) == 1.0  # option text, VLMEvalKit's can_infer_text
    assert R.accuracy("Yes, there is.", {"answer": "yes"}) == 1.0
    assert R.accuracy("yes or no", {"answer": "yes"}) == 0.0
    assert R.accuracy("about 12.0 apples", {"answer": "12"}) == 1.0
    assert R.accuracy("The two.", {"answer": "two", "answer_type": "vqa"}) == 1.0


def test_format_length_and_user_rewards():
    assert R.think_format("<think>a</think> b") == 1.0
    assert R.think_format("<think>a</think>") == 0.0 and R.think_format("b") == 0.0
    assert R.boxed_format(r"\boxed{3}") == 1.0
    s = R.RewardSettings(length_target=4, length_penalty=0.5)
    assert R.length("x", {}, tokens=7, settings=s) == -1.5
    rs = R.RewardSet(["accuracy", "json:dumps"], [2.0, 0.0], s)
    with pytest.raises(TypeError):
        rs.score(["yes"], [{"answer": "yes"}], [1])  # json.dumps(text, record) is no reward
    with pytest.raises(ValueError, match="module:function"):
        R.resolve("nonsense")
    total, per = R.RewardSet(["accuracy", "format"], [], s).score(
        ["<think>x</think> yes", "no"], [{"answer": "yes"}] * 2, [3, 1]
    )
    assert total == [2.0, 0.0] and per == {"accuracy": [1.0, 0.0], "format": [1.0, 0.0]}


def test_judge_reward_asks_an_openai_compatible_endpoint():
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(body)
            text = "Yes." if "blue" in body["messages"][0]["content"].split("Candidate")[1] else "no"
            out = json.dumps({"choices": [{"message": {"content": text}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *a):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        s = R.RewardSettings(judge_url=f"http://127.0.0.1:{server.server_port}/v1", judge_model="j")
        rec = {"question": "colour?", "answer": "navy blue"}
        assert R.judge("<think>hm</think> blue", rec, settings=s) == 1.0
        assert R.judge("red", rec, settings=s) == 0.0
        assert seen[0]["model"] == "j" and "navy blue" in seen[0]["messages"][0]["content"]
    finally:
        server.shutdown()
    with pytest.raises(RuntimeError, match="--judge-url"):
        R.judge("x", rec, settings=R.RewardSettings(judge_url="http://127.0.0.1:9/v1", timeout_s=2))
