"""Stage ``dpo``: preference optimization (DPO / IPO / MPO) through Megatron's pipeline schedules.

Rows come from pair_rows.py: each pair is two packed segments of one row, chosen then rejected.

Loss. The model's per-token cross entropy (vocab-parallel under TP; the full sequence on the
last pipeline stage, also with SP) is minus the token log-probability. ``segment_logps`` sums
it over each segment's answer tokens; segments with answer tokens come in (chosen, rejected)
order. The loss function returns the sum of pair losses and the pair count, and the model config
has ``calculate_per_token_loss``: Megatron divides the gradients by the global pair count, so a
step's update does not depend on micro-batch or DP sizes.

Reference. The frozen reference's answer log-probs are computed once, before training, by a
forward-only pass of the same schedules over every row: with the policy itself (the default:
the reference is the starting checkpoint) or with a model loaded from --ref-load; or read from
a sidecar written by tools/precompute_ref_logps.py (``--ref-logps``). Training then holds one
model.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import partial
from typing import Optional

import numpy as np
import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_sail.data.records import PackedRow
from megatron_sail.platform.distributed import device
from megatron_sail.training.losses.preference import PreferenceLossConfig, RunningMean, pair_losses


def segment_logps(
    per_token_nll: torch.Tensor, loss_mask: torch.Tensor, cu_seqlens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-prob sums [A], token counts [A]) of the answer segments (those with loss tokens), in
    order, from per-token NLL [B, S] and the flattened segment boundaries."""
    flat = -per_token_nll.float().reshape(-1) * loss_mask.reshape(-1).float()
    m = loss_mask.reshape(-1).float()
    cu = cu_seqlens.long().to(flat.device)
    seg = torch.repeat_interleave(torch.arange(len(cu) - 1, device=flat.device), cu[1:] - cu[:-1])
    sums = torch.zeros(len(cu) - 1, dtype=flat.dtype, device=flat.device).index_add(0, seg, flat)
    counts = torch.zeros(len(cu) - 1, dtype=m.dtype, device=m.device).index_add(0, seg, m)
    keep = counts > 0
    return sums[keep], counts[keep]


@dataclass
class PrefBatch:
    """A micro-batch of pair rows with the reference log-probs of its pairs."""

    mb: object
    """data.collate.MicroBatch."""
    ref: Optional[torch.Tensor]
    """float64 [P, 2] reference (chosen, rejected) log-prob sums, None in the reference pass."""


def _pairs(sums: torch.Tensor, counts: torch.Tensor):
    """Split answer-segment values into (chosen, rejected) halves."""
    if sums.numel() % 2:
        raise ValueError(
            f"{sums.numel()} answer segments in a micro-batch: pairs must come as chosen + rejected segments"
        )
    return sums[0::2], sums[1::2], counts[0::2], counts[1::2]


def pref_loss(batch: PrefBatch, cfg: PreferenceLossConfig, bco_delta: float, output_tensor: torch.Tensor):
    """Megatron loss function: (sum of pair losses, pair count, report)."""
    sums, counts = segment_logps(
        output_tensor, batch.mb.loss_mask.to(output_tensor.device), batch.mb.cu_seqlens
    )
    pc, pr, nc, nr = _pairs(sums, counts)
    ref = batch.ref.to(pc.device)
    out = pair_losses(pc, pr, ref[:, 0], ref[:, 1], nc, nr, cfg, bco_delta)
    p = float(len(pc))
    cr, rr = out.chosen_rewards.double(), out.rejected_rewards.double()
    stats = [
        out.losses.detach().double().sum(),
        torch.tensor(p, dtype=torch.float64),
        cr.sum(),
        rr.sum(),
        (cr > rr).double().sum(),
        (pc.detach().double() / nc).sum(),
        (pr.detach().double() / nr).sum(),
    ]
    stats += [
        out.parts[k].double().sum() if k in out.parts else torch.zeros((), dtype=torch.float64)
        for k in ("dpo", "bco", "lm")
    ]
    report = torch.stack([s.cpu() for s in stats])
    return out.losses.sum(), torch.tensor(int(p), dtype=torch.int), {"pref": report}


REPORT = (
    "loss",
    "pairs",
    "chosen_reward",
    "rejected_reward",
    "accuracy",
    "chosen_logp",
    "rejected_logp",
    "dpo",
    "bco",
    "lm",
)
"""Entries of the per-micro-batch report, summed over the step (divide by 'pairs')."""


def ref_report(output_tensor: torch.Tensor, batch: PrefBatch):
    """Loss function of the reference pass: no loss, the answer log-prob sums as the report."""
    sums, counts = segment_logps(
        output_tensor, batch.mb.loss_mask.to(output_tensor.device), batch.mb.cu_seqlens
    )
    pc, pr, _, _ = _pairs(sums, counts)
    zero = output_tensor.sum() * 0.0
    return zero, torch.tensor(1, dtype=torch.int), {"ref": torch.stack([pc, pr], 1).double().cpu()}


def _forward_step(loss_fn, data_iterator, model):
    """Megatron forward_step_func over PrefBatch micro-batches."""
    from megatron_sail.training.step import _to_device

    batch = next(data_iterator)
    inputs = _to_device(batch.mb)
    inputs.pop("loss_mask")
    return model(**inputs), partial(loss_fn, batch)


def run_schedule(chunks: list, batches: list, seq_length: int, loss_fn, forward_only: bool) -> list:
    """Megatron's schedule (1F1B / interleaved / none) over PrefBatch micro-batches; the LM
    runs packed, [B*S, 1, h] between stages (as training/step.py)."""
    iters = [iter(batches) for _ in chunks] if len(chunks) > 1 else iter(batches)
    rows = batches[0].mb.tokens.shape[0]
    return get_forward_backward_func()(
        forward_step_func=partial(_forward_step, loss_fn),
        data_iterator=iters,
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=len(batches),
        seq_length=rows * seq_length,
        micro_batch_size=1,
        forward_only=forward_only,
    )


# ------------------------------------------------------------------ reference log-probs
@torch.no_grad()
def reference_logps(
    chunks: list, rows: list[PackedRow], pipeline, seq_length: int, micro_batch_size: int
) -> list[np.ndarray]:
    """Collective over every rank: [pairs, 2] reference log-prob sums of each row, on every
    rank. Data-parallel ranks split the rows, pipeline stages run the schedule, and the last
    stage's results are shared over the pipeline and data-parallel groups."""
    from megatron_sail.data.loading.collate import collate_rows
    from megatron_sail.training.loop import SkipDecode

    dp, dp_rank = (parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank())
    first = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
    mine = list(range(dp_rank, len(rows), dp))
    n_mb = math.ceil(len(rows) / dp / micro_batch_size)  # the same count on every DP rank
    real = [mine[k * micro_batch_size : (k + 1) * micro_batch_size] for k in range(n_mb)]
    # every micro-batch has micro_batch_size rows (pipeline sends have one shape): pad with row 0
    idx = [ix + [0] * (micro_batch_size - len(ix)) for ix in real]
    batches = [
        PrefBatch(collate_rows([rows[i] for i in ix], pipeline if first else SkipDecode()), None)
        for ix in idx
    ]
    for c in chunks:
        c.eval()
    try:
        reports = (
            run_schedule(chunks, batches, seq_length, lambda b, o: ref_report(o, b), forward_only=True)
            if batches
            else []
        )
    finally:
        for c in chunks:
            c.train()
    local = {}
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        for ix, rep in zip(real, reports):
            values, start = rep["ref"].numpy(), 0
            for i in ix:  # padding rows come last: their values are ignored
                n = _pairs_in(rows[i])
                local[i] = values[start : start + n]
                start += n
    return _share(local, len(rows))


def _pairs_in(row: PackedRow) -> int:
    """Pairs of a row: its answer segments / 2."""
    return row.num_samples // 2


def _share(local: dict, n_rows: int) -> list[np.ndarray]:
    """Every rank gets every row's values: gathered over DP, broadcast from the last PP stage."""
    group = parallel_state.get_data_parallel_group()
    parts = [None] * parallel_state.get_data_parallel_world_size()
    torch.distributed.all_gather_object(parts, local, group=group)
    merged = {}
    for p in parts:
        merged.update(p)
    obj = [merged]
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.broadcast_object_list(
            obj,
            src=parallel_state.get_pipeline_model_parallel_last_rank(),
            group=parallel_state.get_pipeline_model_parallel_group(),
        )
    merged = obj[0]
    missing = [i for i in range(n_rows) if i not in merged]
    if missing:
        raise RuntimeError(f"reference log-probs missing for rows {missing[:5]}")
    return [np.asarray(merged[i], dtype=np.float64) for i in range(n_rows)]


def pref_step(
    chunks: list,
    optimizer,
    scheduler,
    batches: list[PrefBatch],
    seq_length: int,
    cfg: PreferenceLossConfig,
    bco: RunningMean,
) -> dict:
    """Forward + backward of every micro-batch, then one optimizer step unless NaN/Inf.
    Returns the step's means over pairs (loss, rewards, accuracy, margins) and grad norm."""
    from megatron_sail.posttrain.stage import optimizer_update

    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    losses = run_schedule(
        chunks, batches, seq_length, lambda b, o: pref_loss(b, cfg, bco.mean, o), forward_only=False
    )
    local = torch.zeros(len(REPORT), dtype=torch.float64)
    for rep in losses:
        local += rep["pref"]
    t = local.to(device())
    torch.distributed.all_reduce(t, group=parallel_state.get_data_parallel_group())
    torch.distributed.all_reduce(t, group=parallel_state.get_pipeline_model_parallel_group())
    totals = dict(zip(REPORT, t.cpu().tolist()))
    pairs = max(totals["pairs"], 1.0)
    means = {k: totals[k] / pairs for k in REPORT if k != "pairs"}
    means["pairs"] = totals["pairs"]
    means["margin"] = means["chosen_reward"] - means["rejected_reward"]
    means["grad_norm"], means["skipped"] = optimizer_update(optimizer, scheduler, means["loss"])
    if means["skipped"]:
        return means
    if cfg.loss == "mpo":  # the BCO baseline follows the batch-mean reward (TRL's RunningMoments)
        bco.update((means["chosen_reward"] + means["rejected_reward"]) / 2.0)
    return means


def make_batches(
    rows: list[PackedRow], ref: list[np.ndarray], indices: list[list[int]], pipeline
) -> list[PrefBatch]:
    """PrefBatches of the given row indices (one list per micro-batch)."""
    from megatron_sail.data.loading.collate import collate_rows
    from megatron_sail.training.loop import SkipDecode

    first = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
    out = []
    for ix in indices:
        mb = collate_rows([rows[i] for i in ix], pipeline if first else SkipDecode())
        out.append(PrefBatch(mb, torch.from_numpy(np.concatenate([ref[i] for i in ix]))))
    return out


def with_ref(batch: PrefBatch, ref: torch.Tensor) -> PrefBatch:
    """A copy with other reference values."""
    return dataclasses.replace(batch, ref=ref)
