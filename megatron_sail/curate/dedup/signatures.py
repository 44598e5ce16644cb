"""The signature pass: one ``NAME.sig.npz`` per input shard (the samples that reach the dedup
position of the filter list), written under a temporary name with a done marker, so the pass
is sharded, resumable and retried like recaption (curate/job.py).

A signature shard holds, row by row in input order: ``keys`` (the sanitized sample key, ASCII),
``sha256`` (uint8 [n, 32], of the encoded image bytes), ``phash`` (uint64 [n, bits/64], the
perceptual hash's bits, most significant first), ``phash_ok`` (uint8: 0 when the image could
not be hashed), ``pixels`` (int64 width x height, for the survivor rule) and, with semantic
dedup on, ``embedding`` (float16 [n, d], L2-normalised CLIP image embeddings).
"""

from __future__ import annotations

import hashlib
import io
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from megatron_sail.curate.dedup.sigfile import (  # noqa: F401 - re-exported
    COLOUR_CELLS,
    COLOUR_GRID,
    SUFFIX,
    load_signatures,
)
from megatron_sail.curate.filters.stages import (
    FilterConfig,
    build_stages,
    read_shard,
    run_stages,
    shard_name,
)
from megatron_sail.curate.job import check_job
from megatron_sail.curate.reader import ShardSpec
from megatron_sail.curate.writer import DONE_DIR, done_marker, write_atomic
from megatron_sail.data.preprocess import formats
from megatron_sail.platform.parent_watch import check_parent


def phash_words(img, hash_size: int) -> np.ndarray:
    """imagehash's pHash bits packed into uint64 words (first bit = most significant)."""
    import imagehash

    bits = imagehash.phash(img, hash_size=hash_size).hash.flatten().astype(np.uint8)
    return np.packbits(bits).view(">u8").astype(np.uint64)


def colour_grid(img) -> np.ndarray:
    """The image's COLOUR_GRID x COLOUR_GRID RGB box averages, flattened (uint8)."""
    from PIL import Image

    small = img.convert("RGB").resize((COLOUR_GRID, COLOUR_GRID), Image.BOX)
    return np.asarray(small, dtype=np.uint8).reshape(-1)


def check_hash_size(hash_size: int) -> int:
    """Words per hash; the bit count must be a multiple of 64 (hash_size 8, 16, 24, 32)."""
    if hash_size < 8 or (hash_size * hash_size) % 64:
        raise ValueError(
            f"near_dedup.hash_size {hash_size}: hash_size**2 bits must be a multiple of 64 (8, 16, 24 or 32)"
        )
    return hash_size * hash_size // 64


@dataclass
class SignatureConfig:
    """The signature pass over WebDataset shards (job fields as in curate/job.py)."""

    inputs: list[str] = field(default_factory=list)
    """Tar shards (globs, folders)."""
    output_dir: str = ""
    """Signature shards, done/ and done_manifest.json."""
    filters: FilterConfig = field(default_factory=FilterConfig)
    """The filter list: its stages before the dedup entry run here first; near_dedup.hash_size
    and semantic_dedup say what is computed."""
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
    output_suffix: str = SUFFIX

    def __post_init__(self) -> None:
        check_job(self)
        check_hash_size(self.filters.near_dedup.hash_size)

    def make_worker(self):
        return SignatureWorker(self)


class SignatureWorker:
    """Computes one shard's signatures (the CLIP model, if any, loads once per worker)."""

    def __init__(self, cfg: SignatureConfig):
        self.cfg = cfg
        self.stages = None
        self.clip = None

    def load(self) -> None:
        self.stages = build_stages(self.cfg.filters, upto_dedup=True)
        sem = self.cfg.filters.semantic_dedup
        if sem.enabled:
            from megatron_sail.curate.filters.clip_score import ClipScore, ClipScoreConfig

            if not sem.model:
                raise ValueError("semantic_dedup.model: give a transformers CLIP folder")
            self.clip = ClipScore(ClipScoreConfig(enabled=True, model=sem.model, device=sem.device))

    def retries(self) -> int:
        return 0

    def close(self) -> None:
        pass

    def _embed(self, sample) -> np.ndarray:
        import torch

        with torch.no_grad():
            feats = self.clip.model.get_image_features(
                pixel_values=self.clip._pixels(sample).to(self.clip.cfg.device)
            )
        v = getattr(feats, "pooler_output", feats).float()[0].cpu().numpy()
        return (v / max(float(np.linalg.norm(v)), 1e-12)).astype(np.float16)

    def process(self, spec: ShardSpec, progress: Optional[Callable[[int], None]] = None) -> dict:
        """Signatures of one shard, committed (file, then marker) only when complete."""
        if self.stages is None:
            self.load()
        start = time.time()
        words = check_hash_size(self.cfg.filters.near_dedup.hash_size)
        with_colour = self.cfg.filters.near_dedup.colour_distance is not None
        cells = COLOUR_CELLS
        keys, shas, hashes, ok, pixels, embs, colours = [], [], [], [], [], [], []
        samples = excluded = 0
        for sample, reject in read_shard(spec.source, self.cfg.max_member_bytes, self.cfg.max_sample_bytes):
            samples += 1
            if reject is None:
                _, reject, _ = run_stages(self.stages, sample)
            if reject is not None or sample.image_bytes is None:
                excluded += 1  # rejected before dedup in filter_data too: never a group member
                continue
            keys.append(sample.key.encode("ascii"))
            shas.append(np.frombuffer(hashlib.sha256(sample.image_bytes).digest(), np.uint8))
            try:
                img = sample.image()
                h, px = phash_words(img, self.cfg.filters.near_dedup.hash_size), img.size[0] * img.size[1]
                grid = colour_grid(img) if with_colour else None
                good = 1
            except Exception:  # noqa: BLE001 - an undecodable image still has an exact signature
                h, px, good, grid = np.zeros(words, np.uint64), 0, 0, np.zeros(cells, np.uint8)
            hashes.append(h)
            if with_colour:
                colours.append(grid)
            ok.append(good)
            pixels.append(px)
            if self.clip is not None:
                dim = self.clip.model.config.projection_dim
                embs.append(self._embed(sample) if good else np.zeros(dim, np.float16))
            if progress:
                progress(1)
        arrays = {
            "keys": np.array(keys, dtype="S") if keys else np.zeros(0, "S1"),
            "sha256": np.stack(shas) if shas else np.zeros((0, 32), np.uint8),
            "phash": np.stack(hashes) if hashes else np.zeros((0, words), np.uint64),
            "phash_ok": np.array(ok, np.uint8),
            "pixels": np.array(pixels, np.int64),
        }
        if with_colour:
            arrays["colour"] = np.stack(colours) if colours else np.zeros((0, cells), np.uint8)
        if self.clip is not None:
            arrays["embedding"] = np.stack(embs) if embs else np.zeros((0, 1), np.float16)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        check_parent(f"signatures of {spec.name}")
        out = os.path.join(self.cfg.output_dir, spec.name + SUFFIX)
        write_atomic(out, buf.getvalue())
        marker = {
            "source": spec.source,
            "samples": samples,
            "signed": len(keys),
            "excluded_before_dedup": excluded,
            "hash_size": self.cfg.filters.near_dedup.hash_size,
            "colour": with_colour,
            "seconds": round(time.time() - start, 3),
        }
        os.makedirs(os.path.join(self.cfg.output_dir, DONE_DIR), exist_ok=True)
        import json

        write_atomic(done_marker(self.cfg.output_dir, spec.name), json.dumps(marker, indent=1).encode())
        return marker


def input_shards(inputs: list[str]) -> list[ShardSpec]:
    """WebDataset tar shards of the inputs, in a stable order; duplicate names are an error."""
    paths = formats.expand_inputs(inputs)
    bad = [p for p in paths if not p.endswith(".tar")]
    if bad:
        raise ValueError(f"input {bad[0]}: not a WebDataset .tar shard")
    names = [shard_name(p) for p in paths]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise ValueError(f"two inputs are both named {dup}.tar; filter them into different --output-dir")
    return [ShardSpec(n, p, "webdataset") for n, p in zip(names, paths)]


def run_signatures(cfg: SignatureConfig) -> dict:
    """The signature pass over this task's shards (skips done ones)."""
    from megatron_sail.curate.job import run_job

    res = run_job(cfg, input_shards(cfg.inputs), totals=("samples", "signed"))
    res.pop("results")
    return res
