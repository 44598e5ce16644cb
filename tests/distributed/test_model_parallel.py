"""TP=2, PP=2 (uneven stages) and TP=2+SP give the same logits, losses and gradients as one rank.

One single-rank launch computes the references (and checks them against transformers'
InternVL); each parallel layout then loads the same weights, sliced per rank, runs Megatron's
pipeline schedule on the same two micro-batches, and compares its shard with the reference.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import model_cases as mc
from launcher import launch

CASES = {  # name: (model variant, ParallelConfig kwargs)
    "tp2": ("base", dict(tp=2)),
    "tp2_sp": ("mha_untied_rms", dict(tp=2, sp=True)),
    "pp2_uneven": ("pp3", dict(pp=2, first_stage_layers=1, last_stage_layers=2)),
    "qwen3_tp2_sp": ("qwen3", dict(tp=2, sp=True)),
    "qwen3_pp2": ("qwen3", dict(pp=2)),
}


def _variant(name):
    """Model variants of this test (pp3: three LM layers to split 1 + 2)."""
    if name == "pp3":
        cfg = mc.variant("base")
        return dataclasses.replace(cfg, language=dataclasses.replace(cfg.language, num_layers=3))
    return mc.variant(name)


def _run_schedule(model, batches, forward_only):
    """Megatron's forward-backward schedule over the micro-batches; returns last-stage outputs."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def step(data_iterator, m):
        b = next(data_iterator)
        labels = None if forward_only else b["labels"]
        out = m(b["input_ids"], b["tiles"], labels=labels, cu_seqlens=b["cu_seqlens"])

        def loss_func(output):
            if forward_only:
                return output.sum() * 0.0, {"out": output.detach()}
            return output.sum() / output.numel(), {"out": output.detach()}

        return out, loss_func

    s = batches[0]["input_ids"].numel()
    return get_forward_backward_func()(
        forward_step_func=step,
        data_iterator=iter(batches),
        model=[model],
        num_microbatches=len(batches),
        seq_length=s,
        micro_batch_size=1,
        forward_only=forward_only,
    )


def _reduce_grads(model):
    """What Megatron's finalize_model_grads does for these layouts: SP params and (with the LM's
    per-head QK-norm) q/k_layernorm weights summed over TP, tied embedding grads summed between
    the first and last pipeline stage."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    sp, qk = model.parallel.sequence_parallel, model.config.qk_layernorm
    if ps.get_tensor_model_parallel_world_size() > 1:
        for name, p in model.named_parameters():
            summed = (sp and getattr(p, "sequence_parallel", False)) or (
                qk and ("q_layernorm" in name or "k_layernorm" in name)
            )
            if summed and p.grad is not None:
                dist.all_reduce(p.grad, group=ps.get_tensor_model_parallel_group())
    if model.model_config.language.tie_embeddings and ps.get_pipeline_model_parallel_world_size() > 1:
        w = model.shared_embedding_or_output_weight()
        if w is not None:
            dist.all_reduce(w.grad, group=ps.get_embedding_group())


def _grads(model):
    """Parameter gradients by state-dict key (zeros where a parameter got none)."""
    return {
        k: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().clone()
        for k, p in model.named_parameters()
    }


def _run(rank, variant, par, full_sd, batches):
    """One rank of one layout: logits (forward only), then per-token losses and gradients."""
    from megatron.core import parallel_state as ps

    from megatron_sail.config.parallel import ParallelConfig
    from megatron_sail.convert.hf_internvl import shard_for_model
    from megatron_sail.platform import distributed as D

    parallel = ParallelConfig(**par)
    D.initialize(parallel)
    cfg = _variant(variant)
    model = mc.build_ours(
        cfg, parallel, pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage()
    )
    missing, unexpected = model.load_state_dict(shard_for_model(full_sd, model), strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
    model.eval()
    with torch.no_grad():
        logits = [o["out"] for o in _run_schedule(model, batches, True)]
    model.train()
    losses = [o["out"] for o in _run_schedule(model, batches, False)]
    _reduce_grads(model)
    result = {"logits": logits, "losses": losses}
    if full_sd.get("__grads__") is not None:  # compare this rank's shard with the reference
        ref = shard_for_model(full_sd["__grads__"], model)
        mine = _grads(model)
        result["grad_err"] = {
            k: ((mine[k] - ref[k]).abs().max().item(), ref[k].abs().max().item()) for k in mine
        }
    else:
        result["grads"] = _grads(model)
    return result


def _references(rank, variants):
    """Single-rank references per variant: weights (from a random HF model), logits, grads."""
    from megatron_sail.convert.hf_internvl import hf_to_ours

    out = {}
    for name in variants:
        cfg = _variant(name)
        hf = mc.hf_model(cfg, seed=7)
        full = hf_to_ours(hf.state_dict(), cfg)
        batches = mc.micro_batches(cfg)
        res = _run(rank, name, {}, full, batches)
        with torch.no_grad():  # the reference itself matches transformers on each packed row
            b = batches[0]
            hf_logits = hf(input_ids=b["input_ids"][:1, :11], pixel_values=b["tiles"][:1]).logits
        res["hf_err"] = (hf_logits - res["logits"][0][:1, :11]).abs().max().item()
        out[name] = dict(res, full=full, batches=batches)
    return out


@pytest.fixture(scope="module")
def references():
    """Reference results for every variant used below (one spawned process)."""
    return launch(_references, 1, sorted({v for v, _ in CASES.values()}), timeout=600)[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_parallel_matches_single_rank(references, case):
    variant, par = CASES[case]
    ref = references[variant]
    assert ref["hf_err"] < 1e-4, f"reference disagrees with transformers: {ref['hf_err']}"
    full = dict(ref["full"], __grads__=ref["grads"])
    results = launch(_run, 2, variant, par, full, ref["batches"], timeout=600)
    last = [r for r in results if r["logits"]]  # ranks of the last pipeline stage
    assert last, "no rank returned logits"
    for r in last:
        for got, want in zip(r["logits"], ref["logits"]):
            assert got.shape == want.shape
            assert (got - want).abs().max().item() < 1e-4
        for got, want in zip(r["losses"], ref["losses"]):
            assert (got - want).abs().max().item() < 1e-4
    checked = 0
    for r in results:
        for key, (err, scale) in r["grad_err"].items():
            assert err <= 1e-4 * max(1.0, scale), f"{case} grad {key}: err {err} (scale {scale})"
            checked += 1
    assert checked > 20
    vision_scale = [
        s for r in results for k, (_, s) in r["grad_err"].items() if k.startswith("vision_model.")
    ]
    assert vision_scale and max(vision_scale) > 0, "ViT gradients were all zero"
