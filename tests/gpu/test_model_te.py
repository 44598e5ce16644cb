"""GPU only: the Transformer Engine layer spec computes the same model as the local spec,
and the local spec matches transformers' InternVL on CUDA. Skips cleanly without CUDA/TE."""
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))


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
    samples = [mc.sample(cfg, [3, 4], [2], 32, 1), mc.sample(cfg, [5], [], 32, 2),
               mc.sample(cfg, [2, 3], [1], 32, 3)]
    ids, pos, tiles, cu = mc.pack(samples, length=48)
    return mc, cfg, hf, local, samples, (ids.cuda(), pos.cuda(), tiles.cuda(), cu.cuda())


def test_local_spec_matches_transformers_on_cuda(setup):
    mc, cfg, hf, local, samples, _ = setup
    ids, tiles = samples[0]
    with torch.no_grad():
        ref = hf(input_ids=ids[None].cuda(), pixel_values=tiles.cuda()).logits
        got = local(ids[None].cuda(), None, tiles.cuda())
    assert (ref - got).abs().max().item() < 1e-3


def test_te_spec_matches_local_spec(setup):
    pytest.importorskip("transformer_engine")
    from megatron_sail.convert.hf_internvl import canonical_key
    from megatron_sail.models.sail_vl import SailVLModel

    mc, cfg, hf, local, samples, (ids, pos, tiles, cu) = setup
    te = SailVLModel(cfg, use_te=True).cuda().eval()
    src = local.state_dict()
    te.load_state_dict({k: src[canonical_key(k)] for k in te.state_dict()
                        if not k.endswith("_extra_state")}, strict=False)
    with torch.no_grad():
        want = local(ids, pos, tiles, cu_seqlens=cu)
        got = te(ids, pos, tiles, cu_seqlens=cu)
    assert (want - got).abs().max().item() < 2e-2 * max(1.0, want.abs().max().item())


def test_checkpoint_saved_with_local_spec_loads_into_te_spec(setup, tmp_path):
    """What conversion writes (local spec, on the CPU) is what GPU training loads (TE spec)."""
    pytest.importorskip("transformer_engine")
    from megatron_sail.models.sail_vl import SailVLModel
    from megatron_sail.training import dist_ckpt

    mc, cfg, hf, local, samples, (ids, pos, tiles, cu) = setup
    dist_ckpt.save_model([local], tmp_path / "ck")
    te = SailVLModel(cfg, use_te=True).cuda().eval()
    dist_ckpt.load_model([te], tmp_path / "ck")
    with torch.no_grad():
        want = local(ids, pos, tiles, cu_seqlens=cu)
        got = te(ids, pos, tiles, cu_seqlens=cu)
    assert (want - got).abs().max().item() < 2e-2 * max(1.0, want.abs().max().item())
