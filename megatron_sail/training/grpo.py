"""Stage ``grpo``: RL with verifiable rewards on the live Megatron model, any TP/PP layout.

One step (``--train-iters`` counts these):

1. Rollout. This data-parallel rank takes its share of the step's prompts (--global-batch-size
   completions = prompts x --num-generations) and samples G completions of each with the
   generation engine on the live chunks (inference/rollout.py: KV cache, temperature / top-p;
   collective over TP/PP). The sampling seed is a function of (--seed, step, DP rank) and the
   prompts of (--seed, consumed prompts): a resumed run repeats the same rollouts.
2. Rewards (training/rewards.py), summed with their weights; group-normalized advantages.
3. Rows. Each completion is packed with its prompt as one segment (prompt + images + answer);
   the loss positions are the completion tokens; per token the row carries the engine's
   log-prob at sampling time, the advantage and (with --kl-coef > 0) the reference's log-prob.
4. --ppo-epochs optimizer steps over the whole batch with the clipped GRPO loss
   (training/losses/grpo.py). The policy's log-probs are recomputed from the model's
   vocab-parallel logits divided by the sampling temperature (the engine's distribution), so
   the first epoch's ratio is 1 up to numerics (the test checks <= 1e-4 in fp32).

The reference model (only when --kl-coef > 0) is the starting checkpoint or --ref-load, built
once beside the policy, frozen, run forward-only through the same pipeline schedule.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass
from functools import partial
from typing import Optional

import numpy as np
import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_sail.data.loading.collate import MicroBatch
from megatron_sail.platform.distributed import device
from megatron_sail.training.losses import grpo as L


# ------------------------------------------------------------------ prompts
@dataclass
class PromptRecord:
    """One prompt with its reference answer."""

    prompt: str
    """User text (``<image>`` placeholders optional)."""
    images: list
    """Image paths or bytes."""
    answer: str
    """Reference answer."""
    choices: Optional[dict] = None
    """Option letter -> text for multiple choice."""
    source: str = ""
    """'<file>:<line or index>'."""

    def record(self) -> dict:
        """The dict reward functions see."""
        return {
            "question": self.prompt,
            "answer": self.answer,
            "choices": self.choices,
            "source": self.source,
        }


def read_prompts(paths: list[str], image_root: Optional[str] = None, suffix: str = "") -> list[PromptRecord]:
    """Prompts of JSONL files ({image|images, question|prompt, answer[, choices]}) and
    VLMEvalKit TSVs (prompted as the evaluator prompts them); a bad record is an error naming
    the file and line."""
    import json

    out: list[PromptRecord] = []
    for path in paths:
        if path.endswith(".tsv"):
            out += _tsv_prompts(path)
            continue
        base = image_root or os.path.dirname(os.path.abspath(path))
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{n}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: not JSON ({e})") from None
                q, a = obj.get("question", obj.get("prompt")), obj.get("answer")
                if not isinstance(q, str) or a is None or str(a).strip() == "":
                    raise ValueError(f"{where}: needs a 'question' (or 'prompt') and an 'answer'")
                refs = obj.get("images", obj.get("image")) or []
                refs = refs if isinstance(refs, list) else [refs]
                images = [r if os.path.isabs(r) else os.path.join(base, r) for r in refs]
                out.append(PromptRecord(q, images, str(a), obj.get("choices"), where))
    if suffix:
        out = [dataclasses.replace(p, prompt=p.prompt + suffix) for p in out]
    if not out:
        raise ValueError(f"--data-path {paths}: no prompts")
    return out


def _tsv_prompts(path: str) -> list[PromptRecord]:
    """A VLMEvalKit TSV as prompts: MCQ rows (options A-D) with the MCQ prompt, yes/no and open
    rows with the question (POPE's prompt is the question)."""
    from megatron_sail.eval.prompts import mcq_prompt
    from megatron_sail.eval.score_mcq import choices_of
    from megatron_sail.eval.tsv import read_items

    out = []
    for it in read_items(path):
        choices = choices_of(it)
        text = mcq_prompt(it) if choices else it.get("question", "")
        out.append(
            PromptRecord(
                text, list(it.images), str(it.get("answer", "")), choices or None, f"{path}:{it.index}"
            )
        )
    return out


# ------------------------------------------------------------------ rows
@dataclass
class RolloutBatch:
    """A micro-batch of completions with their per-token training data (all [B, S])."""

    mb: MicroBatch
    """Tokens, labels, loss mask (completion tokens), segments, tiles."""
    old_logp: torch.Tensor
    """Engine log-prob at sampling time of the label token at each loss position."""
    advantages: torch.Tensor
    """Advantage of the completion each loss position belongs to."""
    seq_id: torch.Tensor
    """int64 completion number of each position (-1 outside completions)."""
    ref_logp: Optional[torch.Tensor] = None
    """Reference log-prob at each loss position (with --kl-coef > 0)."""


def pack_rollouts(
    rollouts: list, advantages: list[float], seq_length: int, rows_per_mb: int, pad: int, with_tiles: bool
) -> list[RolloutBatch]:
    """Pack (prompt + completion) sequences in order into rows of ``seq_length``, rows into
    micro-batches of ``rows_per_mb`` (the last one padded with empty rows)."""
    rows: list[list[int]] = []
    current, used = [], 0
    for i, r in enumerate(rollouts):
        n = len(r.prompt_ids) + len(r.token_ids)
        if n > seq_length:
            raise ValueError(
                f"a prompt of {len(r.prompt_ids)} tokens + {len(r.token_ids)} "
                f"completion tokens exceed --seq-length {seq_length}; raise it or "
                "lower --max-new-tokens"
            )
        if used + n > seq_length:
            rows.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        rows.append(current)
    while len(rows) % rows_per_mb:
        rows.append([])
    return [
        _micro_batch(
            [rows[k] for k in range(j, j + rows_per_mb)], rollouts, advantages, seq_length, pad, with_tiles
        )
        for j in range(0, len(rows), rows_per_mb)
    ]


def _micro_batch(
    rows: list[list[int]], rollouts, advantages, seq_length: int, pad: int, with_tiles: bool
) -> RolloutBatch:
    """One RolloutBatch of packed rows (lists of completion indices)."""
    B = len(rows)
    tokens = np.full((B, seq_length), pad, dtype=np.int64)
    labels = np.zeros((B, seq_length), dtype=np.int64)
    mask, old, adv = (np.zeros((B, seq_length), dtype=np.float32) for _ in range(3))
    seq = np.full((B, seq_length), -1, dtype=np.int64)
    tiles = []
    for b, row in enumerate(rows):
        pos = 0
        for i in row:
            r = rollouts[i]
            ids = list(r.prompt_ids) + list(r.token_ids)
            n, p = len(ids), len(r.prompt_ids)
            tokens[b, pos : pos + n] = ids
            labels[b, pos : pos + n - 1] = ids[1:]
            span = slice(pos + p - 1, pos + n - 1)  # positions whose label is a completion token
            mask[b, span] = 1.0
            if r.logps:
                old[b, span] = r.logps
            adv[b, span] = advantages[i]
            seq[b, span] = i
            if with_tiles and r.tiles is not None and r.tiles.numel():
                tiles.append(r.tiles)
            pos += n
    cu = _boundaries(rows, rollouts, seq_length)
    t = torch.cat(tiles) if tiles else torch.zeros(0, 3, 1, 1)
    mb = MicroBatch(
        tokens=torch.from_numpy(tokens),
        labels=torch.from_numpy(labels),
        loss_mask=torch.from_numpy(mask),
        cu_seqlens=torch.tensor(cu, dtype=torch.int32),
        max_seqlen=int(np.diff(cu).max()),
        tiles=t,
        num_images=0,
        num_tiles=int(t.shape[0]),
        decode_failures=0,
        failed_sources=[],
    )
    return RolloutBatch(mb, torch.from_numpy(old), torch.from_numpy(adv), torch.from_numpy(seq))


def _boundaries(rows: list[list[int]], rollouts, seq_length: int) -> list[int]:
    """Flattened segment boundaries: one segment per sequence, the row's padding its own."""
    cu = [0]
    for b, row in enumerate(rows):
        pos = 0
        for i in row:
            pos += len(rollouts[i].prompt_ids) + len(rollouts[i].token_ids)
            cu.append(b * seq_length + pos)
        if pos < seq_length:
            cu.append((b + 1) * seq_length)
    return cu


# ------------------------------------------------------------------ log-probs on the model
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
    from megatron_sail.training.posttrain import optimizer_update

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


# ------------------------------------------------------------------ the stage
def rollout_seed(seed: int, step: int, dp_rank: int) -> int:
    """Sampling seed of one step on one DP rank (resumes repeat it)."""
    return int(np.random.default_rng([seed, step, dp_rank, 7]).integers(1 << 62))


class GRPOStage:
    """Everything a GRPO step needs, built once."""

    def __init__(self, s):
        from megatron_sail.inference.config import GenerationConfig
        from megatron_sail.inference.rollout import RolloutGenerator
        from megatron_sail.training.rewards import RewardSet, RewardSettings

        cfg, p = s.cfg, s.cfg.post
        self.s, self.cfg, self.p = s, cfg, p
        self.prompts = read_prompts(list(cfg.data.data_path), p.image_root, p.prompt_suffix)
        self.G = p.num_generations
        dp = parallel_state.get_data_parallel_world_size()
        gbs = cfg.train.global_batch_size
        if gbs % (self.G * dp):
            raise ValueError(
                f"--global-batch-size {gbs} (completions per step) must be a "
                f"multiple of --num-generations {self.G} x DP size {dp}"
            )
        self.per_rank = gbs // self.G // dp
        self.loss_cfg = L.GRPOLossConfig(p.clip_eps, p.kl_coef, p.loss_level)
        self.rewards = RewardSet(
            p.rewards,
            p.reward_weights,
            RewardSettings(p.length_target or p.max_new_tokens, p.length_penalty, p.judge_url, p.judge_model),
        )
        self.gen_cfg = GenerationConfig(
            max_new_tokens=p.max_new_tokens,
            temperature=p.temperature,
            top_p=p.top_p,
            max_tiles=s.settings.max_tiles,
            batch_size=max(1, self.per_rank * self.G),
        )
        self.gen = RolloutGenerator(s.chunks, cfg.model, s.tokenizer, s.settings, self.gen_cfg)
        self.ref_chunks = self._reference() if p.kl_coef > 0 else None
        s.log(
            f"[grpo] {len(self.prompts)} prompts; {self.per_rank} prompts x {self.G} "
            f"completions per DP rank per step; rewards {p.rewards}"
        )

    def _reference(self):
        """Frozen reference chunks from --ref-load or the starting checkpoint."""
        from megatron_sail.checkpoint import dcp as dist_ckpt
        from megatron_sail.checkpoint import layout
        from megatron_sail.train import build_chunks
        from megatron_sail.training.precision import check_precision

        source = self.p.ref_load or self.cfg.checkpoint.init_from
        if source is None:
            raise ValueError("--kl-coef > 0 needs a reference: --ref-load or --init-from")
        chunks = build_chunks(self.cfg, check_precision(self.cfg))
        for c in chunks:
            c.requires_grad_(False)
            c.eval()
        dist_ckpt.load_model(chunks, layout.resolve_checkpoint(source))
        return chunks

    def step_prompts(self, step: int) -> list[PromptRecord]:
        """This DP rank's prompts of rollout step ``step`` (endless reshuffled stream)."""
        from megatron_sail.training.posttrain import stream_index

        dp_rank = parallel_state.get_data_parallel_rank()
        dp = parallel_state.get_data_parallel_world_size()
        first = step * self.per_rank * dp + dp_rank * self.per_rank
        n = len(self.prompts)
        return [
            self.prompts[stream_index(q, n, self.cfg.train.seed)] for q in range(first, first + self.per_rank)
        ]

    def rollout(self, step: int):
        """Sample G completions of each prompt; returns (records, rollouts) in group order."""
        from megatron_sail.inference.config import GenerationRequest

        gen = self.gen
        gen.cfg = dataclasses.replace(
            self.gen_cfg,
            seed=rollout_seed(self.cfg.train.seed, step, parallel_state.get_data_parallel_rank()),
        )
        records = self.step_prompts(step)
        built = [
            gen.prompts.build(
                GenerationRequest(r.prompt, r.images), gen.cfg.max_new_tokens, k, with_tiles=gen.first
            )
            for k, r in enumerate(records)
        ]
        prompts = [b for b in built for _ in range(self.G)]
        return records, gen.rollouts(prompts)

    def __call__(self, s) -> None:
        """One GRPO step: rollout, rewards, advantages, --ppo-epochs updates, metrics."""
        t0 = time.perf_counter()
        step = s.state.consumed_samples // self.cfg.train.global_batch_size
        records, rolls = self.rollout(step)
        t_roll = time.perf_counter() - t0
        recs = [r.record() for r in records for _ in range(self.G)]
        total, per = self.rewards.score([r.text for r in rolls], recs, [len(r.token_ids) for r in rolls])
        rewards = torch.tensor(total, dtype=torch.float64)
        adv = L.group_advantages(rewards, self.G, self.loss_cfg.adv_eps)
        batches = pack_rollouts(
            rolls,
            adv.tolist(),
            self.cfg.data.seq_length,
            self.cfg.train.micro_batch_size,
            s.tokenizer.special.pad,
            with_tiles=self.gen.first,
        )
        if self.ref_chunks is not None:
            attach_reference(self.ref_chunks, batches, self.cfg.data.seq_length, self.p.temperature)
        t1 = time.perf_counter()
        outs = [
            update(
                s.chunks,
                s.optimizer,
                s.scheduler,
                batches,
                self.cfg.data.seq_length,
                self.loss_cfg,
                self.p.temperature,
            )
            for _ in range(self.p.ppo_epochs)
        ]
        t_update = time.perf_counter() - t1
        stats = self._stats(rewards, adv, per, rolls, outs, t_roll, t_update)
        st = s.state
        st.iteration += 1
        st.consumed_samples += self.cfg.train.global_batch_size
        st.skipped_steps += int(any(o["skipped"] for o in outs))
        st.consumed_tokens += int(stats.pop("_tokens"))  # completion (loss) tokens
        st.data = {
            "grpo": {
                "consumed_prompts": st.consumed_samples // self.G,
                "rollout_seed": rollout_seed(self.cfg.train.seed, step + 1, 0),
            }
        }
        from megatron_sail.training.posttrain import log_step

        log_step(
            s,
            outs[-1]["loss"],
            outs[-1]["grad_norm"],
            t0,
            int(outs[0]["tokens"]),
            self.cfg.train.global_batch_size,
            stats,
            any(o["skipped"] for o in outs),
        )

    def _stats(self, rewards, adv, per, rolls, outs, t_roll, t_update) -> dict:
        """Step metrics, averaged over DP ranks (sums and counts all-reduced)."""
        names = list(per)
        local = [
            float(rewards.sum()),
            float((rewards**2).sum()),
            float(len(rewards)),
            float((adv**2).sum()),
            float(L.all_equal_groups(rewards, self.G)),
            float(len(rewards) // self.G),
            float(sum(len(r.token_ids) for r in rolls)),
        ]
        for n in names:
            v = torch.tensor(per[n], dtype=torch.float64)
            local += [float(v.sum()), float((v**2).sum())]
        t = torch.tensor(local, dtype=torch.float64, device=device())
        torch.distributed.all_reduce(t, group=parallel_state.get_data_parallel_group())
        v = t.cpu().tolist()
        n = max(v[2], 1.0)
        mean = v[0] / n
        out = {
            "grpo/reward_mean": mean,
            "grpo/reward_std": _std(v[0], v[1], n),
            "grpo/advantage_std": math.sqrt(max(v[3] / n, 0.0)),
            "grpo/all_equal_groups": v[4] / max(v[5], 1.0),
            "grpo/response_length": v[6] / n,
            "grpo/kl": outs[0]["kl"],
            "grpo/clip_fraction": outs[-1]["clip_fraction"],
            "grpo/entropy": outs[0]["entropy"],
            "grpo/logp_diff_first_epoch": outs[0]["logp_diff"],
            "time/rollout-s": t_roll,
            "time/update-s": t_update,
            "_tokens": outs[0]["tokens"],
        }
        for k, name in enumerate(names):
            s, s2 = v[7 + 2 * k], v[8 + 2 * k]
            out[f"reward/{name}_mean"] = s / n
            out[f"reward/{name}_std"] = _std(s, s2, n)
        return out


def _std(s: float, s2: float, n: float) -> float:
    """Population std from a sum and a sum of squares."""
    return math.sqrt(max(s2 / n - (s / n) ** 2, 0.0))


def grpo_stepper(s):
    """The per-step function of the grpo loop."""
    return GRPOStage(s)
