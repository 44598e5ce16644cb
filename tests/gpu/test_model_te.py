"""GPU only: the Transformer Engine layer spec computes the same model as the local spec,
and the local spec matches transformers' InternVL on CUDA. Skips cleanly without CUDA/TE.

The TE models are built in bf16: with packed (THD) input, TE's attention has no fp32 backend
(its unfused attention refuses THD; flash and cuDNN attention take fp16/bf16 only). The bf16
tolerance: TE's error against the fp32 local model may be at most a few times the error of the
local spec run in bf16 on the same inputs."""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def setup():
    import model_cases as mc
    from megatron_sail.config.parallel import ParallelConfig
    from megatron_sail.convert.hf_internvl import load_hf_into
    from megatron_sail.platform import distributed as D

    D.initialize(ParallelConfig())
    cfg = mc.variant("mha_untied_rms")
    hf = mc.hf_model(cfg, seed=5).cuda()
    local = mc.build_ours(cfg).cuda().eval()
    load_hf_into(local, {k: v.cpu() for k, v in hf.state_dict().items()}, cfg)
    samples = [
        mc.sample(cfg, [3, 4], [2], 32, 1),
        mc.sample(cfg, [5], [], 32, 2),
        mc.sample(cfg, [2, 3], [1], 32, 3),
    ]
    ids, tiles, cu = mc.pack(samples, length=48)
    return mc, cfg, hf, local, samples, (ids.cuda(), tiles.cuda(), cu.cuda())


def test_local_spec_matches_transformers_on_cuda(setup):
    mc, cfg, hf, local, samples, _ = setup
    ids, tiles = samples[0]
    with torch.no_grad():
        ref = hf(input_ids=ids[None].cuda(), pixel_values=tiles.cuda()).logits
        got = local(ids[None].cuda(), tiles.cuda())
    assert (ref - got).abs().max().item() < 1e-3


def _bf16_local(cfg, local):
    """The local spec in bf16 with the fp32 model's weights: the bf16 error yardstick."""
    from megatron_sail.models.sail_vl import SailVLModel

    model = SailVLModel(cfg, use_te=False, dtype=torch.bfloat16).cuda().eval()
    model.load_state_dict(local.state_dict(), strict=True)
    return model


def _assert_within_bf16(te, local16, local, inputs):
    """TE's logits are as close to the fp32 local model's as bf16 allows."""
    ids, tiles, cu = inputs
    with torch.no_grad():
        want = local(ids, tiles, cu_seqlens=cu).float()
        got = te(ids, tiles, cu_seqlens=cu).float()
        yardstick = local16(ids, tiles, cu_seqlens=cu).float()
    err, ref_err = (got - want).abs().max().item(), (yardstick - want).abs().max().item()
    scale = max(1.0, want.abs().max().item())
    print(f"max |TE bf16 - fp32| {err:.3e}, |local bf16 - fp32| {ref_err:.3e}, scale {scale:.2f}")
    assert err <= max(4 * ref_err, 1e-2 * scale), (err, ref_err, scale)


def test_te_spec_matches_local_spec(setup):
    pytest.importorskip("transformer_engine")
    from megatron_sail.convert.hf_internvl import canonical_key
    from megatron_sail.models.sail_vl import SailVLModel

    mc, cfg, hf, local, samples, inputs = setup
    te = SailVLModel(cfg, use_te=True, dtype=torch.bfloat16).cuda().eval()
    src = local.state_dict()
    te.load_state_dict(
        {k: src[canonical_key(k)] for k in te.state_dict() if not k.endswith("_extra_state")}, strict=False
    )
    _assert_within_bf16(te, _bf16_local(cfg, local), local, inputs)


def test_checkpoint_saved_with_local_spec_loads_into_te_spec(setup, tmp_path):
    """What conversion writes (local spec, on the CPU) is what GPU training loads (TE spec)."""
    pytest.importorskip("transformer_engine")
    from megatron_sail.checkpoint import dcp
    from megatron_sail.models.sail_vl import SailVLModel

    mc, cfg, hf, local, samples, inputs = setup
    dcp.save_model([local], tmp_path / "ck")
    te = SailVLModel(cfg, use_te=True, dtype=torch.bfloat16).cuda().eval()
    dcp.load_model([te], tmp_path / "ck")  # strict: the final norm's _extra_state too
    _assert_within_bf16(te, _bf16_local(cfg, local), local, inputs)
