"""The TransformerConfig settings every model part shares (the ViT and every language family):
its dtype flags, and Megatron's fused kernels turned off, so that one config runs the same on
CPU/gloo and on GPUs."""

from __future__ import annotations

import torch


def portable_settings(dtype: torch.dtype) -> dict:
    """TransformerConfig keyword arguments: parameters and pipeline messages in ``dtype``, the
    bf16/fp16 flags that follow from it, and no fused bias/dropout/RoPE/softmax/norm kernels."""
    return dict(
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
    )
