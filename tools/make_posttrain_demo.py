#!/usr/bin/env python
"""Write the post-training demo data: GRPO prompts with reference answers (grpo.jsonl) and DPO
pairs of correct vs hallucinated answers (pairs.jsonl), on demo scenes
(megatron_sail/demo/posttrain.py).

    python tools/make_posttrain_demo.py --out demo_post [--prompts 400] [--pairs 400] [--seed 4321]
"""

from __future__ import annotations

import argparse
import json

from megatron_sail import cli
from megatron_sail.demo.posttrain import PostTrainDemoConfig, make_posttrain_demo


def main(argv: list[str] | None = None) -> int:
    """Parse flags, write the files, print their paths."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--out", required=True, metavar="DIR", help="folder for grpo.jsonl, pairs.jsonl and images (required)"
    )
    d = PostTrainDemoConfig()
    p.add_argument(
        "--prompts", type=int, default=d.prompts, help="GRPO prompts to write (default: %(default)s)"
    )
    p.add_argument("--pairs", type=int, default=d.pairs, help="DPO pairs to write (default: %(default)s)")
    p.add_argument(
        "--seed", type=int, default=d.seed, help="seed of the scenes and questions (default: %(default)s)"
    )
    a = p.parse_args(argv)
    print(json.dumps(make_posttrain_demo(a.out, PostTrainDemoConfig(a.prompts, a.pairs, a.seed))))
    return 0


if __name__ == "__main__":
    cli.run(main)
