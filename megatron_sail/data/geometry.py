"""The token geometry a dataset is built for: taken from the model's vision family, recorded in
meta.json, and checked against the model that trains on it.

A row holds ``tiles x tokens_per_tile`` <IMG_CONTEXT> tokens per image, fixed when it is packed.
How many tokens a tile makes is the vision family's business (``ModelConfig.geometry``: patch
grid, class tokens, pixel-shuffle merge), so preprocessing asks the model config rather than
trusting a number typed on the command line, and stores the whole geometry next to it. A model
whose geometry makes another count cannot splice that data, and must refuse it before step 1
with the dataset file, both counts and the way out.
"""

from __future__ import annotations

from typing import Optional


def geometry_block(model_config, tile_size: Optional[int] = None, recipe: str = "") -> dict:
    """meta.json's ``tokenizer.geometry``: what a ``tile_size`` px tile is to this model
    (default tile: the encoder's trained image size). Raises ValueError when the family
    cannot tile it (e.g. a patch grid the merge does not divide)."""
    v = model_config.vision
    tile = int(tile_size or v.image_size)
    g = model_config.geometry(tile)
    block = {
        "family": v.family,
        "tile_size": tile,
        "patch_size": v.patch_size,
        "grid": g.grid,
        "class_tokens": g.class_tokens,
        "merge": g.merge,
        "tokens_per_tile": g.tokens_per_tile,
    }
    if g.padded:  # recorded only when it applies: blocks of divisible grids stay as they were
        block["odd_grid"] = "pad"
    if recipe:
        block["recipe"] = recipe
    return block


def describe(block: Optional[dict]) -> str:
    """One phrase for a geometry block (or for a dataset written before blocks were stored)."""
    if not block:
        return "geometry not recorded (written before meta.json stored it)"
    where = f" (recipe {block['recipe']})" if block.get("recipe") else ""
    return (
        f"{block['family']} geometry{where}: {block['tile_size']} px tiles of "
        f"{block['patch_size']} px patches = {block['grid']}x{block['grid']} grid, "
        f"{block['class_tokens']} class token(s), {block['merge']}x{block['merge']} merge"
        + (" of the zero-padded grid" if block.get("odd_grid") == "pad" else "")
    )


def mismatch(meta_path: str, tokenizer: dict, model_config, recipe: str = "") -> Optional[str]:
    """Why the dataset whose meta.json ``tokenizer`` block is given cannot feed this model, or
    None when its tokens per tile are what the model makes from its tiles.

    Only the count matters to the rows (an AIMv2 and an InternViT model that both make 256
    tokens from 448 px tiles read the same data); the recorded geometry is there to say what
    the data was built for."""
    tile, have = tokenizer.get("tile_size"), tokenizer.get("tokens_per_tile")
    built = describe(tokenizer.get("geometry"))
    redo = (
        f"rebuild it with tools/preprocess_data.py --recipe {recipe or 'NAME'} (the recipe and "
        "--config this run uses), or train the model it was built for"
    )
    try:
        want = geometry_block(model_config, tile, recipe)
    except (TypeError, ValueError) as e:
        return (
            f"{meta_path}: {tile} px tiles ({have} tokens per tile, {built}) do not fit the "
            f"model's {model_config.vision.family} encoder ({e}); {redo}"
        )
    if have == want["tokens_per_tile"]:
        return None
    return (
        f"{meta_path}: {have} tokens per tile, the model makes {want['tokens_per_tile']} from "
        f"{tile} px tiles ({describe(want)}); the dataset was built for {built}; {redo}"
    )


DEFAULT_RECIPE = "sail_2b"
"""The recipe whose geometry preprocessing uses when neither --recipe nor --tokens-per-tile is
given: InternViT at 448 px, 14 px patches, 2x2 merge = 256 tokens, the SAIL-VL defaults."""


def recipe_model(recipe: str, config: Optional[str] = None):
    """The ModelConfig a training run of ``recipe`` (plus the trainer's --config YAML) builds."""
    from megatron_sail.config import recipes
    from megatron_sail.config.run import apply_overrides, load_yaml

    cfg = recipes.get_recipe(recipe)()
    if config:
        apply_overrides(cfg, load_yaml(config), config)
    return cfg.model


def resolve_tiling(
    recipe: Optional[str], config: Optional[str], tile_size: Optional[int], tokens_per_tile: Optional[int]
) -> tuple[int, int, Optional[dict]]:
    """(tile size, tokens per tile, geometry block) for preprocessing.

    With a recipe (or with neither a recipe nor --tokens-per-tile: DEFAULT_RECIPE) the count is
    the model's: the tile defaults to its encoder's image size, and a --tokens-per-tile that
    disagrees is an error. --tokens-per-tile without a recipe is taken as given (a model outside
    the recipes), and no geometry is recorded."""
    if recipe is None and config is not None:
        raise ValueError("--config needs the --recipe it overrides")
    if recipe is None and tokens_per_tile is not None:
        return int(tile_size or 448), int(tokens_per_tile), None
    recipe = recipe or DEFAULT_RECIPE
    model = recipe_model(recipe, config)
    try:
        block = geometry_block(model, tile_size, recipe)
    except ValueError as e:
        raise ValueError(
            f"--recipe {recipe}: {tile_size or model.vision.image_size} px tiles do not "
            f"fit its {model.vision.family} encoder ({e})"
        ) from e
    if tokens_per_tile is not None and tokens_per_tile != block["tokens_per_tile"]:
        raise ValueError(
            f"--tokens-per-tile {tokens_per_tile}, but --recipe {recipe} makes "
            f"{block['tokens_per_tile']} from {block['tile_size']} px tiles "
            f"({describe(block)}); drop --tokens-per-tile"
        )
    return block["tile_size"], block["tokens_per_tile"], block
