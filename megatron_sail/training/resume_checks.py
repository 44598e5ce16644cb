"""What a resume (--load) or a warm start (--init-from) must agree on, checked with clear errors.

* Tokenizer and image geometry: each checkpoint records the training data's tokenizer block
  (meta.json's ``tokenizer``: identity hash, special-token ids, vocab size, tile size, tokens per
  tile). Loading onto data whose block differs is refused naming both values, unless
  ``--allow-tokenizer-mismatch``. Datasets written before the identity existed are compared on
  the fields they have.
* LR schedule: Megatron-LM's semantics. When the schedule the flags describe (lr, min lr,
  warmup, decay iterations, decay style, weight decay) differs from the checkpoint's, the run
  stops naming each difference, unless ``--override-opt_param-scheduler`` (the flags win; a
  changed decay length is reported as the schedule stretching or shrinking from the resumed step)
  or ``--use-checkpoint-opt_param-scheduler`` (the checkpoint's values win).
* Iterations: ``--train-iters`` below the checkpoint's iteration is an error; equal to it means
  there is nothing to train (the trainer says so and leaves the checkpoint untouched).
* A ``--load`` folder without a checkpoint starts from --init-from / random weights with a line
  saying so (Megatron-LM's behaviour), or stops with ``--exit-on-missing-checkpoint``.
"""

from __future__ import annotations

import copy
from typing import Callable, Iterable, Optional

TOKENIZER_KEYS = (
    "identity",
    "vocab_size",
    "img_context_id",
    "img_start_id",
    "img_end_id",
    "im_start_id",
    "im_end_id",
    "pad_id",
    "tile_size",
    "tokens_per_tile",
)
"""The fields of meta.json's tokenizer block that a checkpoint records and compares."""


class ResumeMismatch(ValueError):
    """The checkpoint and this run disagree on something that changes what training means."""


def tokenizer_block(meta: dict) -> dict:
    """The compared fields of one dataset's meta.json tokenizer block (those it has)."""
    t = meta.get("tokenizer", {})
    return {k: t[k] for k in TOKENIZER_KEYS if k in t}


def data_tokenizer_block(datasets: Iterable, allow_mismatch: bool = False) -> dict:
    """The tokenizer block shared by every prefix of the given BlendedDatasets; prefixes that
    differ are an error naming both (they would feed one model two vocabularies)."""
    first_prefix, first = None, None
    for blend in datasets:
        for d in getattr(blend, "datasets", [blend]):
            block = tokenizer_block(d.meta)
            if first is None:
                first_prefix, first = d.prefix, block
                continue
            diffs = _differences(first, block)
            if diffs and not allow_mismatch:
                raise ResumeMismatch(
                    f"datasets {first_prefix} and {d.prefix} were made with different "
                    f"tokenizers or image geometry: {_describe(diffs, first_prefix, d.prefix)}"
                )
    return first or {}


def _differences(a: dict, b: dict) -> list[tuple[str, object, object]]:
    """(field, a's value, b's value) for each field both blocks have and that differs."""
    return [(k, a[k], b[k]) for k in TOKENIZER_KEYS if k in a and k in b and a[k] != b[k]]


def _describe(diffs: list, left: str, right: str) -> str:
    """'field: X (left) vs Y (right); ...'"""
    return "; ".join(f"{k}: {va!r} ({left}) vs {vb!r} ({right})" for k, va, vb in diffs)


def check_tokenizer(
    saved: dict, current: dict, ckpt: str, allow: bool, log: Callable[[str], None] = print
) -> None:
    """Refuse loading ``ckpt`` (trained on data with block ``saved``) onto data with block
    ``current`` when they differ; ``allow`` turns the refusal into a warning."""
    if not saved:
        return  # a checkpoint from before tokenizer blocks were recorded, or a conversion
    diffs = _differences(saved, current)
    if not diffs:
        return
    text = (
        f"{ckpt} was trained on data with another tokenizer or image geometry than "
        f"--data-path: {_describe(diffs, 'checkpoint', 'data')}"
    )
    if not allow:
        raise ResumeMismatch(
            text + ". Use data made with the checkpoint's tokenizer, or pass "
            "--allow-tokenizer-mismatch to load it anyway."
        )
    log(f"[checkpoint] WARNING (--allow-tokenizer-mismatch): {text}")


SCHEDULE_FIELDS = (
    ("max_lr", "--lr"),
    ("min_lr", "--min-lr"),
    ("lr_warmup_steps", "--lr-warmup-iters"),
    ("lr_decay_steps", "--lr-decay-iters (default: --train-iters)"),
    ("lr_decay_style", "--lr-decay-style"),
    ("start_wd", "--weight-decay"),
    ("end_wd", "--weight-decay"),
    ("wd_incr_steps", "--lr-decay-iters (weight-decay schedule)"),
)
"""OptimizerParamScheduler state fields compared on resume, with the flags that set them."""


def restore_scheduler(
    scheduler,
    saved: dict,
    override: bool,
    use_checkpoint: bool,
    ckpt: str,
    log: Callable[[str], None] = print,
) -> None:
    """Load the checkpoint's scheduler state with Megatron-LM's --override-opt_param-scheduler /
    --use-checkpoint-opt_param-scheduler semantics (neither: differences are an error)."""
    if override and use_checkpoint:
        raise ValueError(
            "--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler exclude each other"
        )
    current = scheduler.state_dict()
    diffs = [
        (name, flag, saved[name], current[name])
        for name, flag in SCHEDULE_FIELDS
        if name in saved and name in current and saved[name] != current[name]
    ]
    if diffs and not (override or use_checkpoint):
        listed = "; ".join(
            f"{n} {old!r} in the checkpoint, {new!r} now ({flag})" for n, flag, old, new in diffs
        )
        raise ResumeMismatch(
            f"the LR schedule of this run differs from the one {ckpt} was trained with: {listed}. "
            "Pass --override-opt_param-scheduler to continue with the new values (the schedule "
            "changes from the resumed step on), or --use-checkpoint-opt_param-scheduler to keep "
            "the checkpoint's; or restore the flags."
        )
    before = _lr_at(scheduler, saved, int(saved.get("num_steps", 0)))
    scheduler.override_opt_param_scheduler = not use_checkpoint
    scheduler.use_checkpoint_opt_param_scheduler = use_checkpoint
    scheduler.load_state_dict(saved)
    if not diffs:
        return
    if use_checkpoint:
        log(
            f"[checkpoint] --use-checkpoint-opt_param-scheduler: keeping the LR schedule of "
            f"{ckpt} (" + ", ".join(f"{n} {old!r}" for n, _, old, _ in diffs) + ")"
        )
        return
    after = _lr_at(scheduler, scheduler.state_dict(), scheduler.num_steps)
    changes = ", ".join(f"{n} {old!r} -> {new!r}" for n, _, old, new in diffs)
    stretch = ""
    old_len, new_len = saved.get("lr_decay_steps"), current.get("lr_decay_steps")
    if old_len is not None and new_len != old_len:
        verb = "stretches" if new_len > old_len else "shrinks"
        stretch = f"; the LR schedule {verb}: it now decays over {new_len} iterations instead of {old_len}"
    log(
        f"[checkpoint] --override-opt_param-scheduler: {changes}{stretch}; at the resumed step "
        f"{scheduler.num_steps} the LR goes from {before:.4e} (checkpoint schedule) to "
        f"{after:.4e}"
    )


def _lr_at(scheduler, values: dict, step: int) -> float:
    """The default group's LR that ``scheduler`` would give at ``step`` with ``values``."""
    probe = copy.copy(scheduler)
    for name, _ in SCHEDULE_FIELDS:
        if name in values:
            setattr(probe, name, values[name])
    probe.num_steps = step
    return float(probe.get_lr({}))


def check_train_iters(loaded_iteration: int, train_iters: int, ckpt: str) -> bool:
    """True when the checkpoint already reached --train-iters (nothing to train); an error
    when it went past it (training would silently do nothing, or rewrite the checkpoint)."""
    if loaded_iteration > train_iters:
        raise ResumeMismatch(
            f"--train-iters {train_iters} is below the iteration of the checkpoint being resumed "
            f"({loaded_iteration}, {ckpt}): nothing can be trained. Raise --train-iters above "
            f"{loaded_iteration}, or --load an earlier checkpoint."
        )
    return loaded_iteration == train_iters


def missing_checkpoint(
    path: str, exit_on_missing: bool, init_from: Optional[str], log: Callable[[str], None] = print
) -> None:
    """--load names no checkpoint: say what happens instead, or stop when asked to."""
    what = f"weights from --init-from {init_from}" if init_from else "randomly initialized weights"
    text = f"--load {path}: no checkpoint there (no `latest`, no metadata.json)"
    if exit_on_missing:
        raise FileNotFoundError(f"{text}; stopping (--exit-on-missing-checkpoint)")
    log(
        f"[checkpoint] {text}: starting at iteration 0 from {what} "
        "(pass --exit-on-missing-checkpoint to stop instead)"
    )
