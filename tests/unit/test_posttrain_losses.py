"""Post-training losses against the papers' formulas, written here with Python's math module.

TRL is not installed beside the pinned torch (its DPOTrainer needs accelerate and datasets), so
the reference is TRL's DPOTrainer.dpo_loss as its source and the papers state it, evaluated per
pair in plain floats: sigmoid (DPO), ipo (on token-averaged log-probs), bco_pair, and the
rpo_alpha NLL term; GRPO's group advantages, clipped surrogate and k3 KL by hand.
"""

import math

import pytest
import torch

from megatron_sail.training.losses import grpo
from megatron_sail.training.losses.preference import PreferenceLossConfig, RunningMean, pair_losses

PC = [-12.0, -30.5, -7.25, -50.0]
PR = [-15.0, -28.0, -9.0, -49.0]
RC = [-13.0, -29.0, -7.0, -52.0]
RR = [-14.0, -29.5, -8.0, -48.5]
NC = [6, 15, 3, 20]
NR = [7, 12, 5, 19]


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _run(loss: str, beta: float, delta: float = 0.0):
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return pair_losses(
        t(PC), t(PR), t(RC), t(RR), t(NC), t(NR), PreferenceLossConfig(loss=loss, beta=beta), bco_delta=delta
    )


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_loss_and_rewards_equal_trl_sigmoid(beta):
    out = _run("dpo", beta)
    for i in range(4):
        logits = (PC[i] - PR[i]) - (RC[i] - RR[i])
        assert out.losses[i].item() == pytest.approx(-_logsig(beta * logits), abs=1e-12)
        assert out.chosen_rewards[i].item() == pytest.approx(beta * (PC[i] - RC[i]), abs=1e-12)
        assert out.rejected_rewards[i].item() == pytest.approx(beta * (PR[i] - RR[i]), abs=1e-12)


def test_ipo_loss_uses_token_averaged_logps_as_trl():
    beta = 0.2
    out = _run("ipo", beta)
    for i in range(4):
        logits = (PC[i] / NC[i] - PR[i] / NR[i]) - (RC[i] / NC[i] - RR[i] / NR[i])
        assert out.losses[i].item() == pytest.approx((logits - 1 / (2 * beta)) ** 2, abs=1e-12)
        assert out.chosen_rewards[i].item() == pytest.approx(beta * (PC[i] - RC[i]) / NC[i])


def test_mpo_is_internvl_weighted_dpo_bco_and_chosen_nll():
    beta, delta = 0.1, 0.03
    out = _run("mpo", beta, delta)
    for i in range(4):
        logits = (PC[i] - PR[i]) - (RC[i] - RR[i])
        dpo = -_logsig(beta * logits)
        bco = -_logsig(beta * (PC[i] - RC[i]) - delta) - _logsig(-(beta * (PR[i] - RR[i]) - delta))
        nll = -PC[i] / NC[i]
        assert out.losses[i].item() == pytest.approx(0.8 * dpo + 0.2 * bco + 1.0 * nll, abs=1e-12)
        assert out.parts["bco"][i].item() == pytest.approx(bco, abs=1e-12)


def test_running_mean_is_the_mean_of_batch_means():
    r = RunningMean()
    for v in (0.5, -0.25, 1.0):
        r.update(v)
    assert r.count == 3 and r.mean == pytest.approx((0.5 - 0.25 + 1.0) / 3)


def test_dpo_gradient_pushes_chosen_up_and_rejected_down():
    pc = torch.tensor([-10.0], requires_grad=True)
    pr = torch.tensor([-10.0], requires_grad=True)
    z = torch.zeros(1)
    pair_losses(pc, pr, z - 10, z - 10, z + 3, z + 3, PreferenceLossConfig()).losses.sum().backward()
    assert pc.grad.item() == pytest.approx(-0.05) and pr.grad.item() == pytest.approx(0.05)


def test_bad_preference_settings_are_refused():
    with pytest.raises(ValueError, match="--pref-loss"):
        PreferenceLossConfig(loss="kto")
    with pytest.raises(ValueError, match="--dpo-beta"):
        PreferenceLossConfig(beta=0.0)


# ------------------------------------------------------------------------------------- GRPO
def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    adv = grpo.group_advantages(rewards, 4)
    std = math.sqrt(sum((x - 0.5) ** 2 for x in (1, 0, 0, 1)) / 3)  # Bessel
    want = [(x - 0.5) / (std + 1e-4) for x in (1, 0, 0, 1)] + [0.0] * 4
    assert adv.tolist() == pytest.approx(want, abs=1e-6)
    assert grpo.all_equal_groups(rewards, 4) == 1
    with pytest.raises(ValueError, match="groups of 3"):
        grpo.group_advantages(rewards, 3)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_grpo_loss_on_fixed_inputs_equals_hand_computation(level):
    logp = [-1.0, -0.5, -2.0, -0.1, -3.0]
    old = [-1.2, -0.5, -1.5, -0.4, -3.0]
    ref = [-1.1, -0.7, -2.0, -0.2, -2.5]
    adv = [1.0, 1.0, 1.0, -0.5, -0.5]
    seq = [0, 0, 0, 1, 1]
    mask = [1, 1, 1, 1, 0]
    eps, beta = 0.2, 0.04
    per, clipped = [], []
    for lp, o, r, a in zip(logp, old, ref, adv):
        ratio = math.exp(lp - o)
        surr = min(ratio * a, min(max(ratio, 1 - eps), 1 + eps) * a)
        kl = math.exp(r - lp) - (r - lp) - 1
        per.append(-surr + beta * kl)
        clipped.append(float((ratio > 1 + eps and a > 0) or (ratio < 1 - eps and a < 0)))
    if level == "token":
        want = sum(p * m for p, m in zip(per, mask)) / sum(mask)
    else:
        want = ((per[0] + per[1] + per[2]) / 3 + per[3] / 1) / 2
    T = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    cfg = grpo.GRPOLossConfig(clip_eps=eps, kl_coef=beta, loss_level=level)
    loss, kl, active = grpo.token_losses(T(logp), T(old), T(adv), cfg, T(ref))
    s, n = grpo.reduce(loss, T(mask), torch.tensor(seq), level)
    assert (s / n).item() == pytest.approx(want, abs=1e-12)
    assert active.tolist() == clipped and sum(clipped) >= 1  # the case exercises the clip
    assert bool((kl >= 0).all())


def test_grpo_loss_without_kl_ignores_the_reference():
    T = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    cfg = grpo.GRPOLossConfig(kl_coef=0.0)
    a, _, _ = grpo.token_losses(T([-1.0]), T([-1.0]), T([2.0]), cfg, T([-5.0]))
    assert a.item() == pytest.approx(-2.0)
