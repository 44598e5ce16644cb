"""A checkpoint saved right after a step holds that step's weights, also with the distributed
optimizer's overlapped param all-gather (what the trainer uses on GPUs, run here on gloo):
after the update each DP rank's model holds fresh values only for its own shard until the next
forward's pre-hooks gather the rest, so the save must force that gather first."""

from __future__ import annotations

import torch

import model_cases as mc
from launcher import launch


def _batches(cfg, rank: int) -> list:
    """Rank ``rank``'s micro-batch (each DP rank its own, so the update is not trivial)."""
    from megatron_sail.data.loading.collate import MicroBatch

    b = mc.micro_batches(cfg)[rank % 2]
    return [
        MicroBatch(
            tokens=b["input_ids"],
            labels=b["labels"],
            loss_mask=torch.ones(b["input_ids"].shape),
            cu_seqlens=b["cu_seqlens"],
            max_seqlen=32,
            tiles=b["tiles"],
            num_images=1,
            num_tiles=int(b["tiles"].shape[0]),
            decode_failures=0,
            failed_sources=[],
        )
    ]


def _params(ddp) -> dict:
    """This rank's model parameters by name (copies)."""
    return {k: p.detach().clone() for k, p in ddp.module.named_parameters()}


def _run(rank, root):
    """DP=2: one step, save, another step, save; returns the params around each save and
    what each checkpoint holds (read back into a fresh model)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.utils import get_model_config

    from megatron_sail.checkpoint import dcp, layout
    from megatron_sail.config.parallel import ParallelConfig
    from megatron_sail.config.train import OptimConfig
    from megatron_sail.platform import distributed as D
    from megatron_sail.training import checkpoint as ckpt
    from megatron_sail.training.model_setup import hook_model_config
    from megatron_sail.training.optimizer import build_optimizer, build_scheduler
    from megatron_sail.training.step import train_step

    D.initialize(ParallelConfig(), seed=5)
    cfg = mc.variant("base")
    model = mc.build_ours(cfg)
    mc.randomize_(model, 5)
    get_model_config(model).calculate_per_token_loss = True
    ddp = DistributedDataParallel(
        config=get_model_config(model),
        module=model,
        ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=True,
            overlap_param_gather=True,
            use_distributed_optimizer=True,
            check_for_nan_in_grad=False,
        ),
    )
    optim = OptimConfig(
        lr=1e-2, min_lr=1e-2, lr_warmup_iters=0, lr_decay_iters=10, use_distributed_optimizer=True
    )
    optimizer = build_optimizer(optim, [ddp])
    scheduler = build_scheduler(optim, optimizer)
    hook_model_config([ddp], optimizer)
    out = []
    for it in (1, 2):
        train_step([ddp], optimizer, scheduler, _batches(cfg, rank), 32)
        before = _params(ddp)
        ckpt.save_checkpoint(root, [ddp], optimizer, ckpt.TrainState(iteration=it), keep_last=0)
        reread = mc.build_ours(cfg)
        dcp.load_model([reread], layout.iter_dir(root, it))
        out.append(
            {
                "before": before,
                "after": _params(ddp),
                "saved": {k: p.detach().clone() for k, p in reread.named_parameters()},
            }
        )
    return out


def test_save_after_step_holds_every_shard_of_that_step(tmp_path):
    ranks = launch(_run, 2, str(tmp_path / "ckpt"), timeout=300)
    for it in (1, 2):
        r0, r1 = ranks[0][it - 1], ranks[1][it - 1]
        # The premise: right after the step the two DP replicas disagree (each holds its own
        # updated shard and the other's old values).
        assert any(not torch.equal(r0["before"][k], r1["before"][k]) for k in r0["before"]), it
        # After the save both replicas hold the step's weights, and so does the checkpoint.
        for k, v in r0["after"].items():
            assert torch.equal(v, r1["after"][k]), (it, k)
            assert torch.equal(r0["saved"][k], v) and torch.equal(r1["saved"][k], v), (it, k)
