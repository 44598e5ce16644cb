"""filter_data as a sharded, resumable job on the shared executors (curate/job.py): one output
shard per input shard (``NAME.tar`` + ``NAME.rejects.jsonl`` + ``reports/NAME.json``, written
under temporary names, then the done marker), so a rerun skips finished shards and a killed run
resumes with every sample kept or rejected exactly once. Local workers, SLURM arrays
(``shard_index/num_shards``) and Ray (``executor='ray'``) run the same FilterShardWorker.

``run_all`` is the one-machine path: with dedup on and no keep-lists given it first runs the
signature pass (same executors) and the grouping pass into ``OUT/dedup/``, then filters. On a
cluster the passes run separately (tools/dedup.py, docs/curation.md). The merged report
(``filter_report.json/.png/.html``) is rebuilt from the per-shard reports of every finished
shard of the output folder, whichever task wrote them.
"""

from __future__ import annotations

import base64
import io
import json
import os
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

from megatron_sail.curate.filters.base import FilterSample
from megatron_sail.curate.filters.report import REPORTS, THUMBNAILS, write_run_report
from megatron_sail.curate.filters.stages import FilterConfig, build_stages, read_shard, run_stages
from megatron_sail.curate.job import check_job, run_job
from megatron_sail.curate.reader import ShardSpec, dump_json
from megatron_sail.curate.writer import ShardWriter
from megatron_sail.data.preprocess import formats


@dataclass
class FilterJobConfig:
    """One filter_data run (job fields as in curate/job.py)."""

    inputs: list[str] = field(default_factory=list)
    """Tar shards (globs, folders)."""
    output_dir: str = ""
    """Output shards, rejects, reports/, done/, done_manifest.json and the run report."""
    filters: FilterConfig = field(default_factory=FilterConfig)
    """The filter list (filters.yaml)."""
    keep_lists: Optional[str] = None
    """Keep-lists of the grouping pass (tools/dedup.py group); None with dedup on: run_all makes them."""
    max_member_bytes: int = formats.DEFAULT_MAX_IMAGE_BYTES
    """Largest tar member read."""
    max_sample_bytes: Optional[int] = None
    """Largest sum of one sample's members (None: twice max_member_bytes)."""
    shard_index: int = 0
    num_shards: int = 1
    executor: str = "local"
    workers: int = 1
    shard_retries: int = 2
    ray_address: Optional[str] = None
    ray_num_cpus: Optional[int] = None
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    progress: bool = False

    def __post_init__(self) -> None:
        check_job(self)
        if not self.inputs:
            raise ValueError("no --input given")

    def make_worker(self):
        return FilterShardWorker(self)


def _thumbnail(data: Optional[bytes]) -> Optional[str]:
    """A small JPEG (64 px) of an image, base64, for the report; None when it does not decode."""
    if not data:
        return None
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.draft("RGB", (64, 64))
            im = im.convert("RGB")
            im.thumbnail((64, 64))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=80)
        return base64.b64encode(buf.getvalue()).decode("ascii")
    except Exception:  # noqa: BLE001 - an undecodable image has no thumbnail
        return None


def _with_record(sample: FilterSample) -> dict:
    """The members to write: the ``json`` member gains what stages recorded (judge scores)."""
    if not sample.record:
        return sample.members
    members = dict(sample.members)
    obj = {}
    if "json" in members:
        try:
            obj = json.loads(members["json"])
        except ValueError:
            obj = {}
        if not isinstance(obj, dict):
            obj = {"original_json": obj}
    obj.update(sample.record)
    members["json"] = dump_json(obj)
    return members


class FilterShardWorker:
    """Filters one shard at a time (models of the CLIP and judge stages load once per worker)."""

    def __init__(self, cfg: FilterJobConfig):
        self.cfg = cfg
        self.stages = None

    def load(self) -> None:
        self.stages = build_stages(self.cfg.filters, keep_dir=self.cfg.keep_lists)

    def retries(self) -> int:
        return 0

    def close(self) -> None:
        for st in self.stages or []:
            close = getattr(st, "close", None)
            if close:
                close()

    def process(self, spec: ShardSpec, progress: Optional[Callable[[int], None]] = None) -> dict:
        """Filter one shard completely; on any exception the partial files are removed."""
        if self.stages is None:
            self.load()
        start = time.time()
        writer = ShardWriter(self.cfg.output_dir, spec.name, kept_name="kept")
        report = {
            "shard": spec.name,
            "removed": {},
            "scores": {},
            "score_kept": {},
            "stage_seconds": {},
            "thumbnails": {},
        }
        try:
            for sample, reject in read_shard(
                spec.source, self.cfg.max_member_bytes, self.cfg.max_sample_bytes
            ):
                stage = "read"
                if reject is None:
                    stage, reject, seconds = run_stages(self.stages, sample)
                    for k, v in seconds.items():
                        report["stage_seconds"][k] = report["stage_seconds"].get(k, 0.0) + v
                for k, v in sample.scores.items():
                    report["scores"].setdefault(k, []).append(v)
                    report["score_kept"].setdefault(k, []).append(reject is None)
                if reject is None:
                    writer.add_members(sample.key, _with_record(sample))
                else:
                    by_stage = report["removed"].setdefault(stage, {})
                    by_stage[reject.reason] = by_stage.get(reject.reason, 0) + 1
                    thumbs = report["thumbnails"].setdefault(reject.reason, [])
                    if len(thumbs) < THUMBNAILS:
                        thumbs.append(
                            {
                                "where": sample.where,
                                "detail": reject.detail[:120],
                                "jpeg": _thumbnail(sample.image_bytes),
                            }
                        )
                    line = {
                        "key": sample.key,
                        "shard": sample.shard,
                        "stage": stage,
                        "reason": reject.reason,
                        "detail": reject.detail,
                        "caption": sample.caption,
                    }
                    if sample.record:
                        line.update(sample.record)
                    writer.reject_line(sample.key, reject.reason, line)
                if progress:
                    progress(1)
            report["stage_seconds"] = {k: round(v, 4) for k, v in report["stage_seconds"].items()}
            return writer.commit(
                {"source": spec.source, "seconds": round(time.time() - start, 3)},
                extra={os.path.join(REPORTS, spec.name + ".json"): json.dumps(report).encode()},
            )
        except BaseException:
            writer.abort()
            raise


def input_shards(inputs: list[str], out_dir: str) -> list[ShardSpec]:
    """The input shards; an output folder that holds inputs is an error (they would be overwritten)."""
    from megatron_sail.curate.dedup.signatures import input_shards as shards_of

    specs = shards_of(inputs)
    real_out = os.path.realpath(out_dir) + os.sep
    if any(os.path.realpath(s.source).startswith(real_out) for s in specs):
        raise ValueError(f"--output-dir {out_dir} holds input shards; write to another folder")
    return specs


def run_filter_job(cfg: FilterJobConfig) -> dict:
    """Filter this task's pending shards, then rebuild the run report; returns the summary."""
    specs = input_shards(cfg.inputs, cfg.output_dir)

    def bar(pending):
        from tqdm import tqdm

        return tqdm(total=None, unit="img", desc="filter", dynamic_ncols=True)

    res = run_job(cfg, specs, bar, totals=("samples", "kept", "rejected"))
    res.pop("results")
    report = write_run_report(cfg.output_dir, cfg.filters)
    return {**res, "report": report}


def run_all(cfg: FilterJobConfig) -> tuple[dict, list]:
    """Signatures -> grouping -> filtering on this machine when dedup is on and no keep-lists
    were given; else just the filter job. Returns (the run report: filter_report.json, the
    shards that failed after their retries)."""
    if cfg.filters.dedup_enabled() and cfg.keep_lists is None:
        if cfg.num_shards > 1:
            raise ValueError(
                "with --num-shards > 1 run the dedup passes first (tools/dedup.py signatures, then "
                "group) and give their keep-lists with --keep-lists, or disable deduplication"
            )
        keep, failed = dedup_locally(cfg)
        if failed:
            return {}, failed
        cfg = replace(cfg, keep_lists=keep)
    summary = run_filter_job(cfg)
    with open(summary["report"], encoding="utf-8") as f:
        return json.load(f), summary["failed_shards"]


def dedup_locally(cfg: FilterJobConfig) -> tuple[str, list]:
    """The signature and grouping passes into OUT/dedup/; returns (the keep-list folder, failed
    signature shards). Finished signature shards and a finished grouping are reused by a rerun."""
    from megatron_sail.curate.dedup.grouping import run_grouping
    from megatron_sail.curate.dedup.signatures import SignatureConfig, run_signatures

    f = cfg.filters
    sig_dir = os.path.join(cfg.output_dir, "dedup", "signatures")
    keep_dir = os.path.join(cfg.output_dir, "dedup", "keep")
    specs = input_shards(cfg.inputs, cfg.output_dir)
    sig = run_signatures(
        SignatureConfig(
            inputs=cfg.inputs,
            output_dir=sig_dir,
            filters=f,
            max_member_bytes=cfg.max_member_bytes,
            max_sample_bytes=cfg.max_sample_bytes,
            executor=cfg.executor,
            workers=cfg.workers,
            shard_retries=cfg.shard_retries,
            ray_address=cfg.ray_address,
            ray_num_cpus=cfg.ray_num_cpus,
            gpus_per_worker=cfg.gpus_per_worker,
            cpus_per_worker=cfg.cpus_per_worker,
        )
    )
    if sig["failed_shards"]:
        return keep_dir, sig["failed_shards"]
    if not os.path.isfile(os.path.join(keep_dir, "dedup_report.json")):
        run_grouping(group_config(f, sig_dir, keep_dir, [s.name for s in specs]))
    return keep_dir, []


def group_config(f: FilterConfig, sig_dir: str, keep_dir: str, expected: Optional[list] = None, **kw):
    """The grouping settings a filter config implies."""
    from megatron_sail.curate.dedup.grouping import GroupConfig

    s = f.semantic_dedup
    return GroupConfig(
        signatures=sig_dir,
        output_dir=keep_dir,
        exact=f.exact_dedup.enabled,
        near=f.near_dedup.enabled,
        max_distance=f.near_dedup.max_distance,
        bands=f.near_dedup.bands,
        colour_distance=f.near_dedup.colour_distance,
        semantic=s.enabled,
        clusters=s.clusters,
        threshold=s.threshold,
        kmeans_iters=s.kmeans_iters,
        kmeans_sample=s.kmeans_sample,
        seed=s.seed,
        expected_shards=expected,
        **kw,
    )
