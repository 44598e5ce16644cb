"""Stage ``grpo``: RL with verifiable rewards on the live Megatron model, any TP/PP layout.

One step (``--train-iters`` counts these):

1. Rollout. This data-parallel rank takes its share of the step's prompts (--global-batch-size
   completions = prompts x --num-generations) and samples G completions of each with the
   generation engine on the live chunks (inference/rollout.py: KV cache, temperature / top-p;
   collective over TP/PP). The sampling seed is a function of (--seed, step, DP rank) and the
   prompts of (--seed, consumed prompts): a resumed run repeats the same rollouts.
2. Rewards (posttrain/rewards.py), summed with their weights; group-normalized advantages.
3. Rows. Each completion is packed with its prompt as one segment (prompt + images + answer);
   the loss positions are the completion tokens; per token the row carries the engine's
   log-prob at sampling time, the advantage and (with --kl-coef > 0) the reference's log-prob.
4. --ppo-epochs optimizer steps over the whole batch with the clipped GRPO loss
   (training/losses/grpo.py, run by posttrain/grpo_update.py). The policy's log-probs are recomputed from the model's
   vocab-parallel logits divided by the sampling temperature (the engine's distribution), so
   the first epoch's ratio is 1 up to numerics (the test checks <= 1e-4 in fp32).

The reference model (only when --kl-coef > 0) is the starting checkpoint or --ref-load, built
once beside the policy, frozen, run forward-only through the same pipeline schedule.
"""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import torch
from megatron.core import parallel_state

from megatron_sail.platform.distributed import device
from megatron_sail.posttrain.grpo_update import attach_reference, update
from megatron_sail.posttrain.prompts import PromptRecord, read_prompts
from megatron_sail.posttrain.rollout_rows import pack_rollouts
from megatron_sail.training.losses import grpo as L


def rollout_seed(seed: int, step: int, dp_rank: int) -> int:
    """Sampling seed of one step on one DP rank (resumes repeat it)."""
    return int(np.random.default_rng([seed, step, dp_rank, 7]).integers(1 << 62))


class GRPOStage:
    """Everything a GRPO step needs, built once."""

    def __init__(self, s):
        from megatron_sail.inference.config import GenerationConfig
        from megatron_sail.inference.rollout import RolloutGenerator
        from megatron_sail.posttrain.rewards import RewardSet, RewardSettings

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
        from megatron_sail.training.model_setup import build_chunks
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
        from megatron_sail.posttrain.stage import stream_index

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
        from megatron_sail.posttrain.stage import log_step

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
