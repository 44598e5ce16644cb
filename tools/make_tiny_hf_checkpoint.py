#!/usr/bin/env python
"""Write a small random SAIL-VL-shaped checkpoint in transformers' or InternVL-chat's layout.

Used by the conversion tests and the README demo: real SAIL-VL weights are gigabytes, but the
conversion and logit-comparison code paths are the same for a model of a few hundred kilobytes.
Every tensor gets distinct random values (norm weights and layer scales included) so that a
swapped or dropped tensor in a conversion shows up as a mismatch.

    python tools/make_tiny_hf_checkpoint.py --out /tmp/tiny_hf --layout chat
"""

from __future__ import annotations

import argparse

from megatron_sail import cli
from megatron_sail.demo.tiny_checkpoint import TinyCheckpointConfig, make_tiny_checkpoint


def main(argv: list[str] | None = None) -> int:
    """Command line: every TinyCheckpointConfig field is a flag."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="destination folder (must not exist or be empty)")
    p.add_argument(
        "--layout",
        choices=("hf", "chat"),
        default="hf",
        help="transformers' InternVL folder or the InternVL-chat remote-code layout (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0, metavar="N", help="weight seed (default: %(default)s)")
    p.add_argument("--tile-size", type=int, default=56, help="multiple of 28")
    p.add_argument(
        "--vision-layers", type=int, default=2, metavar="N", help="ViT layers (default: %(default)s)"
    )
    p.add_argument(
        "--select-layer",
        type=int,
        default=-1,
        metavar="N",
        help="ViT layer whose output feeds the projector (default: %(default)s)",
    )
    p.add_argument("--text-layers", type=int, default=2, metavar="N", help="LM layers (default: %(default)s)")
    p.add_argument(
        "--text-family",
        choices=("qwen2", "qwen3", "qwen3_moe"),
        default="qwen2",
        help="LM family (default: %(default)s)",
    )
    p.add_argument(
        "--heads", type=int, default=4, metavar="N", help="attention heads of the LM (default: %(default)s)"
    )
    p.add_argument(
        "--kv-heads",
        type=int,
        default=2,
        metavar="N",
        help="key/value heads of the LM (default: %(default)s)",
    )
    p.add_argument(
        "--vocab-size", type=int, default=256, metavar="N", help="LM vocabulary rows (default: %(default)s)"
    )
    p.add_argument("--tied", action="store_true", help="tie the LM head to the embeddings")
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="dtype of the saved weights (default: %(default)s)",
    )
    p.add_argument(
        "--max-shard-bytes",
        type=int,
        default=5 * 1024**3,
        metavar="BYTES",
        help="largest safetensors file; more gives shards + index (default: %(default)s)",
    )
    p.add_argument(
        "--tokenizer",
        action="store_true",
        help="also write a tiny BPE tokenizer.json (needs --vocab-size >= 262)",
    )
    a = p.parse_args(argv)
    if a.tile_size % 28:
        p.error("--tile-size must be a multiple of 28 (patch 14, pixel shuffle 0.5)")
    cfg = TinyCheckpointConfig(
        layout=a.layout,
        seed=a.seed,
        tile_size=a.tile_size,
        vision_layers=a.vision_layers,
        select_layer=a.select_layer,
        text_layers=a.text_layers,
        text_family=a.text_family,
        heads=a.heads,
        kv_heads=a.kv_heads,
        vocab_size=a.vocab_size,
        tied=a.tied,
        dtype=a.dtype,
        max_shard_bytes=a.max_shard_bytes,
        tokenizer=a.tokenizer,
    )
    print(make_tiny_checkpoint(a.out, cfg))
    return 0


if __name__ == "__main__":
    cli.run(main)
