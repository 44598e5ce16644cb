#!/usr/bin/env python
"""Filter and deduplicate WebDataset shards (recaption output or plain img2dataset shards).

    python tools/filter_data.py --input 'OUT/*.tar' --output-dir CLEAN [--config filters.yaml]
    # a SLURM array (dedup passes first: tools/dedup.py signatures, then group)
    python tools/filter_data.py ... --keep-lists DEDUP/keep --shard-index $SLURM_ARRAY_TASK_ID --num-shards N
    # Ray
    python tools/filter_data.py ... --executor ray --workers 32 [--gpus-per-worker 1 for the judge]

Writes CLEAN/NAME.tar per input shard (kept samples, members unchanged except the judge's scores
added to the json member), CLEAN/NAME.rejects.jsonl (key, shard, stage, reason, detail),
CLEAN/reports/NAME.json, and the run report CLEAN/filter_report.{json,png,html}. A rerun skips
finished shards. filters.yaml lists the filters in order with their thresholds (image,
caption_length, repetition, refusal, language, exact_dedup, near_dedup, semantic_dedup, clip,
judge); see docs/curation.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_sail import cli  # noqa: E402
from megatron_sail.curate.filters.job import FilterJobConfig, run_all  # noqa: E402
from megatron_sail.curate.filters.pipeline import load_config  # noqa: E402
from megatron_sail.curate.filters.report import REPORT_JSON  # noqa: E402
from megatron_sail.curate.job import add_job_flags, job_fields  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="filter_data.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument(
        "--input",
        action="append",
        required=True,
        metavar="PATH",
        help="tar shards, a glob or a folder (repeatable)",
    )
    p.add_argument(
        "--output-dir", required=True, metavar="DIR", help="where the kept shards, rejects and report go"
    )
    p.add_argument(
        "--config",
        metavar="YAML",
        help="filters.yaml (default: every filter with its defaults, CLIP and judge off)",
    )
    p.add_argument(
        "--keep-lists",
        metavar="DIR",
        help="keep-lists of tools/dedup.py group (default with dedup on: run the "
        "dedup passes here first, into OUTPUT/dedup/)",
    )
    p.add_argument(
        "--max-member-bytes",
        type=int,
        default=64 << 20,
        metavar="BYTES",
        help="largest tar member read (default: 64 MiB)",
    )
    p.add_argument(
        "--max-sample-bytes",
        type=int,
        metavar="BYTES",
        help="largest sum of a sample's members (default: 2x --max-member-bytes)",
    )
    add_job_flags(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar (default: shown)")
    a = p.parse_args(argv)
    try:
        cfg = FilterJobConfig(
            inputs=a.input,
            output_dir=a.output_dir,
            filters=load_config(a.config),
            keep_lists=a.keep_lists,
            max_member_bytes=a.max_member_bytes,
            max_sample_bytes=a.max_sample_bytes,
            progress=not a.quiet,
            **job_fields(a, "filter_data.py"),
        )
        report, failed = run_all(cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"filter_data.py: error: {e}", file=sys.stderr)
        return 2
    for f in failed:  # the other shards are done; a rerun retries only these
        print(
            f"filter_data.py: shard {f['shard']} ({f['source']}) failed after {f['attempts']} attempts: "
            f"{f['error']}",
            file=sys.stderr,
        )
    if failed and not report:
        return 1
    print(
        f"filter: {report['samples']} samples, kept {report['kept']}, removed {report['removed']} "
        f"{json.dumps(report['removed_by_reason'])} ({report['images_per_s']} images/s per worker)"
    )
    print(f"report: {os.path.join(a.output_dir, REPORT_JSON)}")
    return 1 if failed else 0


if __name__ == "__main__":
    cli.run(main)
