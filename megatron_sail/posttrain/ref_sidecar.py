"""Per-row reference log-probs of stage dpo on disk (``--ref-logps``; written by
tools/precompute_ref_logps.py): a plain .npz, no pickles, each row tied to its data by a
fingerprint so that other data, another tokenizer or --seq-length is refused by name.
"""

from __future__ import annotations

import numpy as np

from megatron_sail.data.records import PackedRow
from megatron_sail.posttrain.pair_rows import row_fingerprint


def save_sidecar(path: str, rows: list[PackedRow], logps: list[np.ndarray], meta: dict) -> None:
    """Per-row reference log-probs as a plain .npz (no pickles): row fingerprints, offsets and
    one [pairs, 2] float64 array; written under a temporary name, then renamed."""
    import json
    import os

    offsets = np.cumsum([0] + [len(v) for v in logps]).astype(np.int64)
    flat = np.concatenate(logps) if logps else np.zeros((0, 2))
    tmp = path + ".tmp.npz"
    np.savez(
        tmp,
        fingerprints=np.asarray([row_fingerprint(r) for r in rows]),
        offsets=offsets,
        logps=flat,
        meta=np.asarray(json.dumps(meta)),
    )
    os.replace(tmp, path)


def load_sidecar(path: str, rows: list[PackedRow]) -> list[np.ndarray]:
    """Reference log-probs of ``rows`` from a sidecar; a row whose fingerprint differs (other
    data, tokenizer, --seq-length) is an error naming it."""
    with np.load(path, allow_pickle=False) as z:
        fps, offsets, flat = z["fingerprints"], z["offsets"], z["logps"]
    if len(fps) != len(rows):
        raise ValueError(
            f"--ref-logps {path}: {len(fps)} rows, the data packs into {len(rows)} "
            "(other data or --seq-length?)"
        )
    out = []
    for i, row in enumerate(rows):
        if fps[i] != row_fingerprint(row):
            raise ValueError(
                f"--ref-logps {path}: row {i} differs from the data's row {i} "
                "(other data, tokenizer or --seq-length)"
            )
        out.append(flat[offsets[i] : offsets[i + 1]])
    return out
