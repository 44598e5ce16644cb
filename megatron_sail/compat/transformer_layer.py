"""Internals of megatron-core's TransformerLayer and parallel linears that the ViT layer relies on.

Written for megatron-core 0.16.1 (see ``WORKAROUNDS`` in ``__init__.py``):

- ``layer_bda_hooks``: a TransformerLayer keeps its two bias-dropout-add steps as the attributes
  ``self_attn_bda`` and ``mlp_bda`` and calls each as ``bda(training, fused)(out_with_bias,
  residual, dropout_prob)`` after the attention and after the MLP. Layer scale and drop path
  (models/vit_layer.py) replace those attributes with a function of the same contract.
- ``qkv_bias_off``: Megatron gives ``linear_qkv`` a bias whenever the other linears have one
  (``add_bias_linear``); AIMv2-like layers with biases elsewhere but none on q/k/v drop it after
  construction. The local linear reads ``self.bias`` in its forward (None: no bias); Transformer
  Engine's reads its ``use_bias`` flag too.
"""

from __future__ import annotations

from typing import Callable

import torch

BiasDropoutAdd = Callable[[tuple, torch.Tensor, float], torch.Tensor]
"""``(out_with_bias, residual, dropout_prob) -> hidden``: one bias-dropout-add step."""


def replace_bias_dropout_add(layer, attention: Callable[[bool], BiasDropoutAdd], mlp) -> None:
    """Make ``layer`` (a TransformerLayer) run ``attention(training)`` / ``mlp(training)`` as its
    bias-dropout-add after the attention and after the MLP (Megatron's fusion flag is ignored)."""
    layer.self_attn_bda = lambda training, _fused: attention(training)
    layer.mlp_bda = lambda training, _fused: mlp(training)


def drop_linear_bias(linear: torch.nn.Module) -> None:
    """Remove the bias Megatron built on a parallel linear (local or Transformer Engine)."""
    linear.register_parameter("bias", None)
    if hasattr(linear, "use_bias"):
        linear.use_bias = False
