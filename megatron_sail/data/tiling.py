"""InternVL dynamic-resolution tiling arithmetic (grid choice only, no pixels).

Preprocessing uses this to know every image's tile count (and so the sequence length) from the
image size alone; the image pipeline uses the grid stored by preprocessing and never re-derives
it differently. The rule reproduces InternVL's ``dynamic_preprocess`` exactly, including its
tie-break and candidate order.
"""

from __future__ import annotations

from functools import lru_cache

from megatron_sail.config.images import TilingConfig


@lru_cache(maxsize=None)
def candidate_grids(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
    """All (cols, rows) grids with min_tiles <= cols*rows <= max_tiles, in InternVL's order.

    InternVL builds a Python set of tuples and sorts it by area with a stable sort; the order of
    equal-area grids is the set's iteration order, which is deterministic for small int tuples.
    We build the same set the same way so ties resolve identically.
    """
    grids = set(
        (i, j)
        for n in range(min_tiles, max_tiles + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_tiles <= i * j <= max_tiles
    )
    return tuple(sorted(grids, key=lambda g: g[0] * g[1]))


def find_grid(width: int, height: int, cfg: TilingConfig = TilingConfig()) -> tuple[int, int]:
    """Return the (cols, rows) tile grid InternVL picks for an image of this size.

    Closest aspect ratio wins; on an exact tie, a later (larger) grid replaces the current one
    only when the image area exceeds half of that grid's pixel area.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    aspect = width / height
    area = width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in candidate_grids(cfg.min_tiles, cfg.max_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * cfg.tile_size * cfg.tile_size * cols * rows:
            best = (cols, rows)
    return best


def num_tiles(grid: tuple[int, int], thumbnail: bool) -> int:
    """Tiles the model sees for one image: the grid, plus a thumbnail when the grid has > 1 tile."""
    n = grid[0] * grid[1]
    return n + 1 if thumbnail and n > 1 else n


def image_tokens(width: int, height: int, cfg: TilingConfig = TilingConfig()) -> int:
    """Number of <IMG_CONTEXT> tokens an image of this size becomes."""
    return num_tiles(find_grid(width, height, cfg), cfg.thumbnail) * cfg.tokens_per_tile
