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
    visible: Optional[torch.Tensor] = None
    """decode: bool [batch, 1, 1, max_len], the cache slots each row's query sees (set by
    ``KVCache.decode_step``, shared by every layer)."""
    cos: Optional[torch.Tensor] = None
    """decode: [batch, 1, 1, rot_dim] RoPE cosines at ``positions`` (None: Megatron applied RoPE)."""
    sin: Optional[torch.Tensor] = None
    """decode: [batch, 1, 1, rot_dim] RoPE sines at ``positions``."""


class RopeTable:
    """cos / sin of a RoPE frequency table [max_len, 1, 1, rot_dim], computed once per cache.

    Same arithmetic as Megatron's unfused ``_apply_rotary_pos_emb_bshd`` (cos and sin of the same
    frequencies cast to the activation dtype, then ``t * cos + rotate_half(t) * sin``), so the
    keys a decode step caches equal those Megatron's own RoPE would give; only the per-layer
    cos/sin evaluation is gone. ``rotate_half(t) * sin`` is computed as ``roll(t) * sin'``
    with the sign of sin's first half folded into the table: the same products bit for bit
    (negating a factor is exact), in one kernel instead of chunk, neg and cat."""

    def __init__(self, freqs: torch.Tensor, dtype: torch.dtype):
        self.cos = torch.cos(freqs).to(dtype)
        sin = torch.sin(freqs).to(dtype)
        self.rot_dim = freqs.size(-1)
        half = self.rot_dim // 2
        self.sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)

    def at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, signed sin rows of the given positions: [batch, 1, 1, rot_dim]."""
        return self.cos.index_select(0, positions), self.sin.index_select(0, positions)

    def apply(
        self, query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate query and key [batch, 1, heads, dim] (non-interleaved halves, as Qwen and
        Megatron's default) together: one set of kernels for both."""
        heads = query.size(2)
        t = torch.cat((query, key), dim=2)
        whole = self.rot_dim == t.size(-1)
        rot = t if whole else t[..., : self.rot_dim]
        rot = (rot * cos) + (rot.roll(self.rot_dim // 2, dims=-1) * sin)
        if not whole:
            rot = torch.cat((rot, t[..., self.rot_dim :]), dim=-1)
        return rot[:, :, :heads], rot[:, :, heads:]


class KVCache:
    """Per-layer key/value buffers [batch, groups, max_len, head_dim], allocated on first use.

    Decode steps have static shapes: attention always spans the whole buffer under a mask of the
    filled slots (built once per step, not per layer), writes go to each row's position by
    index, and nothing reads a value back to the host, so a decode step can be captured in a
    CUDA graph with ``positions`` as its input buffer."""

    def __init__(self, batch: int, max_len: int, rope: Optional[RopeTable] = None):
        self.batch, self.max_len = batch, max_len
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.step: Optional[CacheStep] = None
        self.rope = rope
        self._slots: Optional[torch.Tensor] = None
        self._rows: Optional[torch.Tensor] = None

    def decode_step(self, positions: torch.Tensor) -> CacheStep:
        """The step record of one decode step at ``positions`` (int64 [batch], on the device)."""
        if self._slots is None or self._slots.device != positions.device:
            self._slots = torch.arange(self.max_len, device=positions.device)
            self._rows = torch.arange(self.batch, device=positions.device)
        visible = (self._slots[None, :] <= positions[:, None])[:, None, None, :]
        cos = sin = None
        if self.rope is not None:
            cos, sin = self.rope.at(positions)
        self.step = CacheStep("decode", positions=positions, visible=visible, cos=cos, sin=sin)
        return self.step

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

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Decode attention: query/key/value [batch, 1, heads, head_dim] -> [batch, 1, heads*dim]."""
        step = self.step
        if step.cos is not None:
            query, key = self.rope.apply(query, key, step.cos, step.sin)
        kbuf, vbuf = self._buffers(layer, key)
        kbuf[self._rows, :, step.positions] = key[:, 0]
        vbuf[self._rows, :, step.positions] = value[:, 0]
        q = query[:, 0].unsqueeze(2)  # [batch, heads, 1, dim]
        out = F.scaled_dot_product_attention(
            q, kbuf, vbuf, attn_mask=step.visible, enable_gqa=q.size(1) != kbuf.size(1)
        )
        return out.reshape(self.batch, 1, -1)


class CachedAttention(torch.nn.Module):
    """Core attention wrapper: prefill through the wrapped module, decode from the cache."""

    def __init__(self, inner: torch.nn.Module, layer: int, cache: KVCache):
        super().__init__()
        self.inner = inner
        self.layer = layer
        self.cache = cache

    def forward(
        self,
        query,
        key,
        value,
        attention_mask=None,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ):
        """Same contract as Megatron core attention (sbhd or thd inputs)."""
        step = self.cache.step
        if step is None:
            raise RuntimeError("CachedAttention called outside a generation step")
        if step.kind == "prefill":
            out = self.inner(
                query,
                key,
                value,
                attention_mask,
                attn_mask_type=attn_mask_type,
                attention_bias=attention_bias,
                packed_seq_params=packed_seq_params,
            )
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
