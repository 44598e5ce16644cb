#!/usr/bin/env python
"""Run transformers' InternVL and our Megatron SailVLModel on the same inputs; compare logits.

(For SAIL-VL2 'sailvl' checkpoints, whose AIMv2 tower InternVL cannot hold, the reference is
transformers' Aimv2VisionModel + InternVL's pixel shuffle and projector + the causal LM.)

    torchrun --nproc_per_node N tools/compare_logits.py --hf-dir HF --mcore-dir MC \
        [--tp T] [--pp P] [--image FILE ...] [--prompt TEXT] [--max-tiles K] [--atol A]

The tool users run to trust a conversion. Each image is tiled dynamically at the checkpoint's
tile size (InternVL's grid rule + the PIL image pipeline, thumbnail included); with no --image a
generated picture is used. The prompt follows SAIL-VL's ChatML template with
``<img><IMG_CONTEXT>*n</img>`` per image. Without tokenizer files in HF (or MC/tokenizer) the
text becomes a deterministic id sequence and the image-context id comes from the config.

Rank 0 also runs the transformers model; our logits (gathered over TP, taken from the last
pipeline stage) are sent to it. The last line printed is
``max_abs_logit_diff=<float> max_rel_logit_diff=<float>`` (relative = absolute difference over the
largest |logit| of the reference); exit status 1 when the absolute difference exceeds --atol.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_sail import cli
from megatron_sail.bench.compare_logits import (
    DEFAULT_ATOL,
    build_inputs,
    gather_to_rank0,
    our_logits,
    reference_logits,
)


def parse_args(argv):
    """Command line (see the module docstring)."""
    p = argparse.ArgumentParser(description="Compare transformers' and our logits on one sample.")
    p.add_argument(
        "--hf-dir",
        required=True,
        type=Path,
        metavar="DIR",
        help="the transformers InternVL folder (required)",
    )
    p.add_argument(
        "--mcore-dir",
        required=True,
        type=Path,
        metavar="DIR",
        help="our checkpoint of the same weights (required)",
    )
    p.add_argument(
        "--tensor-model-parallel-size",
        "--tp",
        dest="tp",
        type=int,
        default=1,
        metavar="N",
        help="tensor-parallel size of our model (default: 1; torchrun's process count must be tp x pp)",
    )
    p.add_argument(
        "--pipeline-model-parallel-size",
        "--pp",
        dest="pp",
        type=int,
        default=1,
        metavar="N",
        help="pipeline-parallel size of our model, equal stages (default: 1)",
    )
    p.add_argument("--image", nargs="*", default=[], help="image files (default: a generated one)")
    p.add_argument(
        "--prompt",
        default="Describe this image in detail.",
        help="user turn of the chat prompt (default: %(default)r)",
    )
    p.add_argument("--max-tiles", type=int, default=6, help="most grid tiles per image (SAIL-VL: 12)")
    p.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16"),
        default="auto",
        help="auto: float32 on CPU, bfloat16 on GPU",
    )
    p.add_argument(
        "--atol",
        type=float,
        default=None,
        help=f"max allowed |logit difference| (default {DEFAULT_ATOL[torch.float32]} fp32, "
        f"{DEFAULT_ATOL[torch.bfloat16]} bf16)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Build both models, run them, report the difference; 1 when it exceeds --atol."""
    from megatron_sail.checkpoint import dcp
    from megatron_sail.checkpoint.layout import read_model_config
    from megatron_sail.config.parallel import ParallelConfig
    from megatron_sail.convert.checkpoint import build_model_chunks
    from megatron_sail.platform import distributed

    args = parse_args(argv)
    distributed.initialize(ParallelConfig(tp=args.tp, pp=args.pp))
    device = distributed.device()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
        args.dtype, torch.bfloat16 if distributed.has_cuda() else torch.float32
    )
    atol = DEFAULT_ATOL[dtype] if args.atol is None else args.atol
    model_config = read_model_config(args.mcore_dir)
    layers = model_config.language.num_layers
    if layers % args.pp:  # Megatron would fail with a bare assertion deep in the layer split
        raise SystemExit(
            f"--pp {args.pp} must divide the {layers} LM layers of {args.mcore_dir} "
            "(compare_logits builds equal pipeline stages)"
        )
    inputs = build_inputs(args, model_config, args.hf_dir, args.mcore_dir)
    chunks = build_model_chunks(model_config, ParallelConfig(tp=args.tp, pp=args.pp), dtype)
    dcp.load_model(chunks, args.mcore_dir)
    for c in chunks:
        c.eval()
    ours = our_logits(chunks, inputs, device)
    del chunks
    shape = (inputs.input_ids.numel(), model_config.language.vocab_size)
    ours = gather_to_rank0(ours, shape, device)
    status = 0
    if dist.get_rank() == 0:
        ref = reference_logits(args.hf_dir, inputs, dtype, device)
        diff = (ours - ref).abs().max().item()
        rel = diff / max(ref.abs().max().item(), 1e-12)
        print(
            f"inputs: {inputs.description}; dtype {str(dtype).removeprefix('torch.')}; "
            f"tp={args.tp} pp={args.pp}; atol={atol}"
        )
        verdict = "OK" if diff <= atol else "MISMATCH"  # NaN is a mismatch too
        print(
            f"{verdict}: our logits vs transformers, argmax agreement "
            f"{(ours.argmax(-1) == ref.argmax(-1)).float().mean().item():.4f}"
        )
        print(f"max_abs_logit_diff={diff:.6g} max_rel_logit_diff={rel:.6g}", flush=True)
        status = int(not diff <= atol)
    flag = torch.tensor([status], dtype=torch.int32, device=device)
    dist.broadcast(flag, src=0)
    distributed.shutdown()
    return int(flag.item())


if __name__ == "__main__":
    cli.run(main)
