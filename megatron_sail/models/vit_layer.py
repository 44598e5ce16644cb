"""The vision encoder's transformer layer: Megatron's TransformerLayer with InternViT's layer
scale and stochastic depth (drop path) in its bias-dropout-add step.

Its own module so that ``layer_specs.vision_layer_spec`` can name it without importing the
encoder (models/vit.py), which itself asks layer_specs for the spec.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel.random import get_data_parallel_rng_tracker_name
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_sail.compat import transformer_layer as compat


def _tp_shared_rng():
    """An RNG stream that is the same on every tensor-parallel rank: Megatron's
    "data-parallel" tracker state (seeded with the run seed on all ranks). Under sequence
    parallelism the TransformerBlock runs inside the per-TP-rank fork, where each rank would
    draw its own numbers. Without a seeded tracker (no parallel run) the current stream serves."""
    tracker = tensor_parallel.get_cuda_rng_tracker()
    name = get_data_parallel_rng_tracker_name()
    return tracker.fork(name) if name in tracker.get_states() else nullcontext()


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole tiles (batch dim 1 of [s, b, h]) with probability p.

    The decisions come from a stream shared by the TP ranks, so that under sequence
    parallelism every rank's slice of a tile is dropped or kept together."""
    if not training or p == 0.0:
        return x
    with _tp_shared_rng():
        keep = x.new_empty(1, x.size(1), 1).bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)


class ViTLayer(TransformerLayer):
    """TransformerLayer with InternViT's layer scale (ls1, ls2) and drop path on both branches.

    Both live in the layer's bias-dropout-add step: residual + drop_path(ls * (out + bias)).
    """

    def __init__(
        self,
        config,
        submodules,
        layer_number=1,
        hidden_dropout=None,
        pg_collection=None,
        vp_stage=None,
        layer_scale_init=0.1,
        drop_path_rate=0.0,
        total_layers=1,
        qkv_bias=True,
    ):
        super().__init__(
            config,
            submodules,
            layer_number=layer_number,
            hidden_dropout=hidden_dropout,
            pg_collection=pg_collection,
            vp_stage=vp_stage,
        )

        def scale():
            p = torch.nn.Parameter(
                torch.full((config.hidden_size,), float(layer_scale_init), dtype=config.params_dtype)
            )
            p.sequence_parallel = config.sequence_parallel  # per-token op: sum grads over TP
            return p

        # layer_scale_init=None: no layer scale (AIMv2-style layers), drop path still applies
        self.ls1, self.ls2 = (None, None) if layer_scale_init is None else (scale(), scale())
        steps = max(total_layers - 1, 1)
        self.drop_path_rate = drop_path_rate * (self.layer_number - 1) / steps
        compat.replace_bias_dropout_add(
            self, self._scaled_add(lambda: self.ls1), self._scaled_add(lambda: self.ls2)
        )
        if not qkv_bias:  # Megatron gives qkv a bias whenever other linears have one
            compat.drop_linear_bias(self.self_attention.linear_qkv)

    def _scaled_add(self, get_scale):
        """The bias-dropout-add of one branch (compat/transformer_layer.py has the contract):
        residual + drop_path(scale * (out + bias))."""

        def factory(training):
            def add(out_with_bias, residual, _prob):
                out, bias = out_with_bias
                if bias is not None:
                    out = out + bias
                scale = get_scale()
                if scale is not None:
                    out = scale * out
                return residual + drop_path(out, self.drop_path_rate, training)

            return add

        return factory
