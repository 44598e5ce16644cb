"""The preprocessing run behind tools/preprocess_data.py: records -> samples -> packed rows.

Flow: the main process enumerates raw records in input order and cuts them into blocks of
``packing_buffer`` records; a shard keeps the blocks with ``block % num_shards == shard_index``.
Workers turn a block into packed rows (parse, read image headers, tile, tokenize, pack); the
main process writes the results in block order, so the output depends only on the inputs, the
flags and the seed, never on the worker count or timing.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Iterator, Optional

from megatron_sail.config.data import PreprocessConfig
from megatron_sail.config.images import TilingConfig
from megatron_sail.data import indexed
from megatron_sail.data.images.imageinfo import clean_message, image_info
from megatron_sail.data.preprocess.block_pool import PoolConfig, maybe_kill_self, ordered_map
from megatron_sail.data.preprocess.formats import (
    FORMATS,
    FileFormats,
    ImageAccess,
    RawRecord,
    describe_formats,
    detect_formats,
    expand_inputs,
    iter_records,
    reread_image,
    to_conversation,
)
from megatron_sail.data.preprocess.packing import ImageEntry, Sample, pack_block
from megatron_sail.data.preprocess.selection import Selection, filter_records, load_selection
from megatron_sail.data.preprocess.video import VideoConfig, expand_videos
from megatron_sail.data.template import ChatTemplate, SampleError, normalize_turns
from megatron_sail.data.tiling import find_grid, num_tiles
from megatron_sail.data.tokenizer import Tokenizer, load_tokenizer, tokenizer_identity
from megatron_sail.progress import Progress, ProgressConfig


@dataclass
class BlockResult:
    """What a worker returns for one block."""

    block: int
    """Block id (position in the input stream / packing_buffer)."""
    rows: list[list[Sample]] = field(default_factory=list)
    """Packed rows in order."""
    rejects: list[tuple[str, str, str, str]] = field(default_factory=list)
    """(source, key, reason, detail) per rejected record, in input order."""
    records: int = 0
    """Input records in the block."""


class SampleBuilder:
    """Turns raw records into tokenized samples (one per worker process)."""

    def __init__(self, cfg: PreprocessConfig, fmt: FileFormats, tokenizer: Optional[Tokenizer] = None):
        self.cfg = cfg
        self.fmt = fmt
        self.tok = tokenizer or load_tokenizer(cfg.tokenizer)
        self.template = ChatTemplate(self.tok, cfg.template)
        self.grid = lru_cache(maxsize=65536)(self._grid)
        self.video = VideoConfig(cfg.video_frames, cfg.tiling.tile_size)

    def _grid(self, w: int, h: int, max_tiles: int) -> tuple[tuple[int, int], int]:
        """(grid, <IMG_CONTEXT> count) of an image under a lowered max-tiles bound."""
        t = self.cfg.tiling
        cfg = TilingConfig(
            t.tile_size, min(t.min_tiles, max_tiles), max_tiles, t.thumbnail, t.tokens_per_tile
        )
        grid = find_grid(w, h, cfg)
        return grid, num_tiles(grid, t.thumbnail) * t.tokens_per_tile

    def build(self, rec: RawRecord, index: int) -> Sample:
        """One sample; too long -> fewer tiles step by step -> 'too_long' reject."""
        seq = self.cfg.packing.seq_length
        raw_turns, blobs = to_conversation(rec, self.fmt, index, self.cfg.template, self.cfg.packing.seed)
        raw_turns, blobs = expand_videos(raw_turns, blobs, self.video)  # a clip -> its frames
        turns = normalize_turns(raw_turns, len(blobs), self.cfg.template)
        infos = [image_info(b, self.cfg.max_image_pixels, image_name(b, rec, k)) for k, b in enumerate(blobs)]
        max_tiles = self.cfg.tiling.max_tiles
        grids = [self.grid(w, h, max_tiles) for _, w, h in infos]
        tokens, mask = self.template.render(turns, [n for _, n in grids])
        if len(tokens) > seq:
            text_len = len(tokens) - sum(n for _, n in grids)
            while len(tokens) > seq and max_tiles > self.cfg.tiling.min_tiles and infos:
                max_tiles -= 1
                grids = [self.grid(w, h, max_tiles) for _, w, h in infos]
                if text_len + sum(n for _, n in grids) <= seq:
                    tokens, mask = self.template.render(turns, [n for _, n in grids])
            if len(tokens) > seq:
                raise SampleError("too_long", f"{len(tokens)} tokens > seq_length {seq} at the fewest tiles")
        images = [
            ImageEntry(
                data,
                g,
                self.cfg.tiling.thumbnail,
                (w, h),
                getattr(blob, "origin", None) if data is blob else None,
            )
            for blob, (data, w, h), (g, _) in zip(blobs, infos, grids)
        ]
        return Sample(tokens, mask, images)

    def process_block(
        self, block: int, records: list[tuple[int, RawRecord]], detach: bool = False
    ) -> BlockResult:
        """Build every sample of a block, collect rejects, and pack the samples into rows.

        ``detach``: drop the bytes of large images stored unchanged (the writer re-reads them
        from their origin), so a worker does not pipe every big image back to the main process.
        Images under ``DETACH_MIN_BYTES`` travel back as bytes: re-reading a small file (open,
        checks, read, close) costs the single writer process more than piping it.
        """
        out = BlockResult(block, records=len(records))
        samples = []
        for k, (index, rec) in enumerate(records):
            try:
                sample = self.build(rec, index)
            except SampleError as e:
                out.rejects.append((rec.source, rec.key, e.reason, clean_message(e.detail)))
                continue
            except Exception as e:  # one hostile record must never stop the run (or kill a worker)
                detail = clean_message(f"{type(e).__name__}: {e}")
                out.rejects.append((rec.source, rec.key, "unexpected_error", detail))
                continue
            sample.record = k
            if detach:
                for im in sample.images:
                    if im.origin is not None and len(im.data) >= DETACH_MIN_BYTES:
                        im.data = None
            samples.append(sample)
        out.rows = pack_block(samples, self.cfg.packing.seq_length, self.cfg.packing.seed, block)
        return out


def image_name(blob: bytes, rec: RawRecord, k: int) -> str:
    """How a reject names an image: its file path, its tar member, or its position."""
    kind, value = getattr(blob, "origin", (None, None))
    if kind == "file":
        return value
    if kind == "member":
        return f"{rec.key}.{value}"
    return f"image {k}"


DETACH_MIN_BYTES = 64 << 10
"""Smallest image a worker leaves for the writer to re-read (see process_block)."""

_WORKER: Optional[SampleBuilder] = None


def _init_worker(cfg: PreprocessConfig, fmt: FileFormats) -> None:
    global _WORKER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER = SampleBuilder(cfg, fmt)


def _run_block(block: int, records: list[tuple[int, RawRecord]]) -> BlockResult:
    maybe_kill_self([i for i, _ in records])  # test hook, off unless SAIL_TEST_KILL_WORKER_AT is set
    return _WORKER.process_block(block, records, detach=True)


def attach_images(res: BlockResult, records: list[tuple[int, RawRecord]]) -> BlockResult:
    """Re-read the bytes a worker detached (same bytes: the files are inputs, not changed)."""
    for row in res.rows:
        for sample in row:
            for im in sample.images:
                if im.data is None:
                    rec = records[sample.record][1]
                    try:
                        im.data = reread_image(im.origin, rec)
                    except (OSError, SampleError) as e:
                        raise RuntimeError(
                            f"{rec.source} {rec.key}: image {im.origin[1]} vanished during "
                            f"preprocessing ({e})"
                        ) from e
    return res


def iter_blocks(
    cfg: PreprocessConfig, files: list[str], fmt: FileFormats, select_counts: Optional[dict] = None
) -> Iterator[tuple[int, list]]:
    """(block id, [(record index, record)]) of this shard's blocks, in input order.
    ``select_counts``: filled with the records --select kept and skipped."""
    access = ImageAccess(cfg.allow_absolute_paths, cfg.max_image_bytes)
    records = iter_records(files, fmt, cfg.image_root, access)
    if cfg.select:  # a curriculum stage or a score range (--select): the other records are skipped
        keep = load_selection(Selection(cfg.select, cfg.select_min_score, cfg.select_max_score))
        records = filter_records(records, keep, {} if select_counts is None else select_counts)
    size = cfg.packing.packing_buffer
    for block in itertools.count():
        chunk = list(itertools.islice(records, size))
        if not chunk:
            return
        if block % cfg.num_shards == cfg.shard_index:
            yield block, [(block * size + k, r) for k, r in enumerate(chunk)]


def map_blocks(
    cfg: PreprocessConfig,
    fmt: FileFormats,
    blocks: Iterator,
    builder: SampleBuilder,
    log: Callable[[str], None] = print,
) -> Iterator[BlockResult]:
    """Results in block order; at most 2 x workers blocks in flight (bounded memory). A worker
    killed from outside costs one retry of its blocks, a second death a WorkerDied error
    (block_pool.py); nothing hangs."""
    if cfg.workers <= 1:
        for block, recs in blocks:
            yield builder.process_block(block, recs)
        return
    pool = PoolConfig(cfg.workers, in_flight=2 * cfg.workers)
    where = f"shard {cfg.shard_index} of {cfg.num_shards}" if cfg.num_shards > 1 else "the run"
    yield from ordered_map(pool, _run_block, blocks, _init_worker, (cfg, fmt), attach_images, where, log)


def recorded_tokenizer_path(path: str) -> str:
    """The tokenizer as meta.json records it: absolute when it is a local file or folder, so
    that training from another working directory still finds it (a relative path silently
    dropped tokenizer/ from every checkpoint)."""
    return os.path.abspath(path) if os.path.exists(path) else path


def build_meta(
    cfg: PreprocessConfig,
    fmt: FileFormats,
    tok: Tokenizer,
    writer: indexed.PackedWriter,
    records: int,
    rejects: Counter,
    shard: tuple[int, int],
) -> dict:
    """meta.json content: everything the trainer and inspect need, nothing run-specific."""
    sp = tok.special
    seq = cfg.packing.seq_length
    return {
        "format": indexed.FORMAT_NAME,
        "version": indexed.FORMAT_VERSION,
        "seq_length": seq,
        "input_format": fmt if isinstance(fmt, str) else "+".join(sorted(set(fmt.values()))),
        "tokenizer": {
            "path": recorded_tokenizer_path(cfg.tokenizer),
            "vocab_size": tok.vocab_size,
            "added": list(tok.added),
            "identity": tokenizer_identity(tok),
            "img_context_id": sp.img_context,
            "img_start_id": sp.img_start,
            "img_end_id": sp.img_end,
            "im_start_id": sp.im_start,
            "im_end_id": sp.im_end,
            "pad_id": sp.pad,
            "tokens_per_tile": cfg.tiling.tokens_per_tile,
            "tile_size": cfg.tiling.tile_size,
            **({"geometry": cfg.geometry} if cfg.geometry else {}),
        },
        "tiling": dataclasses.asdict(cfg.tiling),
        "template": dataclasses.asdict(cfg.template),
        "packing": dataclasses.asdict(cfg.packing),
        "shard": {"index": shard[0], "num_shards": shard[1]},
        "stats": writer_stats(writer, records, seq),
        "rejects": dict(sorted(rejects.items())),
        "blocks": writer.blocks,
    }


def writer_stats(writer, records: int, seq_length: int) -> dict:
    """The stats block of meta.json from a finished writer's counts and the ``records`` read."""
    st = writer.stats
    return stats_dict(
        records,
        writer.samples,
        writer.rows,
        writer.num_images,
        st["tiles"],
        st["text_tokens"],
        st["image_tokens"],
        st["loss_tokens"],
        seq_length,
    )


def stats_dict(
    records: int,
    samples: int,
    rows: int,
    images: int,
    tiles: int,
    text_tokens: int,
    image_tokens: int,
    loss_tokens: int,
    seq_length: int,
) -> dict:
    """The stats block of meta.json (also rebuilt by merge_datasets from summed counts)."""
    used = text_tokens + image_tokens
    return {
        "records": records,
        "samples": samples,
        "rows": rows,
        "images": images,
        "tiles": tiles,
        "text_tokens": text_tokens,
        "image_tokens": image_tokens,
        "loss_tokens": loss_tokens,
        "fill_ratio": round(used / (rows * seq_length), 6) if rows else 0.0,
    }


def run(cfg: PreprocessConfig, log: Callable[[str], None] = print) -> tuple[int, dict]:
    """Run preprocessing; returns (exit code, summary). Publishes the dataset only on success."""
    if not 0 <= cfg.shard_index < cfg.num_shards:
        raise ValueError(f"--shard-index {cfg.shard_index} not in [0, {cfg.num_shards})")
    g, t = cfg.geometry, cfg.tiling
    if g and (g["tokens_per_tile"], g["tile_size"]) != (t.tokens_per_tile, t.tile_size):
        raise ValueError(
            f"tiling of {t.tile_size} px / {t.tokens_per_tile} tokens per tile "
            f"contradicts the recorded geometry {g}"
        )
    files = expand_inputs(cfg.inputs)
    if cfg.format is not None and cfg.format not in FORMATS:
        raise ValueError(f"unknown format {cfg.format!r}; expected one of {FORMATS}")
    fmt = detect_formats(files, cfg.format)
    for line in describe_formats(fmt):
        log(line)
    tok = load_tokenizer(cfg.tokenizer, log=log)
    builder = SampleBuilder(cfg, fmt, tok)
    records, rejects = 0, Counter()
    with indexed.PackedWriter(cfg.output_prefix) as writer:
        start = time.perf_counter()  # after the writer's one-off megatron.core import
        selected: dict = {}
        bar = Progress(
            desc="preprocess", unit="records", config=None if cfg.progress else ProgressConfig(enabled=False)
        )
        for res in map_blocks(cfg, fmt, iter_blocks(cfg, files, fmt, selected), builder, log):
            bar.update(res.records)
            for row in res.rows:
                writer.add_row(row, tok.special.img_context)
            for rej in res.rejects:
                writer.add_reject(*rej)
                rejects[rej[2]] += 1
            records += res.records
            writer.end_block(res.block)
        bar.close()
        meta = build_meta(cfg, fmt, tok, writer, records, rejects, (cfg.shard_index, cfg.num_shards))
        n_rej = sum(rejects.values())
        rate = n_rej / records if records else 0.0
        summary = {
            "output_prefix": cfg.output_prefix,
            **meta["stats"],
            "rejects": meta["rejects"],
            "reject_rate": round(rate, 6),
            "seconds": round(time.perf_counter() - start, 3),
        }
        if cfg.select:
            summary["select"] = {
                "kept": selected.get("selected", 0),
                "skipped": selected.get("not_selected", 0),
            }
        # an empty shard is fine (its blocks may all belong to other shards); an empty run is not
        empty = records == 0 and cfg.num_shards == 1
        failed = (cfg.strict and n_rej > 0) or rate > cfg.max_reject_rate or empty
        if failed:
            writer.abort(keep_rejects=True)
            why = (
                "no input records"
                if empty
                else f"{n_rej} rejected with --strict"
                if cfg.strict and n_rej
                else f"reject rate {rate:.4f} > --max-reject-rate {cfg.max_reject_rate}"
            )
            summary["error"] = f"{why}; dataset not written, see {cfg.output_prefix}.rejects.jsonl"
            return 1, summary
        writer.commit(meta)
    return 0, summary
