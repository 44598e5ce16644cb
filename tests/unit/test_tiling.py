"""The InternVL grid rule on hand-worked cases (see SAIL-VL.md, dynamic-resolution tiling)."""

import pytest

from megatron_sail.config.images import TilingConfig
from megatron_sail.data.tiling import candidate_grids, find_grid, image_tokens, num_tiles


@pytest.mark.parametrize(
    "size, grid",
    [
        ((1024, 768), (4, 3)),  # 4:3 matches exactly
        ((800, 400), (2, 1)),  # 2:1; (4, 2) ties but the image is too small to prefer it
        ((448, 448), (1, 1)),  # square and small: stays one tile
        ((2000, 2000), (3, 3)),  # square and large: ties move to the largest square grid <= 12
        ((100, 1000), (1, 10)),  # very tall: 1:10 exactly
        ((5000, 100), (12, 1)),  # wider than any grid: the widest one
    ],
)
def test_grid_hand_worked(size, grid):
    assert find_grid(*size) == grid


def test_max_tiles_limits_the_grid():
    cfg = TilingConfig(max_tiles=4)
    assert find_grid(2000, 2000, cfg) == (2, 2)
    # 4:3 with at most 4 tiles: (1,1) and (2,2) are equally close (diff 1/3); the image is larger
    # than half of (2,2)'s 896x896 area, so the larger grid wins the tie
    assert find_grid(1024, 768, cfg) == (2, 2)
    assert find_grid(500, 375, cfg) == (1, 1)  # same aspect, too small for the tie-break


def test_min_tiles_excludes_small_grids():
    cfg = TilingConfig(min_tiles=2, max_tiles=6)
    assert all(2 <= c * r <= 6 for c, r in candidate_grids(2, 6))
    assert find_grid(448, 448, cfg) == (2, 2)  # (1, 1) is excluded; (2, 2) matches the aspect
    assert find_grid(300, 600, cfg) == (1, 2)


def test_candidates_sorted_by_area_and_complete():
    grids = candidate_grids(1, 12)
    areas = [c * r for c, r in grids]
    assert areas == sorted(areas)
    assert len(grids) == sum(1 for c in range(1, 13) for r in range(1, 13) if c * r <= 12)


def test_tile_and_token_counts():
    assert num_tiles((4, 3), thumbnail=True) == 13
    assert num_tiles((4, 3), thumbnail=False) == 12
    assert num_tiles((1, 1), thumbnail=True) == 1  # no thumbnail for a single tile
    assert image_tokens(1024, 768) == 13 * 256
    assert image_tokens(64, 64, TilingConfig(tile_size=32, max_tiles=4, tokens_per_tile=16)) == 5 * 16


def test_bad_size_raises():
    with pytest.raises(ValueError, match="positive"):
        find_grid(0, 10)
