"""The signature shard file (``NAME.sig.npz``): its suffix and its reader, apart from the
signature pass so that the grouping pass imports neither torch nor the filters."""

from __future__ import annotations

import numpy as np

SUFFIX = ".sig.npz"
COLOUR_GRID = 8
"""Side of the RGB thumbnail near_dedup.colour_distance compares (8x8x3 = 192 bytes a row)."""
COLOUR_CELLS = COLOUR_GRID * COLOUR_GRID * 3


def load_signatures(path: str, with_embedding: bool = False) -> dict:
    """A signature shard's arrays (np.load without pickle: the arrays are plain dtypes)."""
    with np.load(path, allow_pickle=False) as z:
        names = [n for n in z.files if with_embedding or n != "embedding"]
        return {n: z[n] for n in names}
