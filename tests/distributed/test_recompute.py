"""Activation recompute: same loss and gradients as without it, and the recomputation happens.

One spawned gloo rank (the CPU backend patches torch, so models never run in pytest itself)
builds the tiny model three times from the same weights: no recompute, selective LM + full
ViT, full LM. Counting forward calls of the LM's core attention and of the ViT / LM layers
shows what ran again during backward.
"""

import torch

import model_cases as mc
from launcher import launch


def _loss_grads_calls(model, mb):
    """Forward + backward of one micro-batch; returns loss, grads and forward-call counts."""
    calls = {"lm_attn": 0, "lm_layer": 0, "vit_layer": 0}

    def counter(key):
        def hook(*_):
            calls[key] += 1

        return hook

    for layer in model.language_model.decoder.layers:
        layer.self_attention.core_attention.register_forward_hook(counter("lm_attn"))
        layer.register_forward_hook(counter("lm_layer"))
    for layer in model.vision_model.encoder.layers:
        layer.register_forward_hook(counter("vit_layer"))
    model.train()
    model.zero_grad()
    loss = model(**mb).float().mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads, calls


def _run(rank):
    from megatron_sail.config.parallel import ParallelConfig
    from megatron_sail.platform import distributed as D
    from megatron_sail.training.recompute import RecomputeConfig, apply_recompute

    D.initialize(ParallelConfig())
    cfg = mc.variant("base")
    mb = mc.micro_batches(cfg)[0]
    out = {}
    state = None
    for name, rc in (
        ("none", RecomputeConfig()),
        ("selective+vit", RecomputeConfig(language="selective", vision=True)),
        ("full", RecomputeConfig(language="full")),
    ):
        model = mc.build_ours(cfg)
        if state is None:
            state = model.state_dict()
        model.load_state_dict(state)
        apply_recompute(model, rc)
        out[name] = _loss_grads_calls(model, mb)
    return out


def test_recompute_matches_and_recomputes():
    out = launch(_run, 1, timeout=300)[0]
    loss0, grads0, calls0 = out["none"]
    n_lm = calls0["lm_layer"]
    n_vit = calls0["vit_layer"]
    assert n_lm > 0 and n_vit > 0 and calls0["lm_attn"] == n_lm
    for name in ("selective+vit", "full"):
        loss, grads, _ = out[name]
        assert abs(loss - loss0) <= 1e-6 * abs(loss0), (name, loss, loss0)
        assert grads.keys() == grads0.keys()
        for k in grads0:
            torch.testing.assert_close(grads[k], grads0[k], rtol=1e-5, atol=1e-6, msg=f"{name} {k}")
    sel = out["selective+vit"][2]
    # Selective: core attention runs again in backward, whole LM layers do not; ViT fully.
    assert sel["lm_attn"] == 2 * n_lm and sel["lm_layer"] == n_lm and sel["vit_layer"] == 2 * n_vit
    full = out["full"][2]
    assert full["lm_layer"] == 2 * n_lm and full["vit_layer"] == n_vit
