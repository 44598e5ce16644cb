"""GPU only: generation on CUDA. The local spec in fp32 gives transformers' greedy tokens; the TE
spec (bf16, through generator_from_model) decodes with the KV-cache wrapper around TE's core
attention, and its first token is the argmax of the TE model's own full forward. Skips without
CUDA (and the TE part without Transformer Engine)."""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import generate_cases as gc
    from megatron_sail.inference import load_generator
    from megatron_sail.inference.loading import LoadConfig

    paths = gc.make_checkpoints(tmp_path_factory.mktemp("gen_gpu"))
    gen = load_generator(paths["hf"], gc.gen_config(batch_size=4), LoadConfig(dtype="float32"))
    return gc, paths, gen


def test_fp32_local_spec_matches_transformers_on_cuda(setup):
    gc, paths, gen = setup
    reqs = gc.requests(paths["images"])
    prompts = [gen.prompts.build(r, gen.cfg.max_new_tokens, i) for i, r in enumerate(reqs)]
    ours = [r.token_ids for r in gen.generate(reqs)]
    assert ours == gc.hf_reference(paths["hf"], prompts, gen.stop_ids)


def test_te_spec_generates_through_the_cache_wrapper(setup):
    pytest.importorskip("transformer_engine")
    from megatron_sail.convert.hf_internvl import canonical_key
    from megatron_sail.inference import generator_from_model
    from megatron_sail.models.sail_vl import SailVLModel

    gc, paths, gen = setup
    local = gen.chunks[0]
    te = SailVLModel(gen.model_config, use_te=True, dtype=torch.bfloat16).cuda()
    src = local.state_dict()
    te.load_state_dict(
        {
            k: src[canonical_key(k)].to(torch.bfloat16)
            for k in te.state_dict()
            if not k.endswith("_extra_state")
        },
        strict=False,
    )
    te.train()
    live = generator_from_model(
        [te],
        gen.model_config,
        gen.tokenizer,
        gen.settings,
        gc.gen_config(batch_size=4, min_new_tokens=gc.MAX_NEW),
    )
    reqs = gc.requests(paths["images"])
    results = live.generate(reqs)
    assert te.training
    assert [len(r.token_ids) for r in results] == [gc.MAX_NEW, gc.MAX_NEW, gc.MAX_NEW, 6]
    te.eval()
    for req, res in zip(reqs, results):
        p = live.prompts.build(req, 1)
        ids = torch.tensor(p.ids, device="cuda")[None]
        tiles = p.tiles.cuda().to(torch.bfloat16) if p.tiles.size(0) else None
        with torch.no_grad():
            logits = te(ids, tiles)[0, -1].float()
        logits[list(live.stop_ids)] = float("-inf")  # min_new_tokens masks them at step 0
        assert res.token_ids[0] == int(logits.argmax())
