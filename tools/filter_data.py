#!/usr/bin/env python
"""Filter and deduplicate WebDataset shards (recaption output or plain img2dataset shards).

    python tools/filter_data.py --input 'OUT/*.tar' --output-dir CLEAN [--config filters.yaml]

Writes CLEAN/NAME.tar per input shard (kept samples, members unchanged), CLEAN/rejects.jsonl
(key, shard, stage, reason, detail), CLEAN/filter_report.json and CLEAN/filter_report.png.
filters.yaml holds one section per filter (image, caption_length, repetition, refusal,
language, clip, exact_dedup, near_dedup) with that filter's fields; see docs/curation.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_sail.curate.filters.pipeline import REPORT_JSON, load_config, run_filters  # noqa: E402
from megatron_sail import cli


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="filter_data.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--input", action="append", required=True, help="tar shards, a glob or a folder (repeatable)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--config", help="filters.yaml (default: every filter with its defaults, CLIP off)")
    p.add_argument("--max-member-bytes", type=int, default=64 << 20, help="largest tar member read")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    try:
        cfg = load_config(a.config)
        res = run_filters(a.input, a.output_dir, cfg, a.max_member_bytes, progress=not a.quiet)
    except (ValueError, FileNotFoundError) as e:
        print(f"filter_data.py: error: {e}", file=sys.stderr)
        return 2
    with open(os.path.join(a.output_dir, REPORT_JSON), encoding="utf-8") as f:
        report = json.load(f)
    print(f"filter: {report['samples']} samples, kept {report['kept']}, removed {report['removed']} "
          f"{json.dumps(report['removed_by_reason'])} ({report['images_per_s']} images/s)")
    print(f"report: {os.path.join(a.output_dir, REPORT_JSON)}")
    return 0


if __name__ == "__main__":
    cli.run(main)
