"""The MoE load-balancing loss of each step, read from Megatron-Core's aux-loss tracker.

Every MoE router adds its layer's auxiliary loss (divided by its coefficient) to Megatron-Core's
tracker at each training forward, one slot per layer. After the step, Megatron-LM's
``training_log`` reduces the slots over the pipeline, the router's TP(xCP) group and the data
-parallel ranks (``track_moe_metrics``), scales them by 1 / micro-batches, averages over the MoE
layers and logs ``load_balancing_loss``; then it clears the tracker. ``step_moe_losses`` does the
same, every step, on every rank (the reductions are collectives), so metrics.jsonl, TensorBoard
and the console carry the value under Megatron-LM's name.
"""

from __future__ import annotations

LOAD_BALANCING_LOSS = "load_balancing_loss"
"""Megatron-Core's tracker name (and Megatron-LM's log name) of the aux_loss load balancing."""


def step_moe_losses(lm, num_microbatches: int) -> dict[str, float]:
    """Collective: this step's load-balancing loss (mean over MoE layers and micro-batches,
    DP ranks averaged), then the tracker is cleared for the next step. ``lm`` is the
    LanguageConfig; dense models, or a zero coefficient (nothing is tracked), give {}."""
    if not lm.is_moe or lm.moe_aux_loss_coeff == 0:
        return {}
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, track_moe_metrics

    totals: dict = {}
    track_moe_metrics(
        loss_scale=1.0 / num_microbatches,
        iteration=0,
        total_loss_dict=totals,
        force_initialize=True,
        track_names=[LOAD_BALANCING_LOSS],
        num_layers=lm.num_layers,
    )
    clear_aux_losses_tracker()
    return {name: float(value) for name, value in totals.items()}
