"""GRPO (Shao et al. 2024, DeepSeekMath, section 4.1): group-normalized advantages and the
clipped policy-gradient loss, on per-token log-probabilities of sampled completions.

* Advantage of completion i of a group of G answers to one prompt:
  ``(r_i - mean(r)) / (std(r) + eps)`` (std with Bessel's correction and eps = 1e-4, as TRL's
  GRPOTrainer); every token of the completion gets it. A group whose rewards are all equal
  gets zero advantage (it carries no signal; the trainer logs how many such groups there are).
* Per token: ``ratio = exp(logp - logp_rollout)``;
  ``pg = -min(ratio * A, clip(ratio, 1 - eps_clip, 1 + eps_clip) * A)`` (PPO's surrogate);
  with a reference model, ``kl = exp(ref - logp) - (ref - logp) - 1`` (Schulman's k3 estimator
  of KL(pi || ref), never negative) added with weight ``kl_coef``.
* Averaging (``--grpo-loss-level``): ``token`` = sum over every completion token of the global
  batch / their count (DAPO's token-level mean); ``sequence`` = each completion's token mean,
  then the mean over completions (the DeepSeekMath formula). Either is returned as a (sum,
  count) pair so that Megatron's per-token loss scaling divides by the global count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LEVELS = ("token", "sequence")


@dataclass
class GRPOLossConfig:
    """Coefficients of the GRPO loss (flags --clip-eps, --kl-coef, --grpo-loss-level)."""

    clip_eps: float = 0.2
    """PPO clip range of the ratio (1 - eps, 1 + eps)."""
    kl_coef: float = 0.0
    """Weight of the k3 KL to the reference model; 0 needs no reference model."""
    loss_level: str = "token"
    """token or sequence averaging (module docstring)."""
    adv_eps: float = 1e-4
    """Added to the group's reward std before dividing."""

    def __post_init__(self) -> None:
        if self.loss_level not in LEVELS:
            raise ValueError(f"--grpo-loss-level {self.loss_level!r}: expected token or sequence")
        if self.clip_eps <= 0 or self.kl_coef < 0:
            raise ValueError(f"--clip-eps {self.clip_eps} must be > 0 and --kl-coef {self.kl_coef} >= 0")


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """[N] advantages of [N] rewards ordered as consecutive groups of ``group_size``."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.double().view(-1, group_size)
    std = r.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(r[:, :1])
    return ((r - r.mean(dim=1, keepdim=True)) / (std + eps)).view(-1).to(rewards.dtype)


def all_equal_groups(rewards: torch.Tensor, group_size: int) -> int:
    """Groups whose rewards are all the same (no learning signal)."""
    r = rewards.view(-1, group_size)
    return int((r == r[:, :1]).all(dim=1).sum())


def token_losses(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    cfg: GRPOLossConfig,
    ref_logp: torch.Tensor | None = None,
):
    """Per-token loss and its diagnostics (all [T]; ``advantages`` already per token).

    Returns (loss, kl, clipped) where ``clipped`` is 1.0 where the clipped branch of the
    surrogate is the active minimum (the token gets no gradient from the ratio)."""
    ratio = torch.exp(logp - old_logp)
    low, high = 1.0 - cfg.clip_eps, 1.0 + cfg.clip_eps
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, low, high) * advantages
    loss = -torch.minimum(unclipped, clipped)
    active = ((ratio < low) & (advantages < 0)) | ((ratio > high) & (advantages > 0))
    kl = torch.zeros_like(logp)
    if ref_logp is not None and cfg.kl_coef > 0:
        diff = ref_logp - logp
        kl = torch.exp(diff) - diff - 1.0
        loss = loss + cfg.kl_coef * kl
    return loss, kl.detach(), active.float()


def reduce(
    per_token: torch.Tensor, mask: torch.Tensor, seq_index: torch.Tensor, level: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum, count) of a per-token quantity: tokens and their count, or per-sequence means and
    the number of sequences. ``seq_index`` [T] numbers each token's completion (any ids)."""
    mask = mask.to(per_token.dtype)
    if level == "token":
        return (per_token * mask).sum(), mask.sum()
    ids, inverse = torch.unique(seq_index, return_inverse=True)
    lengths = torch.zeros(len(ids), dtype=mask.dtype, device=mask.device).index_add_(0, inverse, mask)
    weight = mask / lengths[inverse].clamp(min=1.0)
    return (per_token * weight).sum(), (lengths > 0).float().sum()
