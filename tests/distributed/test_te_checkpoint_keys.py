"""A checkpoint written with the local layer spec loads strictly into a model whose final norm
carries ``_extra_state`` the way Transformer Engine's RMSNorm does (TE's ops-based norms serialize
their FP8 metadata there; Megatron's TENorm is that module, and TransformerBlock checkpoints it
through its plain state dict). TE itself needs CUDA, so a norm with the same checkpoint entries
stands in for it here; tests/gpu/test_model_te.py does the real load on a GPU."""

from __future__ import annotations

import torch

import model_cases as mc
from launcher import launch


def _te_like_norm():
    """The local norm plus a TE-style extra state (an empty byte tensor, as TE writes without
    FP8 metadata)."""
    from megatron_sail.models.layer_specs import SPNorm

    class TELikeNorm(SPNorm):
        """Final norm whose checkpoint entries are TE RMSNorm's: weight and _extra_state."""

        def get_extra_state(self):
            return torch.empty(0, dtype=torch.uint8)

        def set_extra_state(self, state):
            assert state is None or isinstance(state, torch.Tensor)

    return TELikeNorm


def _run(rank, root):
    """Save the local-spec model; load it into the TE-like one (strict); return both weights."""
    from megatron_sail.checkpoint import dcp
    from megatron_sail.config.parallel import ParallelConfig
    from megatron_sail.models import layer_specs
    from megatron_sail.platform import distributed as D

    D.initialize(ParallelConfig())
    cfg = mc.variant("mha_untied_rms")
    local = mc.build_ours(cfg)
    mc.randomize_(local, 3)
    dcp.save_model([local], root)
    original = layer_specs.language_block_spec

    def te_like(config, use_te, vp_stage=None):
        sub = original(config, use_te, vp_stage)
        sub.layer_norm = _te_like_norm()
        return sub

    layer_specs.language_block_spec = te_like
    try:
        other = mc.build_ours(cfg)
    finally:
        layer_specs.language_block_spec = original
    assert "language_model.decoder.final_layernorm._extra_state" in other.state_dict()
    dcp.load_model([other], root)
    weights = lambda m: {k: v.detach().clone() for k, v in m.named_parameters()}  # noqa: E731
    return weights(local), weights(other)


def test_local_spec_checkpoint_loads_into_te_style_final_norm(tmp_path):
    local, other = launch(_run, 1, str(tmp_path / "ck"), timeout=300)[0]
    assert local.keys() == other.keys()
    for k in local:
        assert torch.equal(local[k], other[k]), k
