"""Drop path (stochastic depth) in the ViT under TP=2 + sequence parallelism draws the same
decisions on both TP ranks, so the sharded model computes what one rank computes from the same
seed. Under SP the ViT's TransformerBlock runs inside Megatron's per-TP-rank RNG fork; drawing
there would drop a tile's tokens on one rank and keep them on the other."""

from __future__ import annotations

import dataclasses

import torch

import model_cases as mc
from launcher import launch

SEED = 11


def _config():
    """A 3-layer ViT with heavy drop path (layer rates 0, 0.3, 0.6) in a tiny SAIL-VL model."""
    cfg = mc.variant("mha_untied_rms")
    return dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, drop_path_rate=0.6))


def _train_forward(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(ViT features, mean per-token loss) in training mode, both RNG streams seeded alike on
    every rank right before the forward."""
    from megatron.core import tensor_parallel

    torch.manual_seed(SEED)
    tensor_parallel.model_parallel_cuda_manual_seed(SEED)
    model.train()
    with torch.no_grad():
        feats = model.vision_model(batch["tiles"])
    torch.manual_seed(SEED)
    tensor_parallel.model_parallel_cuda_manual_seed(SEED)
    with torch.no_grad():
        loss = model(
            batch["input_ids"], batch["tiles"], labels=batch["labels"], cu_seqlens=batch["cu_seqlens"]
        ).mean()
    return feats, loss


def _run(rank, par, full):
    """One rank: load the (sliced) weights, return train-mode features and loss (and, on the
    reference, the eval-mode loss and the full weights)."""
    from megatron_sail.config.parallel import ParallelConfig
    from megatron_sail.convert.hf_internvl import shard_for_model
    from megatron_sail.platform import distributed as D

    parallel = ParallelConfig(**par)
    D.initialize(parallel, seed=SEED)
    model = mc.build_ours(_config(), parallel)
    if full is None:
        mc.randomize_(model, SEED)  # layer scales of 0.1 would make each branch's share small
    else:
        model.load_state_dict(shard_for_model(full, model), strict=False)
    batch = mc.micro_batches(_config())[0]
    feats, loss = _train_forward(model, batch)
    out = {"feats": feats, "loss": loss.item()}
    if full is None:
        model.eval()
        with torch.no_grad():
            out["eval_feats"] = model.vision_model(batch["tiles"])
        out["full"] = {
            k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")
        }
    return out


def test_drop_path_under_tp2_sp_matches_one_rank():
    ref = launch(_run, 1, {}, None, timeout=300)[0]
    results = launch(_run, 2, dict(tp=2, sp=True), ref["full"], timeout=300)
    # Drop path really changed the features (some tile was dropped in some layer).
    scale = ref["eval_feats"].abs().max().item()
    assert (ref["feats"] - ref["eval_feats"]).abs().max().item() > 1e-2 * scale
    print("max feature gap", [(r["feats"] - ref["feats"]).abs().max().item() for r in results])
    for r in results:
        assert r["feats"].shape == ref["feats"].shape
        assert (r["feats"] - ref["feats"]).abs().max().item() < 1e-4 * max(1.0, scale)
        assert abs(r["loss"] - ref["loss"]) < 1e-4 * max(1.0, abs(ref["loss"]))
