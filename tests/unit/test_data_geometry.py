"""Tokens per tile come from the model family's geometry; data built for another one is refused.

The tiny recipe's InternViT makes 4 tokens from a 32 px tile (8 px patches -> 4x4 grid, 2x2
merge). An AIMv2 encoder with 16 px patches makes 1 from the same tile, so it must refuse that data.
"""

import dataclasses
import json

import pytest

import preprocess_data
from megatron_sail.config import recipes
from megatron_sail.data import geometry
from megatron_sail.data.loading.dataset import PackedDataset
from megatron_sail.demo.generator import DemoConfig, make_demo

TINY = {
    "family": "internvit",
    "tile_size": 32,
    "patch_size": 8,
    "grid": 4,
    "class_tokens": 1,
    "merge": 2,
    "tokens_per_tile": 4,
    "recipe": "tiny",
}


def aimv2_patch16(run):
    """The run with its encoder swapped for an AIMv2 of 16 px patches (1 token per 32 px tile)."""
    run.model.vision = dataclasses.replace(run.model.vision, family="aimv2", patch_size=16)
    return run


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A dataset preprocessed for the tiny recipe (geometry from the recipe, no tile flags)."""
    demo = make_demo(str(tmp_path_factory.mktemp("demo")), DemoConfig(samples=12, val_samples=2, seed=5))
    prefix = str(tmp_path_factory.mktemp("data") / "tiny")
    code = preprocess_data.main(
        [
            "--input",
            demo["train"],
            "--tokenizer",
            demo["tokenizer"],
            "--output-prefix",
            prefix,
            "--seq-length",
            "256",
            "--recipe",
            "tiny",
            "--max-tiles",
            "4",
        ]
    )
    assert code == 0
    return prefix


def test_preprocessing_records_the_recipes_geometry(built):
    with open(f"{built}.meta.json") as f:
        tok = json.load(f)["tokenizer"]
    assert (tok["tile_size"], tok["tokens_per_tile"]) == (32, 4)
    assert tok["geometry"] == TINY
    ds = PackedDataset(built)
    row = ds[0]
    tiles = sum(im.num_tiles for im in row.images)
    assert tiles and int((row.tokens == ds.tokenizer_meta.img_context_id).sum()) == 4 * tiles


def test_tiling_follows_the_family_and_refuses_a_contradicting_flag(tmp_path, capsys):
    assert geometry.resolve_tiling("tiny", None, None, None) == (32, 4, TINY)
    assert geometry.resolve_tiling("tiny", None, 64, None)[:2] == (64, 16)
    tile, tpt, block = geometry.resolve_tiling(None, None, None, None)  # default recipe sail_2b
    assert (tile, tpt, block["family"], block["grid"], block["class_tokens"]) == (
        448,
        256,
        "internvit",
        32,
        1,
    )
    aim = geometry.resolve_tiling("sail_vl15_2b", None, None, None)[2]  # AIMv2: no class token
    assert (aim["family"], aim["class_tokens"], aim["tokens_per_tile"]) == ("aimv2", 0, 256)
    assert geometry.resolve_tiling(None, None, 32, 4) == (32, 4, None)  # by hand: nothing recorded
    yaml = tmp_path / "patch16.yaml"
    yaml.write_text("model:\n  vision:\n    family: aimv2\n    patch_size: 16\n")
    assert geometry.resolve_tiling("tiny", str(yaml), None, None)[1] == 1
    with pytest.raises(ValueError, match="--tokens-per-tile 16, but --recipe tiny makes 4 from 32 px"):
        geometry.resolve_tiling("tiny", None, None, 16)
    with pytest.raises(ValueError, match="40 px tiles do not fit its internvit encoder"):
        geometry.resolve_tiling("tiny", None, 40, None)  # 5x5 patches, 2x2 merge
    with pytest.raises(SystemExit) as e:
        preprocess_data.parse_args(
            [
                "--input",
                "x",
                "--tokenizer",
                "t",
                "--output-prefix",
                "o",
                "--seq-length",
                "64",
                "--recipe",
                "tiny",
                "--tokens-per-tile",
                "16",
            ]
        )
    assert e.value.code == 2 and "drop --tokens-per-tile" in capsys.readouterr().err


def test_training_refuses_data_built_for_another_geometry(built):
    from megatron_sail.train import match_data

    run = recipes.get_recipe("tiny")()
    run.data.seq_length = 256
    match_data(run, PackedDataset(built))  # the geometry it was built for: accepted
    run = aimv2_patch16(recipes.get_recipe("tiny")())
    run.data.seq_length = 256
    with pytest.raises(ValueError) as e:
        match_data(run, PackedDataset(built))
    msg = str(e.value)
    assert msg.startswith(f"{built}.meta.json: 4 tokens per tile, the model makes 1 from 32 px tiles")
    assert "aimv2 geometry (recipe tiny): 32 px tiles of 16 px patches = 2x2 grid, 0 class token(s)" in msg
    assert "built for internvit geometry (recipe tiny): 32 px tiles of 8 px patches = 4x4 grid" in msg
    assert "rebuild it with tools/preprocess_data.py --recipe tiny" in msg


def test_datasets_without_a_recorded_geometry_still_load_and_are_checked(built):
    with open(f"{built}.meta.json") as f:
        tok = json.load(f)["tokenizer"]
    old = {k: v for k, v in tok.items() if k != "geometry"}  # as written before the block existed
    model = recipes.get_recipe("tiny")().model
    assert geometry.mismatch("old.meta.json", old, model) is None
    msg = geometry.mismatch("old.meta.json", old, aimv2_patch16(recipes.get_recipe("tiny")()).model)
    assert msg.startswith("old.meta.json: 4 tokens per tile, the model makes 1")
    assert "geometry not recorded" in msg
