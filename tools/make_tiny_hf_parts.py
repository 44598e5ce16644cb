#!/usr/bin/env python
"""Write a tiny, random, separately released part: a vision encoder or a causal-LM folder.

The inputs of ``convert_checkpoint.py compose`` in the formats the real releases use, with a
few-kilobyte model so that tests and the docs' demo run in seconds:

    python tools/make_tiny_hf_parts.py --part internvit --out /tmp/tiny_vit     # InternViT remote code
    python tools/make_tiny_hf_parts.py --part aimv2 --out /tmp/tiny_aimv2       # transformers Aimv2VisionModel
    python tools/make_tiny_hf_parts.py --part siglip --out /tmp/tiny_siglip     # transformers SiglipVisionModel
    python tools/make_tiny_hf_parts.py --part qwen2 --out /tmp/tiny_lm          # Qwen2ForCausalLM + tokenizer

The InternViT folder holds OpenGVLab's InternVisionModel names (``embeddings.class_embedding``,
``encoder.layers.{i}.attn.qkv``, ``ls1``, ...) and config (``model_type`` intern_vit_6b); the
others are written by transformers' ``save_pretrained``. The LM folder gets a byte-level BPE
tokenizer with Qwen's ChatML tokens (``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``) but
without the image tokens, as Qwen's own tokenizers. Default shapes are the ``tiny`` recipe's
(config/model.py), so ``compose --recipe tiny`` accepts them. Every tensor is distinct and random.
"""

from __future__ import annotations

import argparse

from megatron_sail import cli
from megatron_sail.demo.tiny_parts import PARTS, TinyPartConfig, make_part


def main(argv: list[str] | None = None) -> int:
    """Command line: --part, --out and a few shape flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--part",
        choices=PARTS,
        required=True,
        help="which separately released part to write (a vision encoder or a causal LM)",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="destination folder")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="weight seed (default: %(default)s)")
    p.add_argument("--vocab-size", type=int, default=512, help="LM embedding rows")
    p.add_argument("--tokenizer-size", type=int, default=300, help="ids of the LM's tokenizer")
    p.add_argument("--untied", action="store_true", help="separate LM head")
    a = p.parse_args(argv)
    print(
        make_part(
            a.out,
            TinyPartConfig(
                part=a.part,
                seed=a.seed,
                vocab_size=a.vocab_size,
                tokenizer_size=a.tokenizer_size,
                tied=not a.untied,
            ),
        )
    )
    return 0


if __name__ == "__main__":
    cli.run(main)
