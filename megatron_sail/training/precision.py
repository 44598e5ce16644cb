"""Numeric precision of a run: parameter dtype (--bf16) and Transformer Engine FP8 (--fp8-format).

On GPUs, --bf16 gives bf16 weights with fp32 main params in the optimizer; --fp8-format runs the
LM's linear layers (and the ViT's with --fp8-vit) in FP8 through Transformer Engine, with
delayed or current ("tensorwise") scaling. Megatron-Core's TransformerBlock reads ``fp8`` /
``fp8_recipe`` from its TransformerConfig at every forward and enters TE's FP8 autocast, so the
setting is applied to the built model's configs, the LM and the ViT separately. FP8 GEMMs need
token counts that are multiples of 16: packed LM rows are checked here; the ViT's per-tile
token count (patches + class token: 1,025 for a 448 px tile, and a text-only micro-batch runs
one blank tile) is padded with masked tokens when it runs in FP8 (models/vit.py); its GEMM
widths are checked here. --fp8-vit stays opt-in (the ViT is a small share of the FLOPs).
On CPU, --bf16 is ignored with a warning (fp32) and --fp8-format is rejected.
"""

from __future__ import annotations

import logging

import torch

from megatron_sail.models import layer_specs
from megatron_sail.models.sail_vl import unwrap
from megatron_sail.platform import distributed as platform

log = logging.getLogger(__name__)

FP8_ALIGN = 16
"""Transformer Engine FP8 GEMMs want both dimensions divisible by this."""


def check_precision(cfg) -> torch.dtype:
    """Parameter dtype of the run; refuses FP8 where it cannot run or would fail later."""
    t = cfg.train
    if not platform.has_cuda():
        if t.fp8_format:
            raise SystemExit(
                f"--fp8-format {t.fp8_format}: FP8 needs Transformer Engine on a "
                "GPU; this machine has no CUDA device. Drop the flag to train in "
                "fp32 on CPU."
            )
        if t.bf16:
            log.warning("--bf16 ignored on CPU: training in fp32")
        return torch.float32
    if t.fp8_format:
        _check_fp8(cfg)
    return torch.bfloat16 if t.bf16 else torch.float32


def _check_fp8(cfg) -> None:
    """FP8 needs TE, bf16 weights and 16-aligned packed token counts per rank."""
    t, par = cfg.train, cfg.parallel
    if not layer_specs.te_available():
        raise SystemExit(f"--fp8-format {t.fp8_format}: Transformer Engine is not importable")
    if not t.bf16:
        raise SystemExit(f"--fp8-format {t.fp8_format} needs --bf16 (FP8 runs under bf16 weights)")
    if t.fp8_recipe not in ("delayed", "tensorwise"):
        raise SystemExit(f"--fp8-recipe {t.fp8_recipe!r}: expected delayed or tensorwise")
    tokens = t.micro_batch_size * cfg.data.seq_length
    per_rank = tokens // par.tp if par.sequence_parallel else tokens
    if per_rank % FP8_ALIGN:
        raise SystemExit(
            f"--fp8-format: {per_rank} LM tokens per rank and micro-batch "
            f"(--micro-batch-size x --seq-length{' / TP' if par.sequence_parallel else ''})"
            f" must be a multiple of {FP8_ALIGN}"
        )
    if t.fp8_vit:
        _check_fp8_vit(cfg.model.vision, par.tp)


def _check_fp8_vit(vision, tp: int) -> None:
    """The ViT's GEMM widths per TP rank must be multiples of FP8_ALIGN (its token count is
    padded at run time instead)."""
    widths = {
        "hidden size": vision.hidden_size,
        "MLP size / TP": vision.ffn_hidden_size // tp,
        "QKV width / TP": 3 * vision.hidden_size // tp,
    }
    bad = {k: v for k, v in widths.items() if v % FP8_ALIGN}
    if bad:
        raise SystemExit(
            f"--fp8-vit: the ViT's {', '.join(f'{k} {v}' for k, v in bad.items())} "
            f"must be multiples of {FP8_ALIGN} for FP8 GEMMs; drop --fp8-vit"
        )


def _set_fp8(config, fmt: str, recipe: str) -> None:
    """FP8 fields of one TransformerConfig (Megatron's names and values)."""
    config.fp8 = fmt
    config.fp8_recipe = recipe


def apply_fp8(chunk: torch.nn.Module, fmt: str | None, recipe: str, vit: bool) -> None:
    """Run the LM (and the ViT when ``vit``) of one model chunk in FP8; no-op for fmt None."""
    if not fmt:
        return
    model = unwrap(chunk)
    _set_fp8(model.language_model.config, fmt, recipe)
    if vit and getattr(model, "vision_model", None) is not None:
        _set_fp8(model.vision_model.config, fmt, recipe)
