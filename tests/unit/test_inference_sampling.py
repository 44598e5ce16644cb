"""Token choice (inference/sampling.py), processor settings and --input records: no model needed."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_sail.inference.prompts import ProcessorSettings
from megatron_sail.inference.sampling import apply_min_tokens, next_tokens


def test_greedy_is_argmax_with_lowest_id_on_ties():
    logits = torch.tensor([[0.1, 2.0, 2.0, -1.0], [5.0, 0.0, 0.0, 0.0]])
    assert next_tokens(logits, 0.0, 1.0, None).tolist() == [1, 0]


def test_sampling_follows_temperature_softmax_and_seed():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    draws = lambda seed: next_tokens(  # noqa: E731
        logits.repeat(50, 1),
        1.0,
        1.0,
        torch.Generator().manual_seed(seed),
    )
    g = torch.Generator().manual_seed(7)
    counts = torch.bincount(torch.cat([next_tokens(logits.repeat(4000, 1), 1.0, 1.0, g)]), minlength=3)
    freq = counts.float() / counts.sum()
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.2]), atol=0.03), freq
    # a low temperature sharpens towards the argmax
    g = torch.Generator().manual_seed(7)
    cold = next_tokens(logits.repeat(4000, 1), 0.2, 1.0, g)
    assert (cold == 0).float().mean() > 0.85
    assert torch.equal(draws(3), draws(3)) and not torch.equal(draws(3), draws(4))


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.25, 0.4, 0.35]]))
    g = torch.Generator().manual_seed(0)
    drawn = next_tokens(logits.repeat(3000, 1), 1.0, 0.5, g)
    assert set(drawn.tolist()) == {1, 2}  # 0.4 < 0.5, so 0.35 joins; 0.25 never drawn
    g = torch.Generator().manual_seed(0)
    assert set(next_tokens(logits.repeat(500, 1), 1.0, 0.1, g).tolist()) == {1}


def test_min_tokens_forbids_stop_ids_until_reached():
    logits = torch.tensor([[0.0, 9.0, 1.0]])
    stop = torch.tensor([1])
    assert next_tokens(apply_min_tokens(logits, 0, 2, stop), 0.0, 1.0, None).tolist() == [2]
    assert next_tokens(apply_min_tokens(logits, 2, 2, stop), 0.0, 1.0, None).tolist() == [1]
    assert logits[0, 1] == 9.0  # the caller's logits are not modified


def test_processor_settings_round_trip_and_errors():
    s = ProcessorSettings.from_dict(
        {
            "tile_size": 56,
            "max_tiles": 6,
            "min_tiles": 1,
            "use_thumbnail": False,
            "tokens_per_tile": 4,
            "template": {"system_prompt": "Be brief.", "unknown": 1},
            "extra_key": True,
        },
        "x/processor.json",
    )
    assert (s.tile_size, s.max_tiles, s.use_thumbnail) == (56, 6, False)
    assert s.template_config().system_prompt == "Be brief."
    with pytest.raises(ValueError, match="x/processor.json: tile_size"):
        ProcessorSettings.from_dict({"tile_size": "448"}, "x/processor.json")


def test_input_records_resolve_images_and_reject_bad_lines(tmp_path):
    from megatron_sail.generate import read_input

    src = tmp_path / "q.jsonl"
    src.write_text(
        "\n".join(
            [
                json.dumps({"question": "What?", "image": "a.png", "id": 3}),
                json.dumps({"prompt": "Two", "images": ["/abs/b.png", "c.png"], "max_new_tokens": 4}),
                "",
                json.dumps({"images": ["a.png"]}),
                json.dumps({"prompt": "x", "images": [1]}),
                json.dumps({"prompt": "x", "max_new_tokens": -1}),
                "{broken",
            ]
        )
        + "\n"
    )
    good, bad = read_input(str(src))
    assert [r.request.images for r in good] == [
        [str(tmp_path / "a.png")],
        ["/abs/b.png", str(tmp_path / "c.png")],
    ]
    assert good[0].extra == {"id": 3} and good[1].request.max_new_tokens == 4
    assert [b["line"] for b in bad] == [4, 5, 6, 7]
    assert all(b["file"] == str(src) for b in bad)
