"""Rollouts packed into training rows for the GRPO update.

Each completion is packed with its prompt as one segment (prompt + images + answer) of a row
of --seq-length tokens; the loss positions are the completion tokens. Per loss position a row
carries the engine's log-prob at sampling time, the completion's advantage and its number (for
sequence-level averaging); the reference log-probs are attached later (grpo_update.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from megatron_sail.data.loading.collate import MicroBatch


@dataclass
class RolloutBatch:
    """A micro-batch of completions with their per-token training data (all [B, S])."""

    mb: MicroBatch
    """Tokens, labels, loss mask (completion tokens), segments, tiles."""
    old_logp: torch.Tensor
    """Engine log-prob at sampling time of the label token at each loss position."""
    advantages: torch.Tensor
    """Advantage of the completion each loss position belongs to."""
    seq_id: torch.Tensor
    """int64 completion number of each position (-1 outside completions)."""
    ref_logp: Optional[torch.Tensor] = None
    """Reference log-prob at each loss position (with --kl-coef > 0)."""


def pack_rollouts(
    rollouts: list, advantages: list[float], seq_length: int, rows_per_mb: int, pad: int, with_tiles: bool
) -> list[RolloutBatch]:
    """Pack (prompt + completion) sequences in order into rows of ``seq_length``, rows into
    micro-batches of ``rows_per_mb`` (the last one padded with empty rows)."""
    rows: list[list[int]] = []
    current, used = [], 0
    for i, r in enumerate(rollouts):
        n = len(r.prompt_ids) + len(r.token_ids)
        if n > seq_length:
            raise ValueError(
                f"a prompt of {len(r.prompt_ids)} tokens + {len(r.token_ids)} "
                f"completion tokens exceed --seq-length {seq_length}; raise it or "
                "lower --max-new-tokens"
            )
        if used + n > seq_length:
            rows.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        rows.append(current)
    while len(rows) % rows_per_mb:
        rows.append([])
    return [
        _micro_batch(
            [rows[k] for k in range(j, j + rows_per_mb)], rollouts, advantages, seq_length, pad, with_tiles
        )
        for j in range(0, len(rows), rows_per_mb)
    ]


def _micro_batch(
    rows: list[list[int]], rollouts, advantages, seq_length: int, pad: int, with_tiles: bool
) -> RolloutBatch:
    """One RolloutBatch of packed rows (lists of completion indices)."""
    B = len(rows)
    tokens = np.full((B, seq_length), pad, dtype=np.int64)
    labels = np.zeros((B, seq_length), dtype=np.int64)
    mask, old, adv = (np.zeros((B, seq_length), dtype=np.float32) for _ in range(3))
    seq = np.full((B, seq_length), -1, dtype=np.int64)
    tiles = []
    for b, row in enumerate(rows):
        pos = 0
        for i in row:
            r = rollouts[i]
            ids = list(r.prompt_ids) + list(r.token_ids)
            n, p = len(ids), len(r.prompt_ids)
            tokens[b, pos : pos + n] = ids
            labels[b, pos : pos + n - 1] = ids[1:]
            span = slice(pos + p - 1, pos + n - 1)  # positions whose label is a completion token
            mask[b, span] = 1.0
            if r.logps:
                old[b, span] = r.logps
            adv[b, span] = advantages[i]
            seq[b, span] = i
            if with_tiles and r.tiles is not None and r.tiles.numel():
                tiles.append(r.tiles)
            pos += n
    cu = _boundaries(rows, rollouts, seq_length)
    t = torch.cat(tiles) if tiles else torch.zeros(0, 3, 1, 1)
    mb = MicroBatch(
        tokens=torch.from_numpy(tokens),
        labels=torch.from_numpy(labels),
        loss_mask=torch.from_numpy(mask),
        cu_seqlens=torch.tensor(cu, dtype=torch.int32),
        max_seqlen=int(np.diff(cu).max()),
        tiles=t,
        num_images=0,
        num_tiles=int(t.shape[0]),
        decode_failures=0,
        failed_sources=[],
    )
    return RolloutBatch(mb, torch.from_numpy(old), torch.from_numpy(adv), torch.from_numpy(seq))


def _boundaries(rows: list[list[int]], rollouts, seq_length: int) -> list[int]:
    """Flattened segment boundaries: one segment per sequence, the row's padding its own."""
    cu = [0]
    for b, row in enumerate(rows):
        pos = 0
        for i in row:
            pos += len(rollouts[i].prompt_ids) + len(rollouts[i].token_ids)
            cu.append(b * seq_length + pos)
        if pos < seq_length:
            cu.append((b + 1) * seq_length)
    return cu
