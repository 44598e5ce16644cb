"""Preference losses on summed answer log-probabilities: DPO, IPO and MPO.

Inputs per pair: the policy's and the frozen reference's log-probability of the chosen and the
rejected answer (sums over answer tokens), and the answers' token counts. With
``logits = (pi_c - pi_r) - (ref_c - ref_r)``:

* DPO (Rafailov et al. 2023, eq. 7; TRL's ``sigmoid`` loss without label smoothing):
  ``-log sigmoid(beta * logits)``.
* IPO (Azar et al. 2023, eq. 17; TRL's ``ipo``): ``(logits - 1 / (2 beta))^2`` where, as TRL
  does for IPO, every log-probability is first averaged over its answer's tokens.
* MPO (Wang et al. 2024, InternVL2.5-MPO / InternVL3.5): a weighted sum of the DPO loss, the
  BCO pair loss and the language-model loss on the chosen answer, with InternVL's shipped weights
  as defaults (``--loss_type sigmoid,bco_pair --sigmoid_loss_weight 0.8
  --bco_pair_loss_weight 0.2 --rpo_alpha 1`` in its MPO shell scripts). BCO pair (TRL 0.10.1,
  which InternVL pins): with rewards ``r = beta * (pi - ref)`` and a running mean ``delta`` of
  the batches' mean reward, ``-log sigmoid(r_c - delta) - log sigmoid(-(r_r - delta))``. The LM
  term is the chosen answer's mean token NLL (TRL's ``rpo_alpha`` term; TRL averages over all
  chosen tokens of its batch, we over each pair's, identical for one pair per batch).

Rewards reported (TRL's metrics): ``beta * (pi - ref)`` of each answer, detached; the margin is
their difference, the accuracy the fraction of pairs whose chosen reward is higher.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

LOSSES = ("dpo", "ipo", "mpo")


@dataclass
class PreferenceLossConfig:
    """Which preference loss and its coefficients (flags --pref-loss, --dpo-beta, --mpo-*)."""

    loss: str = "dpo"
    """dpo, ipo or mpo."""
    beta: float = 0.1
    """Strength of the implicit KL to the reference (DPO's beta; IPO's tau)."""
    mpo_dpo_weight: float = 0.8
    """MPO: weight of the DPO (sigmoid) term (InternVL's default)."""
    mpo_bco_weight: float = 0.2
    """MPO: weight of the BCO pair term (InternVL's default)."""
    mpo_lm_weight: float = 1.0
    """MPO: weight of the chosen answer's LM loss (InternVL's rpo_alpha)."""

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"--pref-loss {self.loss!r}: expected one of {', '.join(LOSSES)}")
        if self.beta <= 0:
            raise ValueError(f"--dpo-beta {self.beta}: must be > 0")


@dataclass
class RunningMean:
    """BCO's reward baseline: the mean of every batch-mean reward seen so far (TRL's
    RunningMoments fed one scalar per step). Stored in the checkpoint so a resume continues it."""

    count: int = 0
    """Batches seen."""
    mean: float = 0.0
    """Their running mean reward."""

    def update(self, value: float) -> None:
        """Fold one batch-mean reward in."""
        self.count += 1
        self.mean += (float(value) - self.mean) / self.count


@dataclass
class PairLosses:
    """Per-pair results of ``pair_losses``."""

    losses: torch.Tensor
    """[P] the loss of each pair (differentiable)."""
    chosen_rewards: torch.Tensor
    """[P] beta * (policy - reference) log-prob of the chosen answer, detached."""
    rejected_rewards: torch.Tensor
    """[P] the same for the rejected answer."""
    parts: dict = field(default_factory=dict)
    """Name -> [P] detached loss terms (dpo, bco, lm for MPO)."""


def dpo_sigmoid(logits: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO's loss per pair from the log-ratio difference."""
    return -F.logsigmoid(beta * logits)


def ipo_square(logits: torch.Tensor, beta: float) -> torch.Tensor:
    """IPO's squared loss per pair (logits from token-averaged log-probs)."""
    return (logits - 1.0 / (2.0 * beta)) ** 2


def bco_pair(
    chosen_logratio: torch.Tensor, rejected_logratio: torch.Tensor, beta: float, delta: float
) -> torch.Tensor:
    """BCO pair loss: each answer classified against the running reward baseline ``delta``."""
    return -F.logsigmoid(beta * chosen_logratio - delta) - F.logsigmoid(-(beta * rejected_logratio - delta))


def pair_losses(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    cfg: PreferenceLossConfig,
    bco_delta: float = 0.0,
) -> PairLosses:
    """Loss and rewards of each pair from summed answer log-probs ([P] tensors each)."""
    dtype = torch.promote_types(policy_chosen.dtype, torch.float32)  # float64 stays float64
    pc, pr, rc, rr = (t.to(dtype) for t in (policy_chosen, policy_rejected, ref_chosen, ref_rejected))
    nc, nr = chosen_tokens.to(dtype).clamp(min=1), rejected_tokens.to(dtype).clamp(min=1)
    if cfg.loss == "ipo":  # TRL: IPO works on per-token average log-probs (rewards too)
        pc, pr, rc, rr = pc / nc, pr / nr, rc / nc, rr / nr
    chosen_lr, rejected_lr = pc - rc, pr - rr
    logits = chosen_lr - rejected_lr
    parts: dict = {}
    if cfg.loss == "dpo":
        losses = dpo_sigmoid(logits, cfg.beta)
    elif cfg.loss == "ipo":
        losses = ipo_square(logits, cfg.beta)
    else:
        dpo = dpo_sigmoid(logits, cfg.beta)
        bco = bco_pair(chosen_lr, rejected_lr, cfg.beta, bco_delta)
        lm = -pc / nc
        losses = cfg.mpo_dpo_weight * dpo + cfg.mpo_bco_weight * bco + cfg.mpo_lm_weight * lm
        parts = {"dpo": dpo.detach(), "bco": bco.detach(), "lm": lm.detach()}
    return PairLosses(losses, (cfg.beta * chosen_lr).detach(), (cfg.beta * rejected_lr).detach(), parts)
