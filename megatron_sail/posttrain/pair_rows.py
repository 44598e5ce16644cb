"""Preference pairs tokenized and packed into rows for stage dpo.

Rows. Each pair becomes two packed segments side by side in one row, chosen then rejected,
each a whole conversation (prompt, images, answer) rendered exactly as SFT rows are
(data/template.py), so RoPE positions and attention are those of a single sample. A row holds
as many whole pairs as fit in --seq-length; a pair never straddles rows. We chose two sequences
over one shared prompt copy: Megatron-Core's packed (THD) attention is block-diagonal causal
per segment, and a shared prefix needs a tree mask (the rejected answer must see the prompt but
not the chosen answer) that neither its fused kernels nor SDPA's packed path express. The cost
is the prompt and image tokens twice; ``build_rows`` counts them (``shared_prefix_tokens``: what
a shared layout would save) and the trainer prints the fraction (docs/post_training.md).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from megatron_sail.data.preprocess.preference import PreferencePair, Reject
from megatron_sail.data.records import ImageRecord, PackedRow
from megatron_sail.data.template import SampleError


@dataclass
class PairRows:
    """Packed rows of preference pairs and what packing them cost."""

    rows: list[PackedRow]
    """Rows; segments 2k / 2k+1 of a row are pair k's chosen / rejected conversation."""
    pairs_per_row: list[int]
    """Pairs in each row."""
    rejects: list[Reject]
    """Pairs that could not be used, with reasons."""
    tokens: int = 0
    """Real tokens in all rows."""
    shared_prefix_tokens: int = 0
    """Tokens the chosen and rejected conversations share at their start (prompt, images): what
    one shared copy per pair would save."""


class PairTokenizer:
    """Renders a PreferencePair into two conversations' ids and loss masks, as SFT does."""

    def __init__(self, tokenizer, settings):
        from megatron_sail.data.template import ChatTemplate
        from megatron_sail.data.tiling import TilingConfig

        self.settings = settings
        self.template_cfg = settings.template_config()
        self.template = ChatTemplate(tokenizer, self.template_cfg)
        self.tiling = TilingConfig(
            settings.tile_size,
            settings.min_tiles,
            settings.max_tiles,
            settings.use_thumbnail,
            settings.tokens_per_tile,
        )

    def images(self, pair: PreferencePair) -> list[tuple[bytes, tuple, tuple]]:
        """(bytes, grid, size) of each image; an undecodable one is a bad_image reject."""
        from megatron_sail.data.tiling import find_grid
        from megatron_sail.inference.prompts import image_size

        out = []
        for k, data in enumerate(pair.images):
            try:
                w, h = image_size(data, f"{pair.source} image {k}")
            except ValueError as e:
                raise SampleError("bad_image", str(e)) from None
            out.append((data, find_grid(w, h, self.tiling), (w, h)))
        return out

    def render(self, pair: PreferencePair, images) -> tuple:
        """(chosen ids, chosen mask, rejected ids, rejected mask) as numpy arrays."""
        from megatron_sail.data.template import normalize_turns
        from megatron_sail.data.tiling import num_tiles

        counts = [num_tiles(g, self.tiling.thumbnail) * self.tiling.tokens_per_tile for _, g, _ in images]
        out = []
        for answer in (pair.chosen, pair.rejected):
            turns = normalize_turns(
                pair.turns + [{"from": "gpt", "value": answer}], len(images), self.template_cfg
            )
            ids, mask = self.template.render(turns, counts)
            if not mask.any():
                raise SampleError("empty_answer", "the answer renders to no trained token")
            out += [ids.astype(np.int64), mask.astype(np.float32)]
        return tuple(out)


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the common start of two id arrays."""
    n = min(len(a), len(b))
    diff = np.nonzero(a[:n] != b[:n])[0]
    return int(diff[0]) if len(diff) else n


def build_rows(items, tokenizer, settings, seq_length: int) -> PairRows:
    """Tokenize pairs (PreferencePair or Reject, in order) and pack whole pairs into rows."""
    pt = PairTokenizer(tokenizer, settings)
    pad = tokenizer.special.pad
    out = PairRows([], [], [])
    current: list[tuple] = []
    used = 0
    for item in items:
        if isinstance(item, Reject):
            out.rejects.append(item)
            continue
        try:
            images = pt.images(item)
            c_ids, c_mask, r_ids, r_mask = pt.render(item, images)
        except SampleError as e:
            out.rejects.append(Reject(item.source, e.reason, e.detail))
            continue
        need = len(c_ids) + len(r_ids)
        if need > seq_length:
            out.rejects.append(
                Reject(item.source, "too_long", f"{need} tokens for the pair, --seq-length {seq_length}")
            )
            continue
        if used + need > seq_length:
            out.rows.append(_row(current, seq_length, pad))
            out.pairs_per_row.append(len(current))
            current, used = [], 0
        current.append((c_ids, c_mask, r_ids, r_mask, images, item.source))
        used += need
        out.tokens += need
        out.shared_prefix_tokens += _common_prefix(c_ids, r_ids)
    if current:
        out.rows.append(_row(current, seq_length, pad))
        out.pairs_per_row.append(len(current))
    return out


def _row(pairs: list[tuple], seq_length: int, pad: int) -> PackedRow:
    """One PackedRow of whole pairs (chosen, rejected, ...), padded with a final segment."""
    tokens = np.full(seq_length, pad, dtype=np.int64)
    labels = np.zeros(seq_length, dtype=np.int64)
    mask = np.zeros(seq_length, dtype=np.float32)
    cu, images, pos = [0], [], 0
    for c_ids, c_mask, r_ids, r_mask, imgs, source in pairs:
        for ids, m in ((c_ids, c_mask), (r_ids, r_mask)):
            n = len(ids)
            tokens[pos : pos + n] = ids
            labels[pos : pos + n - 1] = ids[1:]
            mask[pos : pos + n] = m
            for k, (data, grid, size) in enumerate(imgs):
                images.append(ImageRecord(data, grid, True, size, len(cu) - 1, f"{source}#{k}"))
            pos += n
            cu.append(pos)
    samples = len(cu) - 1
    if pos < seq_length:
        cu.append(seq_length)
    return PackedRow(tokens, labels, mask, np.asarray(cu, dtype=np.int32), samples, images)


def row_fingerprint(row: PackedRow) -> str:
    """SHA-256 of a row's tokens and loss mask (ties a sidecar entry to its row)."""
    h = hashlib.sha256(row.tokens.tobytes())
    h.update(row.loss_mask.tobytes())
    return h.hexdigest()[:16]
