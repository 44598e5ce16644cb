"""Stage dpo's data and step: pairs read and packed at start-up with the starting checkpoint's
tokenizer and processor settings, the reference log-probs computed once (or read from a
sidecar), then each step takes --global-batch-size rows of pairs of the endless stream.
"""

from __future__ import annotations

import os
import time

import torch

from megatron_sail.checkpoint import layout
from megatron_sail.posttrain.pair_rows import build_rows
from megatron_sail.posttrain.preference import make_batches, pref_step, reference_logps
from megatron_sail.posttrain.ref_sidecar import load_sidecar
from megatron_sail.posttrain.stage import Setup, log_step, stream_index


def dpo_data(s: Setup):
    """Rows of pairs and their reference log-probs (sidecar, --ref-load model or the policy)."""
    from megatron_sail.data.preprocess.preference import PairFile, read_pairs

    cfg = s.cfg
    items = read_pairs(PairFile(list(cfg.data.data_path), cfg.post.image_root))
    data = build_rows(items, s.tokenizer, s.settings, cfg.data.seq_length)
    if not data.rows:
        raise ValueError(
            f"--data-path {cfg.data.data_path}: no usable preference pair "
            f"({len(data.rejects)} rejects, first: {data.rejects[:1]})"
        )
    _write_rejects(cfg.train.run_dir, data.rejects)
    saved = data.shared_prefix_tokens / max(data.tokens, 1)
    s.log(
        f"[dpo] {sum(data.pairs_per_row)} pairs in {len(data.rows)} rows of "
        f"{cfg.data.seq_length} tokens; {len(data.rejects)} rejects; {data.tokens} tokens, of "
        f"which {data.shared_prefix_tokens} ({saved:.1%}) are prompt/image tokens a shared "
        "prefix would not repeat"
    )
    if cfg.post.ref_logps:
        ref = load_sidecar(cfg.post.ref_logps, data.rows)
        s.log(f"[dpo] reference log-probs from {cfg.post.ref_logps}")
    else:
        ref = compute_reference(s, data.rows)
    return data, ref


def compute_reference(s: Setup, rows: list) -> list:
    """Reference log-probs of every row with the --ref-load model, or with the policy as it
    starts (the starting checkpoint); a resumed run recomputes them from --ref-load or
    --init-from, never from the resumed weights."""
    from megatron_sail.checkpoint import dcp as dist_ckpt
    from megatron_sail.training.model_setup import build_chunks
    from megatron_sail.training.precision import check_precision

    cfg = s.cfg
    source = cfg.post.ref_load or (cfg.checkpoint.init_from if s.state.iteration > 0 else None)
    if s.state.iteration > 0 and source is None:
        raise ValueError(
            "resuming --stage dpo needs the reference: give --ref-load, --init-from or --ref-logps"
        )
    t0 = time.perf_counter()
    if source is None:
        out = reference_logps(s.chunks, rows, s.pipeline, cfg.data.seq_length, cfg.train.micro_batch_size)
    else:
        ref_chunks = build_chunks(cfg, check_precision(cfg))
        for c in ref_chunks:
            c.requires_grad_(False)
        dist_ckpt.load_model(ref_chunks, layout.resolve_checkpoint(source))
        out = reference_logps(ref_chunks, rows, s.pipeline, cfg.data.seq_length, cfg.train.micro_batch_size)
        del ref_chunks
    s.log(
        f"[dpo] reference log-probs of {len(rows)} rows from "
        f"{source or 'the starting weights'} in {time.perf_counter() - t0:.1f}s"
    )
    return out


def _write_rejects(run_dir: str, rejects: list) -> None:
    """rejects.jsonl in the run dir (rank 0; temporary name, then rename)."""
    import json

    if torch.distributed.get_rank() != 0 or not rejects:
        return
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "rejects.jsonl")
    with open(path + ".tmp", "w") as f:
        for r in rejects:
            f.write(json.dumps({"source": r.source, "reason": r.reason, "detail": r.detail}) + "\n")
    os.replace(path + ".tmp", path)


def dpo_stepper(s: Setup):
    """The per-step function of the dpo loop."""
    from megatron_sail.training.loop import BatchPlan, dp_plan
    from megatron_sail.training.losses.preference import PreferenceLossConfig, RunningMean

    cfg = s.cfg
    data, ref = dpo_data(s)
    w = cfg.post.mpo_weights
    loss_cfg = PreferenceLossConfig(cfg.post.pref_loss, cfg.post.dpo_beta, w[0], w[1], w[2])
    bco = RunningMean(**(s.state.data.get("bco") or {}))
    plan: BatchPlan = dp_plan(cfg)
    n = len(data.rows)

    def step(s: Setup) -> None:
        t0 = time.perf_counter()
        k = s.state.consumed_samples // cfg.train.global_batch_size
        idx = [
            [stream_index(p, n, cfg.train.seed) for p in plan.microbatch(k, m)]
            for m in range(plan.num_microbatches)
        ]
        batches = make_batches(data.rows, ref, idx, s.pipeline)
        out = pref_step(s.chunks, s.optimizer, s.scheduler, batches, cfg.data.seq_length, loss_cfg, bco)
        s.state.iteration += 1
        s.state.consumed_samples += cfg.train.global_batch_size
        s.state.skipped_steps += int(out["skipped"])
        tokens = int(sum(float(b.mb.loss_mask.numel()) for b in batches))
        s.state.consumed_tokens += tokens
        s.state.data = {"bco": {"count": bco.count, "mean": bco.mean}}
        extra = {
            f"dpo/{k}": out[k]
            for k in (
                "chosen_reward",
                "rejected_reward",
                "margin",
                "accuracy",
                "chosen_logp",
                "rejected_logp",
            )
        }
        extra["dpo/pairs"] = out["pairs"]
        if loss_cfg.loss == "mpo":
            extra.update({f"mpo/{k}": out[k] for k in ("dpo", "bco", "lm")})
            extra["mpo/bco_delta"] = bco.mean
        log_step(
            s, out["loss"], out["grad_norm"], t0, tokens, cfg.train.global_batch_size, extra, out["skipped"]
        )

    return step
