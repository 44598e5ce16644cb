#!/usr/bin/env python
"""The Python half of scripts/gpu_check.sh: probe the machine, decide which checks can run,
collect each check's figures, and write the report.

    python tools/gpu_check.py probe --out DIR          # DIR/probe.json: card, versions, abilities
    python tools/gpu_check.py need cuda te --out DIR   # prints why a check must be skipped ('' = run)
    python tools/gpu_check.py record --out DIR --name N --status passed --seconds 12 \
        --parse kv --log DIR/logs/N.log [--files F ...]
    python tools/gpu_check.py dali-parity --images DIR # GPU DALI tiles against PIL's
    python tools/gpu_check.py report --out DIR         # DIR/report.json + DIR/report.md

Records accumulate in DIR/checks.jsonl (one line per check, in run order); the report joins them
with the probe. Files are written under a temporary name and renamed. ``need`` and ``record``
do not import torch, so that a skipped check costs a fraction of a second.
"""

from __future__ import annotations

import argparse
import json
from importlib import metadata
from pathlib import Path
from typing import Optional

import image_requirements  # a sibling tool: standalone, the image build runs it before installing us
from megatron_sail import cli
from megatron_sail.bench.gpu_check import (
    CheckRecord,
    dali_parity,
    figures,
    need,
    probe,
    record,
    report,
    write_atomic,
)


def _te_range(version: Optional[str]) -> tuple[bool, str]:
    """Whether Transformer Engine ``version`` is inside megatron-core's declared range."""
    try:
        req = image_requirements.te_requirement()
    except metadata.PackageNotFoundError:  # no megatron-core: nothing declares a range
        req = None
    return image_requirements.check_te(version, req)


# ----------------------------------------------------------------------- command line
def main(argv: Optional[list[str]] = None) -> int:
    """Sub-commands: probe, need, record, dali-parity, report (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    helps = {
        "probe": "write DIR/probe.json: card, versions, abilities",
        "need": "print why a check must be skipped (empty: run it)",
        "record": "append one check's result to DIR/checks.jsonl",
        "report": "join the records and the probe into DIR/report.json and report.md",
    }
    for name, text in helps.items():
        s = sub.add_parser(name, help=text)
        s.add_argument(
            "--out", required=True, type=Path, metavar="DIR", help="the check's output folder (required)"
        )
    sub.choices["need"].add_argument(
        "abilities",
        nargs="+",
        metavar="ABILITY",
        help="what the check needs: cuda, te, fp8, dali, megatron, internvl (one or more)",
    )
    r = sub.choices["record"]
    r.add_argument("--name", required=True, help="the check's name (required)")
    r.add_argument(
        "--status",
        required=True,
        choices=("passed", "failed", "timed_out", "skipped"),
        help="how the check ended (required)",
    )
    r.add_argument("--reason", default="", help="why it was skipped or failed (default: none)")
    r.add_argument("--seconds", type=float, default=0.0, help="its wall time (default: 0)")
    r.add_argument("--log", type=Path, default=None, metavar="FILE", help="its log, parsed by --parse")
    r.add_argument(
        "--parse",
        default="none",
        choices=("none", "kv", "junit", "metrics", "benchmark"),
        help="how figures are read from --log or --files (default: none)",
    )
    r.add_argument(
        "--files", nargs="*", type=Path, default=[], metavar="FILE", help="result files kept with the record"
    )
    sub.choices["report"].add_argument(
        "--command",
        default="bash scripts/gpu_check.sh",
        help="the command the report says produced it (default: %(default)s)",
    )
    d = sub.add_parser("dali-parity", help="GPU DALI tiles against PIL's on a folder of images")
    d.add_argument(
        "--images", required=True, type=Path, metavar="DIR", help="folder of images to decode (required)"
    )
    args = p.parse_args(argv)
    if args.cmd == "probe":
        args.out.mkdir(parents=True, exist_ok=True)
        write_atomic(args.out / "probe.json", json.dumps(probe(_te_range), indent=2) + "\n")
    elif args.cmd == "need":
        print(need(json.loads((args.out / "probe.json").read_text()), args.abilities))
    elif args.cmd == "record":
        log = (
            str(args.log.relative_to(args.out))
            if args.log and args.log.is_relative_to(args.out)
            else str(args.log or "")
        )
        record(
            args.out,
            CheckRecord(
                args.name,
                args.status,
                args.reason,
                args.seconds,
                log,
                figures(args.parse, args.log, args.files),
            ),
        )
    elif args.cmd == "report":
        rep = report(args.out, args.command)
        print(
            f"[gpu_check] report: {args.out / 'report.md'} and report.json "
            f"({', '.join(f'{v} {k}' for k, v in rep['summary'].items())})"
        )
        return 1 if rep["summary"]["failed"] or rep["summary"]["timed_out"] else 0
    else:
        print(
            " ".join(
                f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}"
                for k, v in dali_parity(args.images).items()
            )
        )
    return 0


if __name__ == "__main__":
    cli.run(main)
