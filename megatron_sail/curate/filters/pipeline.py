"""Filtering in one call on this machine (``run_filters``), and the names callers import with it.

The filter list itself (config, stages, one sample through them, shard reading) is
filters/stages.py; the sharded, resumable passes are filters/job.py. This module sits above both,
so neither imports it back.
"""

from __future__ import annotations

from typing import Optional

from megatron_sail.curate.filters.job import FilterJobConfig, run_all
from megatron_sail.curate.filters.stages import (  # noqa: F401 - the names callers import from here
    STAGES,
    FilterConfig,
    build_stages,
    load_config,
    read_shard,
    run_stages,
    shard_name,
)
from megatron_sail.data.preprocess import formats


def run_filters(
    inputs: list[str],
    out_dir: str,
    cfg: FilterConfig,
    max_bytes: int = formats.DEFAULT_MAX_IMAGE_BYTES,
    progress: bool = False,
    max_sample_bytes: Optional[int] = None,
    **job,
):
    """Filter (and, with dedup on, first deduplicate) every input shard into ``out_dir`` on this
    machine: the passes of filters/job.py in one call. Returns the run report (a dict)."""
    report, failed = run_all(
        FilterJobConfig(
            inputs=list(inputs),
            output_dir=out_dir,
            filters=cfg,
            max_member_bytes=max_bytes,
            max_sample_bytes=max_sample_bytes,
            progress=progress,
            **job,
        )
    )
    if failed:
        raise RuntimeError(
            f"shard {failed[0]['shard']} failed after {failed[0]['attempts']} attempts: {failed[0]['error']}"
        )
    return report
