"""The optimizer state of a checkpoint: the layout it is saved in, and fitting a saved layout to
the optimizer of the run that loads it.

Every checkpoint stores the distributed optimizer's state in the fully reshardable format with
one key per parameter, so a save at one TP/PP/DP/EP loads at another. Only the small common part
(each optimizer's ``param_groups``) keeps the number of chained optimizers it was saved with;
``fit_chained_layout`` rebuilds it for the loading run.
"""

from __future__ import annotations

OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}
"""Optimizer state layout in every checkpoint: the fully reshardable distributed format, and
one key per parameter even when the optimizer is chained (Megatron-LM's choice for new
checkpoints). An MoE model at EP > 1 gets a ChainedOptimizer (dense params + experts, each over
its own data-parallel group); without ``chained_optim_avoid_prefix`` its keys would carry
``chained_0.`` / ``chained_1.`` and an EP=2 checkpoint would not load at EP=1."""


def fit_chained_layout(loaded: dict, optimizer) -> dict:
    """The loaded optimizer state in the layout of this run's optimizer, when the checkpoint
    was saved with another number of chained optimizers (an MoE model at EP > 1 has two:
    dense params and experts; at EP=1 one).

    The tensors (``param_state``) already follow this run's layout: they are read per
    parameter key. Only the small common part (each optimizer's ``param_groups``: LR, betas,
    weight decay, ... keyed by Megatron's group identifiers) keeps the saved layout, so it is
    rebuilt here: each of this run's groups takes the saved group with the same identifiers,
    or, across an EP change, the one that differs only in ``is_expert_parallel``."""
    from megatron.core.optimizer.optimizer import param_group_identifier_keys as keys

    subs = list(getattr(optimizer, "chained_optimizers", [optimizer]))
    # The saved layout shows in the common part: one optimizer keeps its param_groups at the
    # top (the distributed one under "optimizer"), a chained one under 0, 1, ... (the tensors
    # sit wherever this run asked for them).
    saved_single = "param_groups" in loaded or "param_groups" in (loaded.get("optimizer") or {})
    chained, saved_chained = len(subs) > 1, not saved_single
    if chained == saved_chained:
        return loaded
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    if not all(isinstance(sub, DistributedOptimizer) for sub in subs):
        raise ValueError(
            "this checkpoint's optimizer state was saved at another expert-parallel "
            "layout (EP=1 vs EP>1); changing EP on resume works with the distributed "
            "optimizer (--use-distributed-optimizer, the default), or resume at the "
            "saved EP, or load weights only (--finetune / --no-load-optim)"
        )
    saved = [loaded] if not saved_chained else [v for k, v in loaded.items() if isinstance(k, int)]
    groups = [g for part in saved for g in part.get("optimizer", {}).get("param_groups", [])]
    sharding = next((p["param_state_sharding_type"] for p in saved if "param_state_sharding_type" in p), None)

    def ident(group, skip=()):
        return tuple(group.get(k, group.get(f"pre_{k}")) for k in keys if k not in skip)

    def groups_for(sub) -> list:
        out = []
        for mine in sub.optimizer.param_groups:
            match = [g for g in groups if ident(g) == ident(mine)] or [
                g for g in groups if ident(g, ("is_expert_parallel",)) == ident(mine, ("is_expert_parallel",))
            ]
            if not match:
                raise ValueError(
                    f"optimizer param group {ident(mine)} (identifiers {keys}) "
                    "has no counterpart in the checkpoint's optimizer state"
                )
            out.append(dict(match[0], is_expert_parallel=mine.get("is_expert_parallel", False)))
        return out

    def part(tensors: dict, sub) -> dict:
        common = {"optimizer": dict(tensors.get("optimizer", {}), param_groups=groups_for(sub))}
        if sharding is not None:
            common["param_state_sharding_type"] = sharding
        return dict(tensors, **common)

    if chained:
        return {i: part(loaded.get(i, {}), sub) for i, sub in enumerate(subs)}
    return part({k: v for k, v in loaded.items() if not isinstance(k, int)}, subs[0])
