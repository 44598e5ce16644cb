"""Qwen3-MoE at EP=2, TP=2+SP, TP=2+SP+EP=2 and PP=2+EP=2 gives the one-rank logits, losses and
gradients.

What the ranks see: in Megatron-Core the expert-parallel ranks are data-parallel ranks for
everything but the experts. So each layout splits every micro-batch's rows over its DP ranks
(B=2: one row each) and compares its logits and per-token losses with the reference's rows.
Gradients follow what Megatron's DDP and ``finalize_model_grads`` do without per-token loss
scaling: every rank's loss is the mean over its own rows; non-expert gradients are summed over
the DP group, expert gradients (``allreduce=False`` params) over the expert-data-parallel group,
both scaled by 1/DP (an expert saw the tokens of all DP ranks through the all-to-all, so 1/DP,
not 1/expert-DP, is the mean); then SP parameters (router, norms) and the per-head QK-norm are
summed over TP. The result must equal the one-rank gradient of the mean over all rows. The
load-balancing loss is per rank over local tokens, so the variant sets its coefficient to 0
(the trainer test covers it with the coefficient on).

Launches are few on purpose (2 cores): one 2-rank launch computes the one-rank reference on
every rank (no collective runs at TP=PP=EP=1 without DDP), then re-initializes Megatron's groups
for each 2-rank layout in turn; one 4-rank launch does the same for the 4-rank layouts.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

import model_cases as mc
from launcher import launch

WORLD2 = {"ep2": dict(ep=2), "tp2_sp": dict(tp=2, sp=True)}
WORLD4 = {"tp2_sp_ep2": dict(tp=2, sp=True, ep=2), "pp2_ep2": dict(pp=2, ep=2)}
TOL = 1e-4
_EXPERT = re.compile(r"(.*\.local_experts\.)(\d+)(\..*)")


def _variant():
    """The tiny Qwen3-MoE model (4 experts, top-2) without the per-rank load-balancing loss."""
    cfg = mc.variant("qwen3_moe")
    return dataclasses.replace(cfg, language=dataclasses.replace(cfg.language, moe_aux_loss_coeff=0.0))


def _rows(batch: dict, lo: int, hi: int, cfg) -> dict:
    """Rows [lo, hi) of a packed micro-batch: its tokens, labels, segments and tiles."""
    ids = batch["input_ids"]
    s = ids.shape[1]
    per_tile = cfg.tokens_per_tile(batch["tiles"].shape[-1]) if batch["tiles"].numel() else 1
    img = cfg.img_context_token_id
    counts = [int((ids[r] == img).sum()) // per_tile for r in range(ids.shape[0])]
    t0, t1 = sum(counts[:lo]), sum(counts[:hi])
    cu = batch["cu_seqlens"]
    cu = cu[(cu >= lo * s) & (cu <= hi * s)] - lo * s
    out = {k: v[lo:hi] for k, v in batch.items() if torch.is_tensor(v) and v.dim() == 2}
    return dict(out, tiles=batch["tiles"][t0:t1], cu_seqlens=cu.to(torch.int32))


def _schedule(model, batches, forward_only):
    """Megatron's forward-backward schedule; the loss of a micro-batch is its per-token mean."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def step(data_iterator, m):
        b = next(data_iterator)
        kwargs = dict(
            tiles=b["tiles"], cu_seqlens=b["cu_seqlens"], labels=None if forward_only else b["labels"]
        )
        out = m(b["input_ids"], **kwargs)

        def loss_func(output):
            loss = output.sum() * 0.0 if forward_only else output.sum() / output.numel()
            return loss, {"out": output.detach()}

        return out, loss_func

    return [
        o["out"]
        for o in get_forward_backward_func()(
            forward_step_func=step,
            data_iterator=iter(batches),
            model=[model],
            num_microbatches=len(batches),
            seq_length=batches[0]["input_ids"].numel(),
            micro_batch_size=1,
            forward_only=forward_only,
        )
    ]


def _finalize_grads(model) -> None:
    """Megatron DDP + finalize_model_grads for these layouts (see the module docstring)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    dp = ps.get_data_parallel_world_size()
    for p in model.parameters():
        if p.grad is None:
            continue
        expert = not getattr(p, "allreduce", True)
        group = ps.get_expert_data_parallel_group() if expert else ps.get_data_parallel_group()
        dist.all_reduce(p.grad, group=group)
        p.grad /= dp
    if ps.get_tensor_model_parallel_world_size() > 1:
        sp, qk = model.parallel.sequence_parallel, model.config.qk_layernorm
        for name, p in model.named_parameters():
            summed = (sp and getattr(p, "sequence_parallel", False)) or (
                qk and ("q_layernorm" in name or "k_layernorm" in name)
            )
            if summed and p.grad is not None:
                dist.all_reduce(p.grad, group=ps.get_tensor_model_parallel_group())


def _expert_view(full: dict, model) -> dict:
    """``full`` with this EP rank's experts under their local indices (local_experts.{l} of EP
    rank r holds global expert r * E/EP + l), ready for ``shard_for_model``'s TP/PP slicing."""
    from megatron.core import parallel_state as ps

    ep, rank = ps.get_expert_model_parallel_world_size(), ps.get_expert_model_parallel_rank()
    local = model.model_config.language.num_experts // ep
    view = dict(full)
    for key in full:
        m = _EXPERT.match(key)
        if m and int(m.group(2)) < local:
            view[key] = full[f"{m.group(1)}{rank * local + int(m.group(2))}{m.group(3)}"]
    return view


def _forward_backward(model, batches):
    """Logits (forward only), then per-token losses and gradients after the grad reduction."""
    model.eval()
    with torch.no_grad():
        logits = _schedule(model, batches, True)
    model.train()
    losses = _schedule(model, batches, False)
    _finalize_grads(model)
    grads = {
        k: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().clone()
        for k, p in model.named_parameters()
    }
    return logits, losses, grads


def _layout(name, par, full, ref, batches, cfg) -> dict:
    """One layout: load the reference weights, run this DP rank's rows, compare with the
    reference; returns the largest errors (and what they were measured over)."""
    from megatron.core import parallel_state as ps

    from megatron_sail.config.parallel import ParallelConfig
    from megatron_sail.convert.hf_internvl import shard_for_model
    from megatron_sail.platform import distributed as D

    parallel = ParallelConfig(**par)
    D.initialize(parallel)
    model = mc.build_ours(
        cfg, parallel, pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage()
    )
    missing, unexpected = model.load_state_dict(
        shard_for_model(_expert_view(full, model), model), strict=False
    )
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
    dp, r = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    n = batches[0]["input_ids"].shape[0] // dp
    mine = [_rows(b, r * n, (r + 1) * n, cfg) for b in batches]
    logits, losses, grads = _forward_backward(model, mine)
    out = {"name": name, "logit_err": 0.0, "loss_err": 0.0, "last_stage": bool(logits)}
    for got, want in zip(logits, ref["logits"]):
        out["logit_err"] = max(out["logit_err"], (got - want[r * n : (r + 1) * n]).abs().max().item())
    for got, want in zip(losses, ref["losses"]):
        out["loss_err"] = max(out["loss_err"], (got - want[r * n : (r + 1) * n]).abs().max().item())
    want = shard_for_model(_expert_view(ref["grads"], model), model)
    out["grad_err"] = {
        k: ((g - want[k]).abs().max().item(), want[k].abs().max().item()) for k, g in grads.items()
    }
    out["expert_grads"] = [
        float(g.abs().max())
        for k, g in grads.items()
        if "local_experts" in k and k.endswith("linear_fc1.weight")
    ]
    out["experts_here"] = sum(1 for k in grads if "local_experts" in k and k.endswith("fc1.weight"))
    out["ep"], out["edp"] = (
        ps.get_expert_model_parallel_world_size(),
        ps.get_expert_data_parallel_world_size(),
    )
    return out


def _layouts(rank, layouts: dict) -> list:
    """Rank body: the one-rank reference (computed locally on every rank), then each layout."""
    from megatron_sail.config.parallel import ParallelConfig
    from megatron_sail.platform import distributed as D

    cfg = _variant()
    D.initialize(ParallelConfig())
    ref_model = mc.build_ours(cfg, ParallelConfig())
    mc.randomize_(ref_model, 11)
    full = {
        k: v.detach().clone() for k, v in ref_model.state_dict().items() if not k.endswith("_extra_state")
    }
    batches = mc.micro_batches(cfg)
    logits, losses, grads = _forward_backward(ref_model, batches)
    ref = {"logits": logits, "losses": losses, "grads": grads}
    del ref_model
    return [_layout(name, par, full, ref, batches, cfg) for name, par in layouts.items()]


@pytest.fixture(scope="module")
def results():
    """Every layout's errors by name (two launches: 2 ranks, then 4)."""
    out: dict = {}
    for world, layouts in ((2, WORLD2), (4, WORLD4)):
        for rank_results in launch(_layouts, world, layouts, timeout=900):
            for res in rank_results:
                out.setdefault(res["name"], []).append(res)
    return out


@pytest.mark.parametrize("case", sorted(WORLD2) + sorted(WORLD4))
def test_moe_layout_matches_single_rank(results, case):
    ranks = results[case]
    par = {**WORLD2, **WORLD4}[case]
    ep = par.get("ep", 1)
    assert all(r["ep"] == ep for r in ranks) and all(r["edp"] == 1 for r in ranks)
    last = [r for r in ranks if r["last_stage"]]
    assert last, "no rank returned logits"
    for r in last:
        assert r["logit_err"] < TOL, (case, r["logit_err"])
        assert r["loss_err"] < TOL, (case, r["loss_err"])
    checked = 0
    for r in ranks:
        for key, (err, scale) in r["grad_err"].items():
            assert err <= TOL * max(1.0, scale), f"{case} grad {key}: err {err} (scale {scale})"
            checked += 1
        # each rank holds E/EP experts per layer on its stage, and every one received tokens
        assert r["experts_here"] and r["experts_here"] % (4 // ep) == 0
        assert min(r["expert_grads"]) > 0, "an expert got no gradient"
    assert checked > 20
