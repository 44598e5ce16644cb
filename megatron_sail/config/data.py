"""Dataclass configs of the offline data pipeline (tools/preprocess_data.py).

One config per component: the chat template, packing, and the preprocessing run that composes
them with the tiling config (config/images.py; the arithmetic is data/tiling.py). The
trainer-side dataset config (prefixes, weights) lives in config/train.py's DataConfig; the reader
needs only a prefix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from megatron_sail.config.images import DEFAULT_MAX_IMAGE_PIXELS, TilingConfig

DEFAULT_MAX_IMAGE_BYTES = 128 << 20
"""Default --max-image-bytes: above any 50 MP PNG photo, far below a /dev/zero-style read."""

DEFAULT_CAPTION_PROMPTS = (
    "Describe the image.",
    "Describe this image briefly.",
    "What is shown in this image?",
    "Write a short caption for the image.",
)


@dataclass(frozen=True)
class TemplateConfig:
    """How a conversation becomes ChatML tokens (the SAIL-VL / InternVL2.5 template)."""

    system_prompt: str = ""
    """System message used when a sample has none; empty means no system turn at all."""
    turn_separator: str = "\n"
    """Text after each <|im_end|> (ChatML: a newline); not trained on."""
    image_separator: str = "\n"
    """Text after each image block when a missing <image> placeholder is prepended."""
    caption_prompts: tuple[str, ...] = DEFAULT_CAPTION_PROMPTS
    """User prompts for caption pairs; one is picked per sample from a seeded hash of its key."""


@dataclass(frozen=True)
class PackingConfig:
    """How samples are packed into fixed-length rows."""

    seq_length: int = 4096
    """Tokens per packed row; a sample is never split across rows."""
    packing_buffer: int = 4096
    """Input records per packing block: shuffled, then first-fit-decreasing packed together.
    Blocks are independent, which bounds memory and makes shards mergeable exactly."""
    seed: int = 1234
    """Seed of the per-block shuffle and of the caption-prompt choice."""


@dataclass
class PreprocessConfig:
    """One run of tools/preprocess_data.py."""

    inputs: list[str] = field(default_factory=list)
    """Input files, directories or globs."""
    output_prefix: str = ""
    """Output prefix P: writes P.tokens.*, P.loss_mask.*, P.images.*, P.images_meta.npy,
    P.rejects.jsonl and P.meta.json (data/indexed.py)."""
    tokenizer: str = ""
    """tokenizer.json, a Hugging Face tokenizer directory, or a sentencepiece .model."""
    format: Optional[str] = None
    """llava, caption or webdataset; None detects it from the first input."""
    image_root: Optional[str] = None
    """Directory that relative image paths are resolved against (default: the input's directory)."""
    tiling: TilingConfig = field(default_factory=TilingConfig)
    """Tile grid rule and tokens per tile."""
    template: TemplateConfig = field(default_factory=TemplateConfig)
    """Chat template."""
    packing: PackingConfig = field(default_factory=PackingConfig)
    """Row length, packing buffer and seed."""
    workers: int = 1
    """Worker processes (1: in-process)."""
    shard_index: int = 0
    """Which shard of the input this run processes (blocks b with b % num_shards == shard_index)."""
    num_shards: int = 1
    """How many machines share the input."""
    strict: bool = False
    """Exit 1 (and publish nothing) on any rejected sample."""
    progress: bool = False
    """Report records done and their rate on stderr (a bar on a terminal, a line every 30 s
    off it); tools/preprocess_data.py turns it on, library callers stay quiet."""
    max_reject_rate: float = 0.05
    """Exit 1 (and publish nothing) when rejects / input records exceeds this."""
    allow_absolute_paths: bool = False
    """Accept absolute image paths in records (read as given). Off: an absolute path is a
    ``path_outside_root`` reject; relative paths must always resolve (symlinks followed) inside
    image_root (or the input file's directory)."""
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    """Largest image file (or tar member) read, in bytes; larger ones are ``file_too_large``
    rejects. Only regular files are read (no FIFOs, devices, directories)."""
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    """Largest width x height accepted (``image_too_large`` above it); keep the trainer's
    ImageConfig.max_pixels the same (both default to config/images.py's DEFAULT_MAX_IMAGE_PIXELS)."""
    video_frames: int = 8
    """Frames sampled from each InternVL video sample (middle of equal segments), one tile each
    (data/preprocess/video.py); 0 rejects video samples (``video_unsupported``)."""
    select: Optional[str] = None
    """Keep only the records a sample list names (data/preprocess/selection.py: a curriculum stage list or a
    complexity sidecar folder); None keeps every record."""
    select_min_score: Optional[float] = None
    """With ``select``: keep records scoring at least this."""
    select_max_score: Optional[float] = None
    """With ``select``: keep records scoring below this."""
    geometry: Optional[dict] = None
    """The model's token geometry the tiling's tokens per tile came from (data/geometry.py:
    family, tile and patch size, grid, class tokens, merge, recipe), stored as meta.json
    ``tokenizer.geometry``; None when tokens per tile were given by hand (no --recipe)."""
