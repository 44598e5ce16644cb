"""Requests -> model inputs with exactly the training-time preprocessing.

The same ChatML template (data/template.py), InternVL tile-grid rule (data/tiling.py) and tile
cutting + normalization (data/images, PIL backend: InternVL's reference preprocessing) that
built the training rows build the prompt here, so the model sees at inference what it was
trained on. The prompt ends with the assistant header; the answer is what follows.
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from megatron_sail.checkpoint.processor import ProcessorSettings
from megatron_sail.config.images import DEFAULT_MAX_IMAGE_PIXELS, ImageConfig, TilingConfig
from megatron_sail.data.records import ImageRecord
from megatron_sail.data.template import ChatTemplate, SampleError, normalize_turns
from megatron_sail.data.tiling import find_grid, num_tiles
from megatron_sail.data.tokenizer import Tokenizer
from megatron_sail.inference.config import GenerationRequest

log = logging.getLogger(__name__)


@dataclass
class Prompt:
    """One request made ready for the model."""

    ids: list[int]
    """Prompt token ids (image context runs expanded), ending with the assistant header."""
    tiles: Optional[torch.Tensor]
    """float32 [T, 3, S, S] normalized tiles of all images in order (None when not built)."""
    max_new_tokens: int
    """Token budget of this prompt."""


def image_bytes(image, where: str) -> tuple[bytes, str]:
    """Encoded bytes and a display name of a path, bytes or PIL image."""
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if os.path.isdir(path):
            raise IsADirectoryError(f"{where}: {path} is a directory, not an image file")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{where}: image file not found: {path}")
        with open(path, "rb") as f:
            return f.read(), path
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image), f"{where} (bytes)"
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - PIL is a dependency
        Image = None
    if Image is not None and isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.convert("RGB").save(buf, format="PNG")  # lossless: pixels stay what the caller gave
        return buf.getvalue(), f"{where} (PIL image)"
    raise TypeError(f"{where}: an image must be a path, bytes or a PIL image, got {type(image).__name__}")


def image_size(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """(width, height) of encoded image bytes, read from the header only; an undecodable image,
    or one larger than ``max_pixels`` (the limit training data was held to), is an error naming
    it and saying which."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
    except Image.DecompressionBombError as e:  # PIL refuses > 2x its own limit at open
        raise ValueError(f"{name}: too large ({e}; limit {max_pixels} px)") from e
    except Exception as e:  # noqa: BLE001 - any decoder error means the same to the user
        raise ValueError(f"{name}: not a decodable image ({type(e).__name__}: {e})") from e
    if w * h > max_pixels:
        raise ValueError(f"{name}: too large ({w}x{h} = {w * h} px > limit {max_pixels} px)")
    return w, h


class PromptBuilder:
    """Builds Prompts for one tokenizer and one checkpoint's processor settings."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        settings: ProcessorSettings,
        max_tiles: int,
        system: Optional[str] = None,
        max_positions: Optional[int] = None,
    ):
        from megatron_sail.data.images.pil import PilPipeline

        self.tok = tokenizer
        self.max_positions = max_positions
        """The model's max_position_embeddings: prompt + answer must fit (None: unchecked)."""
        self.settings = settings
        self.template_cfg = settings.template_config()
        if system is not None:
            from dataclasses import replace

            self.template_cfg = replace(self.template_cfg, system_prompt=system)
        self.template = ChatTemplate(tokenizer, self.template_cfg)
        self.tiling = TilingConfig(
            settings.tile_size,
            min(settings.min_tiles, max_tiles),
            max_tiles,
            settings.use_thumbnail,
            settings.tokens_per_tile,
        )
        self.pipeline = PilPipeline(ImageConfig(backend="pil", tile_size=settings.tile_size, threads=1))
        sp = tokenizer.special
        self.assistant_header = [sp.im_start] + tokenizer.encode("assistant\n")

    def build(
        self, request: GenerationRequest, default_max_new: int, index: int = 0, with_tiles: bool = True
    ) -> Prompt:
        """Prompt ids (and tiles) of one request; ``index`` only names it in errors."""
        where = f"request {index}"
        if not isinstance(request.prompt, str):
            raise TypeError(f"{where}: prompt must be a string, got {type(request.prompt).__name__}")
        blobs = [image_bytes(im, f"{where} image {k}") for k, im in enumerate(request.images or [])]
        sizes = [image_size(data, name) for data, name in blobs]
        grids = [find_grid(w, h, self.tiling) for w, h in sizes]
        counts = [num_tiles(g, self.tiling.thumbnail) * self.tiling.tokens_per_tile for g in grids]
        turns = [{"from": "human", "value": request.prompt}, {"from": "gpt", "value": ""}]
        try:
            normalized = normalize_turns(turns, len(blobs), self.template_cfg)
        except SampleError as e:
            raise ValueError(f"{where}: {e}") from e
        ids, _ = self.template.render(normalized[:-1], counts)
        ids = [int(i) for i in np.asarray(ids)] + self.assistant_header
        tiles = self._tiles(blobs, grids, sizes) if with_tiles else None
        budget = default_max_new if request.max_new_tokens is None else int(request.max_new_tokens)
        return Prompt(ids, tiles, self._fit(len(ids), budget, where))

    def _fit(self, n_prompt: int, budget: int, where: str) -> int:
        """The answer budget that keeps prompt + answer within the model's positions: a prompt
        that does not fit is an error; a budget that would run past the end is cut, said once."""
        limit = self.max_positions
        if limit is None or n_prompt + budget <= limit:
            return budget
        if n_prompt >= limit:
            raise ValueError(
                f"{where}: the prompt is {n_prompt} tokens, the model's "
                f"max_position_embeddings is {limit}; shorten it or use fewer tiles "
                "(--max-tiles)"
            )
        log.warning(
            f"{where}: prompt {n_prompt} + {budget} new tokens > max_position_embeddings "
            f"{limit}; generating at most {limit - n_prompt} tokens"
        )
        return limit - n_prompt

    def _tiles(self, blobs, grids, sizes) -> torch.Tensor:
        """Normalized tiles of all images in order; a decode failure is an error naming the image."""
        S = self.settings.tile_size
        if not blobs:
            return torch.zeros(0, 3, S, S)
        records = [
            ImageRecord(data, grid, self.tiling.thumbnail, size, 0, name)
            for (data, name), grid, size in zip(blobs, grids, sizes)
        ]
        tiles, ok = self.pipeline.tiles(records)
        bad = [rec.source for rec, good in zip(records, ok) if not good]
        if bad:
            raise ValueError(f"could not decode image(s): {bad}")
        return tiles
