"""Model FLOPs of one training step (ViT + projector + LM) and MFU against the device's peak.

The definition is the one issue 6 uses for every number we compare (ours and the transformers
reference): 3 x forward matmul FLOPs (forward once, backward twice), counting

* every Linear / conv as 2 * in * out per token (bias, norms, activations, softmax, RoPE and
  the embedding lookup are not matmuls and are left out; the LM head is counted),
* attention as 4 * heads * head_dim FLOPs per attended (query, key) pair (Q.K^T and P.V),
  where the ViT attends bidirectionally within each tile (n^2 pairs) and the LM attends causally
  within each *real* packed sub-sequence (L * (L + 1) / 2 pairs, the diagonal included).

So a row packing four 1024-token samples costs a quarter of the attention FLOPs of one
4096-token sample, and padding segments cost nothing: FLOPs measure useful work, not the
kernels' wasted work. Only real tokens count for the matmuls too, for the same reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np


@dataclass(frozen=True)
class FlopsShape:
    """The dimensions the FLOPs count needs, for one SAIL-VL-style model."""

    vit_hidden: int
    """ViT width (InternViT-300M: 1024)."""
    vit_layers: int
    """ViT transformer layers (24)."""
    vit_ffn: int
    """ViT MLP hidden size (4096)."""
    vit_tokens_per_tile: int
    """Tokens one tile is inside the ViT: patches plus class token (32 * 32 + 1 = 1025)."""
    patch_dim: int
    """Inputs of the patch-embedding conv per patch: channels * patch * patch (3 * 14 * 14)."""
    tokens_per_tile: int
    """Visual tokens per tile after pixel shuffle, i.e. projector outputs per tile (256)."""
    projector_in: int
    """Projector input width: vit_hidden / downsample_ratio^2 (4096)."""
    lm_hidden: int
    """LM width (Qwen2.5-1.5B: 1536)."""
    lm_layers: int
    """LM decoder layers (28)."""
    lm_heads: int
    """LM query heads (12)."""
    lm_kv_heads: int
    """LM key/value heads (2)."""
    lm_head_dim: int
    """LM per-head width (128)."""
    lm_ffn: int
    """LM MLP hidden size (8960)."""
    vocab_size: int
    """Rows of the output layer (151936); padding rows count, the kernel multiplies them."""
    lm_gated_mlp: bool = True
    """SwiGLU (three matrices) rather than a plain two-matrix MLP."""
    lm_experts: int = 0
    """Routed experts per MoE layer (0: dense). ``lm_ffn`` is then the active width, top-k x
    expert width, and the router adds a hidden x experts matrix per token."""
    vit_class_tokens: int = 1
    """Tokens the ViT adds to the patches (InternViT: 1 class token; AIMv2: none)."""
    vit_gated_mlp: bool = False
    """ViT MLP is SwiGLU (three matrices, AIMv2) rather than a two-matrix GELU MLP (InternViT)."""


def shape_from_model_config(model, tile_size: int | None = None) -> FlopsShape:
    """The FLOPs shape of a ``config.model.ModelConfig`` (tiles of ``tile_size`` px, default trained size).

    The dimensions come from the vision and language family specs (``models/families``); only
    the ViT layers that run count (layers after ``select_layer`` are never computed).
    """
    from megatron_sail.models.families import language_family, vision_family

    v, lm = model.vision, model.language
    geometry = model.geometry(tile_size)
    merge = model.projector.merge
    return FlopsShape(
        **vision_family(v.family).flops_fields(v, geometry),
        **language_family(lm.family).flops_fields(lm),
        tokens_per_tile=geometry.tokens_per_tile,
        projector_in=v.hidden_size * merge * merge,
    )


def vit_forward_flops(s: FlopsShape, tiles: int) -> float:
    """Forward FLOPs of the ViT over ``tiles`` tiles: patch conv, layers, in-tile attention."""
    n = s.vit_tokens_per_tile
    patches = n - s.vit_class_tokens
    mlp = (3 if s.vit_gated_mlp else 2) * s.vit_hidden * s.vit_ffn
    per_token_layer = 2 * (4 * s.vit_hidden * s.vit_hidden + mlp)
    attention = 4 * s.vit_hidden * n * n
    per_tile = 2 * patches * s.patch_dim * s.vit_hidden + s.vit_layers * (n * per_token_layer + attention)
    return float(tiles) * per_tile


def projector_forward_flops(s: FlopsShape, tiles: int) -> float:
    """Forward FLOPs of the two projector Linears over the visual tokens of ``tiles`` tiles."""
    per_token = 2 * (s.projector_in * s.lm_hidden + s.lm_hidden * s.lm_hidden)
    return float(tiles) * s.tokens_per_tile * per_token


def lm_forward_flops(s: FlopsShape, seqlens: Iterable[int]) -> float:
    """Forward FLOPs of the LM over real sub-sequences of the given lengths (causal attention)."""
    q = s.lm_heads * s.lm_head_dim
    kv = s.lm_kv_heads * s.lm_head_dim
    mlp = (3 if s.lm_gated_mlp else 2) * s.lm_hidden * s.lm_ffn + s.lm_hidden * s.lm_experts
    per_token_layer = 2 * (s.lm_hidden * (q + 2 * kv) + q * s.lm_hidden + mlp)
    per_token_head = 2 * s.lm_hidden * s.vocab_size
    tokens = 0
    pairs = 0
    for length in seqlens:
        tokens += int(length)
        pairs += int(length) * (int(length) + 1) // 2
    attention = 4 * q * pairs
    return float(tokens) * (s.lm_layers * per_token_layer + per_token_head) + s.lm_layers * attention


def real_seqlens(cu_seqlens: Sequence[int] | np.ndarray, num_samples: int) -> list[int]:
    """Lengths of the real samples of one packed row; the padding segments after them are dropped."""
    cu = np.asarray(cu_seqlens, dtype=np.int64)
    if cu.ndim != 1 or len(cu) < 2 or cu[0] != 0 or np.any(np.diff(cu) < 0):
        raise ValueError(f"cu_seqlens must start at 0 and not decrease, got {cu.tolist()}")
    if not 0 <= num_samples <= len(cu) - 1:
        raise ValueError(f"num_samples={num_samples} but cu_seqlens has {len(cu) - 1} segments")
    return np.diff(cu)[:num_samples].tolist()


def step_flops(s: FlopsShape, seqlens: Iterable[int], tiles: int) -> float:
    """Model FLOPs of one training step: 3 x forward of ViT + projector + LM.

    ``seqlens`` holds the real sub-sequence lengths of every row of the step (all micro-batches,
    all ranks the caller wants counted); ``tiles`` the image tiles of those rows.
    """
    fwd = vit_forward_flops(s, tiles) + projector_forward_flops(s, tiles) + lm_forward_flops(s, seqlens)
    return 3.0 * fwd


# Dense (no sparsity) bf16 tensor-core peaks in FLOP/s, from the vendors' data sheets. Matched
# against torch.cuda.get_device_name() in order: more specific names first.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("GB200", 2.5e15),
    ("B200", 2.25e15),
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM (name "NVIDIA H100 80GB HBM3")
    ("H800", 989e12),
    ("H20", 148e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("MI300X", 1307e12),
    ("MI325X", 1307e12),
)


def peak_flops_for_name(name: str) -> float | None:
    """Dense bf16 peak of the GPU with this device name, or None when unknown."""
    for key, peak in PEAK_BF16_FLOPS:
        if key.lower() in name.lower():
            return peak
    return None


def device_peak_flops(device=None) -> float | None:
    """Dense bf16 peak FLOP/s of the current (or given) CUDA device; None on CPU or unknown GPU.

    With None, MFU is reported as NaN in logs and null in JSON: a CPU has no comparable peak.
    """
    import torch

    if not torch.cuda.is_available():
        return None
    dev = torch.device(device) if device is not None else torch.device("cuda")
    if dev.type != "cuda":
        return None
    return peak_flops_for_name(torch.cuda.get_device_name(dev))


def mfu(flops_per_s_per_device: float, peak: float | None) -> float:
    """Model FLOPs utilization: achieved FLOP/s per device over its peak (NaN without a peak)."""
    if peak is None or peak <= 0 or not math.isfinite(flops_per_s_per_device):
        return float("nan")
    return flops_per_s_per_device / peak
