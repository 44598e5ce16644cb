"""Key/value cache for decoding on the Megatron model, for any layer spec.

Generation swaps each LM layer's ``core_attention`` for a ``CachedAttention`` that wraps the
original module while ``cached_attention(...)`` is active:

* prefill (packed THD prompts, one segment per prompt): the original core attention runs
  unchanged (the training numerics: SDPA per segment locally, TE's THD kernels on GPUs), and the
  rotated keys / values of every prompt are written to the cache;
* decode (one new token per prompt, laid out as s = batch, b = 1): the new key / value go to
  each prompt's next slot and the query attends to that prompt's cached positions only.

Megatron's Attention applies RoPE before core attention, so the cache holds rotated keys, and
TP shards heads before it, so each rank caches its own heads. Core attention has no weights in
either spec, so swapping it leaves parameters, hooks and checkpoints untouched.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F


@dataclass
class CacheStep:
    """What the current forward pass is."""

    kind: str
    """'prefill' or 'decode'."""
    bounds: tuple[int, ...] = ()
    """prefill: segment offsets of the packed prompts (segments past ``rows`` are padding)."""
    rows: int = 0
    """prefill: how many leading segments are prompts (cache rows 0..rows-1)."""
    positions: Optional[torch.Tensor] = None
    """decode: int64 [batch] position of each row's new token (its slot in the cache)."""


class KVCache:
    """Per-layer key/value buffers [batch, groups, max_len, head_dim], allocated on first use."""

    def __init__(self, batch: int, max_len: int):
        self.batch, self.max_len = batch, max_len
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.step: Optional[CacheStep] = None

    def _buffers(self, layer: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's buffers, shaped after the first keys it sees ([t, groups, head_dim])."""
        if layer not in self.keys:
            shape = (self.batch, like.size(-2), self.max_len, like.size(-1))
            self.keys[layer] = like.new_zeros(shape)
            self.values[layer] = like.new_zeros(shape)
        return self.keys[layer], self.values[layer]

    def store_prompts(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """Write each packed prompt's keys/values ([t, groups, head_dim]) to its row."""
        kbuf, vbuf = self._buffers(layer, key)
        bounds = self.step.bounds
        for row in range(self.step.rows):
            a, b = bounds[row], bounds[row + 1]
            if b - a > self.max_len:
                raise ValueError(f"prompt {row} has {b - a} tokens, cache holds {self.max_len}")
            kbuf[row, :, : b - a] = key[a:b].transpose(0, 1)
            vbuf[row, :, : b - a] = value[a:b].transpose(0, 1)

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor,
               value: torch.Tensor) -> torch.Tensor:
        """Decode attention: query/key/value [batch, 1, heads, head_dim] -> [batch, 1, heads*dim]."""
        kbuf, vbuf = self._buffers(layer, key)
        pos = self.step.positions
        rows = torch.arange(self.batch, device=pos.device)
        kbuf[rows, :, pos] = key[:, 0]
        vbuf[rows, :, pos] = value[:, 0]
        span = int(pos.max()) + 1
        visible = torch.arange(span, device=pos.device)[None, :] <= pos[:, None]  # [batch, span]
        q = query[:, 0].unsqueeze(2)  # [batch, heads, 1, dim]
        out = F.scaled_dot_product_attention(
            q, kbuf[:, :, :span], vbuf[:, :, :span], attn_mask=visible[:, None, None, :],
            enable_gqa=q.size(1) != kbuf.size(1))
        return out.reshape(self.batch, 1, -1)


class CachedAttention(torch.nn.Module):
    """Core attention wrapper: prefill through the wrapped module, decode from the cache."""

    def __init__(self, inner: torch.nn.Module, layer: int, cache: KVCache):
        super().__init__()
        self.inner = inner
        self.layer = layer
        self.cache = cache

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        """Same contract as Megatron core attention (sbhd or thd inputs)."""
        step = self.cache.step
        if step is None:
            raise RuntimeError("CachedAttention called outside a generation step")
        if step.kind == "prefill":
            out = self.inner(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                             attention_bias=attention_bias, packed_seq_params=packed_seq_params)
            self.cache.store_prompts(self.layer, key, value)
            return out
        return self.cache.attend(self.layer, query, key, value)


def attention_modules(language_model) -> list:
    """The self-attention modules of this stage's LM layers, in order."""
    return [layer.self_attention for layer in language_model.decoder.layers]


@contextmanager
def cached_attention(language_models: list, cache: KVCache):
    """Install CachedAttention in every layer of the given LMs (one per chunk); restore on exit."""
    swapped = []
    try:
        index = 0
        for lm in language_models:
            for attn in attention_modules(lm):
                swapped.append((attn, attn.core_attention))
                attn.core_attention = CachedAttention(attn.core_attention, index, cache)
                index += 1
        yield cache
    finally:
        for attn, inner in swapped:
            attn.core_attention = inner
