"""The GRPO policy update through Megatron's pipeline schedules (any TP/PP layout).

The policy's per-token log-probs are recomputed from the model's vocab-parallel logits divided
by the sampling temperature (the engine's distribution), so the first epoch's ratio against
the rollout policy is 1 up to numerics. The clipped loss, the k3 KL and the token- or
sequence-level averaging are training/losses/grpo.py; here they run per micro-batch as a
Megatron loss function, and the step's sums are reduced over DP and PP for the metrics.
"""

from __future__ import annotations

from functools import partial

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_sail.platform.distributed import device
from megatron_sail.posttrain.rollout_rows import RolloutBatch
from megatron_sail.training.losses import grpo as L


def token_logps(model, batch: RolloutBatch, temperature: float):
    """Per-token log-probs [B, S] of the label tokens under softmax(logits / T) and the
    per-token entropy (detached), from the vocab-parallel logits (last pipeline stage)."""
    from megatron_sail.training.step import _to_device

    inputs = _to_device(batch.mb)
    inputs.pop("loss_mask")
    labels = inputs.pop("labels")
    out = model(**inputs, gather_logits=False)
    return out, labels


def _logp_from_logits(logits: torch.Tensor, labels: torch.Tensor, temperature: float):
    """(log-probs [B, S], entropy [B, S] detached) from TP-sharded logits [B, S, V/tp]."""
    t = temperature if temperature > 0 else 1.0
    z = logits.float() / t
    nll = tensor_parallel.vocab_parallel_cross_entropy(
        z.transpose(0, 1).contiguous(), labels.transpose(0, 1).contiguous()
    )
    logp = -nll.transpose(0, 1)
    with torch.no_grad():
        ent = _vocab_parallel_entropy(z)
    return logp, ent


def _vocab_parallel_entropy(z: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(z) over the full vocabulary from a TP shard of z (last dim)."""
    group = parallel_state.get_tensor_model_parallel_group()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    m = z.max(dim=-1, keepdim=True).values
    if tp > 1:
        torch.distributed.all_reduce(m, op=torch.distributed.ReduceOp.MAX, group=group)
    e = torch.exp(z - m)
    parts = torch.stack([e.sum(-1), (e * z).sum(-1)])
    if tp > 1:
        torch.distributed.all_reduce(parts, group=group)
    zsum, ezsum = parts[0], parts[1]
    return torch.log(zsum) + m[..., 0] - ezsum / zsum


REPORT = ("loss_sum", "count", "tokens", "clipped", "kl", "entropy", "ratio_dev")
"""Per-micro-batch report entries (sums; tokens counts loss tokens)."""


def grpo_loss(batch: RolloutBatch, cfg: L.GRPOLossConfig, temperature: float, output, labels):
    """Megatron loss function of one micro-batch: (loss sum, count, report)."""
    logp, ent = _logp_from_logits(output, labels, temperature)
    dev = logp.device
    mask = batch.mb.loss_mask.to(dev)
    old, adv = batch.old_logp.to(dev), batch.advantages.to(dev)
    ref = batch.ref_logp.to(dev) if batch.ref_logp is not None else None
    per, kl, clipped = L.token_losses(logp, old, adv, cfg, ref)
    s, n = L.reduce(per, mask, batch.seq_id.to(dev), cfg.loss_level)
    m = mask.double()
    report = torch.stack(
        [
            s.detach().double(),
            n.double(),
            m.sum(),
            (clipped.double() * m).sum(),
            (kl.double() * m).sum(),
            (ent.double() * m).sum(),
            ((logp.detach().double() - old.double()).abs() * m).sum(),
        ]
    ).cpu()
    return s, n.to(torch.int), {"grpo": report}


def _forward(loss_fn, temperature: float, data_iterator, model):
    """Megatron forward_step_func for RolloutBatches."""
    batch = next(data_iterator)
    out, labels = token_logps(model, batch, temperature)
    return out, partial(loss_fn, batch, labels=labels)


def run_schedule(chunks, batches, seq_length: int, loss_fn, temperature: float, forward_only: bool) -> list:
    """Megatron's pipeline schedule over RolloutBatches (packed, as training/step.py)."""
    iters = [iter(batches) for _ in chunks] if len(chunks) > 1 else iter(batches)
    rows = batches[0].mb.tokens.shape[0]
    return get_forward_backward_func()(
        forward_step_func=partial(_forward, loss_fn, temperature),
        data_iterator=iters,
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=len(batches),
        seq_length=rows * seq_length,
        micro_batch_size=1,
        forward_only=forward_only,
    )


def _train_loss(cfg, temperature):
    """loss_fn(batch, output, labels=...) of the policy update."""

    def fn(batch, output, labels):
        return grpo_loss(batch, cfg, temperature, output, labels)

    return fn


def _ref_loss(temperature):
    """loss_fn of the reference pass: per-token log-probs in the report."""

    def fn(batch, output, labels):
        logp, _ = _logp_from_logits(output, labels, temperature)
        return output.sum() * 0.0, torch.tensor(1, dtype=torch.int), {"ref": logp.detach().cpu()}

    return fn


@torch.no_grad()
def attach_reference(ref_chunks, batches: list[RolloutBatch], seq_length: int, temperature: float) -> None:
    """Fill each batch's ref_logp from a forward-only pass of the reference chunks (last stage)."""
    reports = run_schedule(
        ref_chunks, batches, seq_length, _ref_loss(temperature), temperature, forward_only=True
    )
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        for b, rep in zip(batches, reports):
            b.ref_logp = rep["ref"].float()


def update(
    chunks, optimizer, scheduler, batches, seq_length, cfg: L.GRPOLossConfig, temperature: float
) -> dict:
    """One optimizer step over every micro-batch; the step's sums reduced over DP and PP."""
    from megatron_sail.posttrain.stage import optimizer_update

    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    losses = run_schedule(
        chunks, batches, seq_length, _train_loss(cfg, temperature), temperature, forward_only=False
    )
    local = torch.zeros(len(REPORT), dtype=torch.float64)
    for rep in losses:
        local += rep["grpo"]
    t = local.to(device())
    torch.distributed.all_reduce(t, group=parallel_state.get_data_parallel_group())
    torch.distributed.all_reduce(t, group=parallel_state.get_pipeline_model_parallel_group())
    tot = dict(zip(REPORT, t.cpu().tolist()))
    tokens = max(tot["tokens"], 1.0)
    out = {
        "loss": tot["loss_sum"] / max(tot["count"], 1.0),
        "clip_fraction": tot["clipped"] / tokens,
        "kl": tot["kl"] / tokens,
        "entropy": tot["entropy"] / tokens,
        "logp_diff": tot["ratio_dev"] / tokens,
        "tokens": tot["tokens"],
    }
    out["grad_norm"], out["skipped"] = optimizer_update(optimizer, scheduler, out["loss"])
    return out
