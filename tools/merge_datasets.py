#!/usr/bin/env python
"""Merge the shards of a sharded preprocess_data.py run into one prefix (same bytes as one run).

python tools/merge_datasets.py --inputs out/part0 out/part1 --output-prefix out/all
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_sail import cli
from megatron_sail.data.preprocess.merge import merge_shards  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inputs", nargs="+", required=True, help="shard prefixes (all shards of one run)")
    p.add_argument(
        "--output-prefix",
        required=True,
        metavar="PREFIX",
        help="prefix of the merged dataset (PREFIX.meta.json, .bin, .idx)",
    )
    a = p.parse_args(argv)
    try:
        stats = merge_shards(a.inputs, a.output_prefix)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"output_prefix": a.output_prefix, **stats}))
    return 0


if __name__ == "__main__":
    cli.run(main)
