#!/usr/bin/env python
"""Global deduplication passes over WebDataset shards (docs/curation.md, "Deduplicate").

    # 1. signatures, per shard (resumable; a SLURM array, local workers or Ray as filter_data)
    python tools/dedup.py signatures --input 'OUT/*.tar' --output-dir DEDUP/signatures --config filters.yaml
    # 2. grouping, once all signature shards are done: a keep-list per shard
    python tools/dedup.py group --signatures DEDUP/signatures --output-dir DEDUP/keep --config filters.yaml \
        --input 'OUT/*.tar'
    # 3. apply: filter_data's dedup stage
    python tools/filter_data.py --input 'OUT/*.tar' --output-dir CLEAN --config filters.yaml --keep-lists DEDUP/keep

The filter list's stages before its dedup entry also run in the signature pass (a sample they
reject never enters a group); exact_dedup, near_dedup and semantic_dedup give the settings.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_sail import cli  # noqa: E402
from megatron_sail.curate.dedup.grouping import run_grouping  # noqa: E402
from megatron_sail.curate.dedup.signatures import SignatureConfig, input_shards, run_signatures  # noqa: E402
from megatron_sail.curate.filters.job import group_config  # noqa: E402
from megatron_sail.curate.filters.pipeline import load_config  # noqa: E402
from megatron_sail.curate.job import add_job_flags, job_fields  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="dedup.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("signatures", help="pass 1: signature shards")
    s.add_argument(
        "--input",
        action="append",
        required=True,
        metavar="PATH",
        help="tar shards, a glob or a folder (repeatable)",
    )
    s.add_argument("--output-dir", required=True, metavar="DIR", help="where the signature shards go")
    s.add_argument(
        "--config",
        metavar="YAML",
        help="filters.yaml (default: every filter with its defaults; its dedup entries give the settings)",
    )
    s.add_argument(
        "--max-member-bytes",
        type=int,
        default=64 << 20,
        metavar="BYTES",
        help="largest tar member read (default: 64 MiB)",
    )
    s.add_argument(
        "--max-sample-bytes",
        type=int,
        metavar="BYTES",
        help="largest sum of a sample's members (default: 2x --max-member-bytes)",
    )
    add_job_flags(s)
    g = sub.add_parser("group", help="pass 2: groups -> keep-lists per shard")
    g.add_argument("--signatures", required=True, metavar="DIR", help="output folder of the signature pass")
    g.add_argument("--output-dir", required=True, metavar="DIR", help="where the keep-lists go")
    g.add_argument(
        "--config", metavar="YAML", help="filters.yaml, as in the signature pass (default: the defaults)"
    )
    g.add_argument(
        "--input",
        action="append",
        metavar="PATH",
        help="the input shards: every one must have signatures (default: not checked)",
    )
    g.add_argument(
        "--partition-rows",
        type=int,
        default=1_000_000,
        metavar="N",
        help="records per partition, the memory bound (default: 1000000)",
    )
    g.add_argument(
        "--partitions",
        type=int,
        default=0,
        metavar="N",
        help="number of partitions (default: 0, from --partition-rows)",
    )
    g.add_argument("--work-dir", metavar="DIR", help="scratch folder (default: OUTPUT/_work)")
    a = p.parse_args(argv)
    try:
        filters = load_config(a.config)
        if a.cmd == "signatures":
            res = run_signatures(
                SignatureConfig(
                    inputs=a.input,
                    output_dir=a.output_dir,
                    filters=filters,
                    max_member_bytes=a.max_member_bytes,
                    max_sample_bytes=a.max_sample_bytes,
                    **job_fields(a, "dedup.py"),
                )
            )
            print(json.dumps(res, indent=1))
            return 1 if res["failed_shards"] else 0
        expected = [sp.name for sp in input_shards(a.input)] if a.input else None
        report = run_grouping(
            group_config(
                filters,
                a.signatures,
                a.output_dir,
                expected,
                partition_rows=a.partition_rows,
                partitions=a.partitions,
                work_dir=a.work_dir,
            )
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"dedup.py: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    cli.run(main)
