"""One optimizer step (and one validation pass) through Megatron-Core's pipeline schedules.

Loss normalization: the model returns per-token losses; ``loss_func`` returns the SUM over loss
tokens and their count, and the model config has ``calculate_per_token_loss=True``, so Megatron
sums gradients over micro-batches and DP ranks and ``finalize_model_grads`` divides them by the
global loss-token count. The reported loss is sum / count over the whole global batch, so
changing the micro-batch size or the DP size leaves a step's loss and update unchanged up to
rounding, even though packed rows carry different numbers of loss tokens.

NaN/Inf: gradients are prepared and their norm computed before the update; if the loss or the
norm is not finite on any rank, the update and the scheduler step are skipped on all ranks.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_sail.compat import optimizer as compat_optimizer
from megatron_sail.platform.distributed import device

# Per-step counters reduced over DP ranks, in this order.
_FIELDS = ("loss_sum", "loss_tokens", "tokens", "samples", "images", "tiles", "decode_failures", "flops")


@dataclass
class StepResult:
    """What one step measured, identical on every rank."""

    loss: float
    """Loss averaged over the step's loss tokens (all micro-batches, all DP ranks)."""
    grad_norm: Optional[float]
    """Gradient norm before clipping (None for validation)."""
    skipped: bool
    """The update was skipped because of NaN/Inf."""
    counters: dict
    """Sums over the global batch: loss_tokens, tokens, samples, images, tiles, ..., flops."""


def _to_device(batch) -> dict:
    """Model inputs of one micro-batch (data/loading/collate.py MicroBatch) on the model's device."""
    b = batch.to(device(), non_blocking=True)
    tiles = b.tiles if b.tiles is not None and b.tiles.numel() else None
    return {
        "input_ids": b.tokens,
        "labels": b.labels,
        "cu_seqlens": b.cu_seqlens,
        "tiles": tiles,
        "loss_mask": b.loss_mask,
    }


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Sum of per-token losses over loss tokens, and the token count (see module docstring).
    Also reports each row's [loss sum, loss tokens] ("row loss", [B, 2]): _counters adds them
    up per --data-path source, so a blend's per-dataset losses cost one small tensor."""
    mask = loss_mask.float()
    per_token = output_tensor.float().reshape(mask.shape) * mask
    loss_sum = per_token.sum()
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), mask.sum()])
    rows = torch.stack([per_token.detach().sum(1), mask.sum(1)], dim=1)
    return loss_sum, num_tokens, {"lm loss": report, "row loss": rows}


def forward_step(data_iterator, model):
    """Megatron forward_step_func: run one micro-batch through this rank's model chunk."""
    inputs = _to_device(next(data_iterator))
    loss_mask = inputs.pop("loss_mask")
    output = model(**inputs)
    return output, partial(loss_func, loss_mask)


def _counters(
    batches: list,
    loss_parts: torch.Tensor,
    row_stats: tuple[float, float],
    losses: list = (),
    num_sources: int = 0,
) -> torch.Tensor:
    """This rank's contribution to the step counters (zeros except on the last PP stage, so
    that summing over the PP group counts each micro-batch once). ``row_stats`` holds the real
    (non-padding) tokens and the model FLOPs of this rank's rows, computed from the rows.
    With ``num_sources`` the loss sums and loss tokens of each source follow (2 per source),
    from the micro-batches' "row loss" reports (in micro-batch order) and their row sources."""
    out = torch.zeros(len(_FIELDS) + 2 * num_sources, dtype=torch.float64)
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return out
    if num_sources:
        per_source = out[len(_FIELDS) :].view(num_sources, 2)
        for b, rep in zip(batches, losses):
            per_source.index_add_(0, b.sources.long(), rep["row loss"].double().cpu())
    out[0:2] = loss_parts.double().cpu()
    out[2], out[7] = float(row_stats[0]), float(row_stats[1])
    for b in batches:
        out[3] += float(b.tokens.shape[0])
        out[4] += float(b.num_images)
        out[5] += float(b.num_tiles)
        out[6] += float(b.decode_failures)
    return out


def _reduce(counters: torch.Tensor) -> dict:
    """Sum the counters over DP ranks, then share the last stage's totals along the pipeline
    (per-source sums, when present, as "source_loss_sum" / "source_loss_tokens" lists)."""
    t = counters.to(device())
    torch.distributed.all_reduce(t, group=parallel_state.get_data_parallel_group())
    torch.distributed.all_reduce(t, group=parallel_state.get_pipeline_model_parallel_group())
    values = t.cpu().tolist()
    out = dict(zip(_FIELDS, values))
    extra = values[len(_FIELDS) :]
    if extra:
        out["source_loss_sum"], out["source_loss_tokens"] = extra[0::2], extra[1::2]
    return out


def _loss_parts(losses: list) -> torch.Tensor:
    """Sum the [loss_sum, count] reports of the micro-batches of this rank."""
    if not losses:
        return torch.zeros(2)
    return torch.stack([d["lm loss"].float().cpu() for d in losses]).sum(0)


def share_first_stage_images(batches: list) -> list:
    """Give later pipeline stages what image decoding decided on the first stage.

    Only the first stage decodes (its ViT is the only consumer of tiles), but the last stage
    computes the loss and the step counters: it needs the loss mask (a sample whose image
    failed to decode gets no loss) and the image / tile / failure counts. One broadcast of the
    stacked masks and counts per step, from the first stage over the pipeline group."""
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return batches
    masks = torch.stack([b.loss_mask for b in batches]).to(device())
    counts = torch.tensor(
        [[b.num_images, b.num_tiles, b.decode_failures] for b in batches],
        dtype=torch.float64,
        device=device(),
    )
    group = parallel_state.get_pipeline_model_parallel_group()
    src = parallel_state.get_pipeline_model_parallel_first_rank()
    torch.distributed.broadcast(masks, src, group=group)
    torch.distributed.broadcast(counts, src, group=group)
    if parallel_state.is_pipeline_first_stage(ignore_virtual=True):
        return batches
    counts = counts.cpu().long().tolist()
    return [
        dataclasses.replace(b, loss_mask=m.cpu(), num_images=c[0], num_tiles=c[1], decode_failures=c[2])
        for b, m, c in zip(batches, masks, counts)
    ]


def _run_schedule(chunks: list, batches: list, seq_length: int, forward_only: bool) -> list:
    """Run the pipeline schedule (1F1B / interleaved / none) over this rank's micro-batches.

    The LM runs packed: a [B, S] micro-batch travels between stages as [B*S, 1, h], so the
    schedule's receive buffers are sized for one sequence of B*S tokens, not [S, B, h]."""
    iters = [iter(batches) for _ in chunks] if len(chunks) > 1 else iter(batches)
    rows = batches[0].tokens.shape[0]
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iters,
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=len(batches),
        seq_length=rows * seq_length,
        micro_batch_size=1,
        forward_only=forward_only,
    )


def _all_finite(*values: float) -> bool:
    """True when every value is finite on every rank."""
    ok = torch.tensor([1.0 if all(math.isfinite(v) for v in values) else 0.0], device=device())
    torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
    return bool(ok.item() == 1.0)


def train_step(
    chunks: list,
    optimizer,
    scheduler,
    batches: list,
    seq_length: int,
    row_stats: tuple[float, float] = (0.0, 0.0),
    num_sources: int = 0,
) -> StepResult:
    """Forward + backward over all micro-batches, then one optimizer step unless NaN/Inf.
    ``num_sources`` > 0 also sums the loss per --data-path source (counters
    source_loss_sum / source_loss_tokens)."""
    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    batches = share_first_stage_images(batches)
    losses = _run_schedule(chunks, batches, seq_length, forward_only=False)
    totals = _reduce(_counters(batches, _loss_parts(losses), row_stats, losses, num_sources))
    loss = totals["loss_sum"] / max(totals["loss_tokens"], 1.0)
    found_inf = compat_optimizer.prepare_grads(optimizer)
    grad_norm = float("inf") if found_inf else compat_optimizer.grad_norm(optimizer)
    if not _all_finite(loss, grad_norm):
        return StepResult(loss, grad_norm, True, totals)
    compat_optimizer.clip_and_update(optimizer, grad_norm)
    scheduler.step(increment=1)
    return StepResult(loss, grad_norm, False, totals)


@torch.no_grad()
def eval_step(chunks: list, batches: list, seq_length: int) -> StepResult:
    """Forward only; returns the loss over the batches' loss tokens (all DP ranks)."""
    batches = share_first_stage_images(batches)
    for chunk in chunks:
        chunk.eval()
    try:
        losses = _run_schedule(chunks, batches, seq_length, forward_only=True)
    finally:
        for chunk in chunks:
            chunk.train()
    totals = _reduce(_counters(batches, _loss_parts(losses), (0.0, 0.0)))
    return StepResult(totals["loss_sum"] / max(totals["loss_tokens"], 1.0), None, False, totals)
