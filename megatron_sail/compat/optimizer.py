"""Internals of megatron-core's optimizers that the trainer and the resume path rely on.

Written for megatron-core 0.16.1 (see ``WORKAROUNDS`` in ``__init__.py``):

- ``adam_step_on_load``: loading a fully reshardable checkpoint into torch's Adam (the CPU
  fallback without TE/Apex), 0.16.1 sets Adam's per-param "step" from the checkpoint, then
  copies per-param state whose source lacks "step" and fails with KeyError. The private
  ``_set_main_param_and_optimizer_states`` of that optimizer instance is wrapped to supply
  the already-set step as its own source.
- ``shared_adam_step``: the same load puts ONE "step" tensor into every param's state; torch's
  Adam increments it in place once per param, so after a resume the bias correction ran
  ahead by the number of params each step (losses drifted from step 12 on).
- ``dummy_optimizer_states``: a fresh optimizer holds no Adam state, and Megatron's
  distributed optimizer cannot describe (or receive) state it does not hold; its private
  ``_init_optimizer_states_with_dummy_values`` creates it.
- ``step_phases``: ``MegatronOptimizer.step()`` is prepare_grads -> get_grad_norm -> clip by
  that norm -> step_with_ready_grads; the trainer runs the phases itself so that it can skip
  the update on every rank when the loss or the norm is not finite.
"""

from __future__ import annotations

import torch


def sub_optimizers(optimizer) -> list:
    """The optimizers that hold parameters (a ChainedOptimizer holds several)."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def keep_torch_adam_step(opt) -> None:
    """Make ``opt`` (one Megatron optimizer) supply Adam's already-set "step" to the per-param
    state copy of a load (``adam_step_on_load``); only this instance is changed."""
    original = getattr(opt, "_set_main_param_and_optimizer_states", None)
    if original is None or getattr(opt.config, "use_precision_aware_optimizer_no_fp8_or_ds_fp8", False):
        return

    def set_states(model_param, tensors):
        gi, go = opt.model_param_group_index_map[model_param]
        state = opt.optimizer.state[opt.optimizer.param_groups[gi]["params"][go]]
        if "step" in state and "step" not in tensors:
            tensors = {**tensors, "step": state["step"]}
        original(model_param, tensors)

    opt._set_main_param_and_optimizer_states = set_states


def unshare_adam_steps(optimizer) -> None:
    """Give every parameter its own Adam "step" tensor again after a load (``shared_adam_step``)."""
    for opt in sub_optimizers(optimizer):
        inner = getattr(opt, "optimizer", None)
        seen: set[int] = set()
        for state in getattr(inner, "state", {}).values():
            step = state.get("step")
            if isinstance(step, torch.Tensor):
                if id(step) in seen:
                    state["step"] = step.clone()
                seen.add(id(state["step"]))


def can_init_dummy_states(opt) -> bool:
    """Whether ``opt`` can create its state before a load (the distributed optimizer can)."""
    return hasattr(opt, "_init_optimizer_states_with_dummy_values")


def init_dummy_states(opt) -> None:
    """One zero-gradient step of the inner optimizer (``dummy_optimizer_states``): creates
    Adam's state tensors; the caller zeroes the learning rate and weight decay around it."""
    opt._init_optimizer_states_with_dummy_values()


def prepare_grads(optimizer) -> bool:
    """Phase 1 of step(): copy/unscale the gradients to the main params; True if inf/NaN found."""
    return optimizer.prepare_grads()


def grad_norm(optimizer) -> float:
    """Phase 2: the global gradient norm over every sub-optimizer's params (before clipping)."""
    return float(optimizer.get_grad_norm())


def clip_and_update(optimizer, total_norm: float) -> None:
    """Phases 3 and 4: clip by the already-computed global norm, then apply the update (as
    ``ChainedOptimizer.step`` does between ``get_grad_norm`` and ``step_with_ready_grads``)."""
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    for opt in sub_optimizers(optimizer):
        params = opt.get_parameters()
        if params and opt.config.clip_grad > 0.0:
            clip_grad_by_total_norm_fp32(params, max_norm=opt.config.clip_grad, total_norm=total_norm)
    optimizer.step_with_ready_grads()
