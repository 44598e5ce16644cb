#!/usr/bin/env python
"""Convert SAIL-VL / InternVL checkpoints between Hugging Face folders and Megatron-Core.

    python tools/convert_checkpoint.py hf-to-mcore --hf-dir HF --out MC
    python tools/convert_checkpoint.py mcore-to-hf --mcore-dir MC --out HF2 [--layout hf|chat]
    python tools/convert_checkpoint.py compose --vision-hf V --language-hf L --out MC [--recipe NAME]

hf-to-mcore reads transformers' InternVL layout (model_type "internvl"), the InternVL-chat
layout SAIL-VL publishes (model_type "internvl_chat") or SAIL-VL2's (model_type "sailvl", an
AIMv2 tower), safetensors sharded or not, and writes a
Megatron-Core distributed checkpoint that loads at any TP/PP (plus model_config.yaml and the
tokenizer, processor settings and, for the remote-code layouts, the remote code). mcore-to-hf writes
transformers' layout with tokenizer, chat template, processor and generation configs
(AutoProcessor + AutoModelForImageTextToText use it as is), or with --layout chat the
hub's remote-code layout with its remote code (AutoModel.from_pretrained(trust_remote_code=True)):
InternVL-chat for InternViT models, "sailvl" for AIMv2 models (which transformers' InternVL
cannot hold, so they need --layout chat).
compose starts a model from a separately released vision encoder (InternViT remote code,
transformers InternVLVisionModel / Aimv2VisionModel / Aimv2Model, Apple's AIMv2) and causal LM
(Qwen2/2.5, Qwen3, Qwen3-MoE) with a freshly initialized projector, and writes the same
checkpoint folder as hf-to-mcore (docs/conversion.md, "Start from a separate encoder and LLM").
Runs in one process on CPU or one GPU; no torchrun needed.
"""

from __future__ import annotations

import argparse
import time

from megatron_sail import cli
from megatron_sail.convert.checkpoint import ConvertConfig, hf_to_mcore, mcore_to_hf
from megatron_sail.convert.compose import ComposeConfig, compose


def main(argv: list[str] | None = None) -> int:
    """Parse the sub-command and run the conversion."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("hf-to-mcore", help="Hugging Face folder -> Megatron dist checkpoint")
    a.add_argument(
        "--hf-dir", required=True, metavar="DIR", help="Hugging Face model folder to read (required)"
    )
    a.add_argument(
        "--out", required=True, metavar="DIR", help="Megatron checkpoint folder to write (required)"
    )
    b = sub.add_parser("mcore-to-hf", help="Megatron dist checkpoint -> transformers InternVL folder")
    b.add_argument(
        "--mcore-dir",
        required=True,
        metavar="DIR",
        help="Megatron checkpoint to read: an iter_N folder or a --save folder (its latest) (required)",
    )
    b.add_argument("--out", required=True, metavar="DIR", help="Hugging Face folder to write (required)")
    b.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors file")
    b.add_argument(
        "--layout",
        choices=("hf", "chat"),
        default="hf",
        help="hf: transformers InternVL (default; InternViT models); chat: the hub's "
        "remote-code layout (InternVL-chat, or sailvl for AIMv2) + remote code, "
        "which only a checkpoint started from a hub folder carries (source_files/); "
        "a model trained from scratch: hf",
    )
    b.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer to write instead of the checkpoint's tokenizer/ (needed when it has none)",
    )
    c = sub.add_parser(
        "compose",
        help="separate vision encoder + causal LM folders -> Megatron dist checkpoint with a fresh projector",
    )
    c.add_argument("--vision-hf", required=True, help="vision encoder folder (config.json + safetensors)")
    c.add_argument("--language-hf", required=True, help="causal LM folder (Qwen2/Qwen3/Qwen3-MoE)")
    c.add_argument(
        "--out", required=True, metavar="DIR", help="Megatron checkpoint folder to write (required)"
    )
    c.add_argument(
        "--recipe",
        default=None,
        help="model recipe whose select_layer / downsample ratio / image size / drop "
        "path are used and whose shapes the folders must have",
    )
    c.add_argument("--select-layer", type=int, default=None, help="default: the recipe's, else -1")
    c.add_argument("--downsample-ratio", type=float, default=None, help="default: the recipe's, else 0.5")
    c.add_argument(
        "--odd-grid",
        choices=("error", "pad"),
        default=None,
        help="a patch grid the merge does not divide (27x27 SigLIP-so400m-patch14-384): "
        "refuse, or zero-pad it bottom/right (default: the recipe's, else error)",
    )
    c.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="expected tile size, checked against the encoder's config",
    )
    c.add_argument("--drop-path-rate", type=float, default=None, help="default: the recipe's, else 0")
    c.add_argument("--seed", type=int, default=1234, help="seed of the projector's initialization")
    c.add_argument("--tokenizer", default=None, help="tokenizer instead of the LM folder's")
    c.add_argument(
        "--vocab-multiple",
        type=int,
        default=128,
        help="grown embedding rows are a multiple of this (only when the tokenizer needs more)",
    )
    c.add_argument(
        "--projector-from",
        default=None,
        help="checkpoint folder or .safetensors with mlp1.* / multi_modal_projector.* to "
        "use instead of a fresh projector",
    )
    for s in (a, b, c):
        s.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = p.parse_args(argv)
    start = time.time()
    if args.cmd == "compose":
        out = compose(
            args.vision_hf,
            args.language_hf,
            args.out,
            ComposeConfig(
                recipe=args.recipe,
                select_layer=args.select_layer,
                downsample_ratio=args.downsample_ratio,
                odd_grid=args.odd_grid,
                image_size=args.image_size,
                drop_path_rate=args.drop_path_rate,
                seed=args.seed,
                tokenizer=args.tokenizer,
                vocab_multiple=args.vocab_multiple,
                projector_from=args.projector_from,
                overwrite=args.overwrite,
            ),
        )
    elif args.cmd == "hf-to-mcore":
        out = hf_to_mcore(args.hf_dir, args.out, ConvertConfig(overwrite=args.overwrite))
    else:
        cfg = ConvertConfig(
            overwrite=args.overwrite,
            max_shard_bytes=int(args.max_shard_gb * 1024**3),
            layout=args.layout,
            tokenizer=args.tokenizer,
        )
        out = mcore_to_hf(args.mcore_dir, args.out, cfg)
    print(f"wrote {out} in {time.time() - start:.1f}s")
    return 0


if __name__ == "__main__":
    cli.run(main)
