"""Model inputs for an exported transformers-layout folder without torchvision.

transformers 5.23's ``InternVLProcessor`` (what ``AutoProcessor`` builds for an InternVL folder)
cannot be constructed unless torchvision imports: its video-processor slot is checked against a
class transformers defines only with torchvision. PyPI's torchvision does not import beside the
CPU torch this project pins, so ``AutoProcessor.from_pretrained(export)`` fails in the project's
environment. Everything the processor does for images and text works without it:
``AutoTokenizer`` (with the export's chat template), ``AutoImageProcessor`` (GotOcr2's PIL
backend: InternVL's dynamic tiling) and the image-token expansion, which this module does the
way ``InternVLProcessor`` does it: each ``<IMG_CONTEXT>`` placeholder of the text, in order over
the batch, becomes ``<img>`` + ``<IMG_CONTEXT>`` x (tokens per tile x tiles of that image) +
``</img>``; text is padded on the left. The result feeds
``AutoModelForImageTextToText`` / ``InternVLForConditionalGeneration`` (``model(**inputs)``,
``model.generate(**inputs)``) exactly as the processor's would (docs/conversion.md)::

    from megatron_sail.convert.hf_processor import ExportProcessor
    processor = ExportProcessor.from_pretrained("exports/sft_1000")
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=[image], text=text)
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

from megatron_sail.checkpoint.layout import HF_CONFIG, HF_PREPROCESSOR_FILE

PROCESSOR_CONFIG = "processor_config.json"
"""Where an export records ``image_seq_length`` (tokens per tile) for InternVLProcessor."""


@dataclass
class ExportProcessorConfig:
    """The processor's own settings (the tokenizer and image processor carry the rest)."""

    image_seq_length: int
    """``<IMG_CONTEXT>`` tokens per tile (the model's tokens per tile)."""
    crop_to_patches: bool = True
    """Dynamic tiling plus thumbnail, as InternVLProcessor always asks its image processor."""
    padding_side: str = "left"
    """InternVLProcessor pads text on the left (generation appends on the right)."""


def _image_seq_length(folder: Path) -> int:
    """Tokens per tile: processor_config.json, else config.json (both written by mcore-to-hf)."""
    for name in (PROCESSOR_CONFIG, HF_CONFIG):
        path = folder / name
        if path.is_file():
            value = json.loads(path.read_text()).get("image_seq_length")
            if value is not None:
                return int(value)
    raise ValueError(
        f"{folder}: neither {PROCESSOR_CONFIG} nor config.json records "
        "image_seq_length (the model's tokens per tile); is it an InternVL export?"
    )


def _open_image(image):
    """A PIL image in RGB; a path is opened (the processor's own inputs are images)."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as im:
            return im.convert("RGB")
    return image.convert("RGB") if hasattr(image, "convert") else image


class ExportProcessor:
    """InternVLProcessor's behaviour for images and text, built from the export's tokenizer and
    image processor; needs no torchvision (no video: SAIL-VL does not train on video)."""

    def __init__(self, tokenizer, image_processor, config: ExportProcessorConfig):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.config = config
        self.image_token = tokenizer.context_image_token
        self.start_image_token = tokenizer.start_image_token
        self.end_image_token = tokenizer.end_image_token
        self.video_token = getattr(tokenizer, "video_token", None)
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)

    @classmethod
    def from_pretrained(cls, folder: Union[str, os.PathLike]) -> "ExportProcessor":
        """The export's tokenizer (chat template included) and image processor. The image
        processor uses its PIL backend even where torchvision imports: PIL's bicubic resize is
        what training's tiles were made with (torchvision's differs slightly)."""
        from transformers import AutoImageProcessor, AutoTokenizer

        folder = Path(folder)
        if not (folder / HF_PREPROCESSOR_FILE).is_file():
            raise FileNotFoundError(
                f"{folder}: no preprocessor_config.json (export it with "
                "tools/convert_checkpoint.py mcore-to-hf)"
            )
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        if getattr(tokenizer, "context_image_token", None) is None:
            raise ValueError(
                f"{folder}: the tokenizer names no context_image_token "
                "(<IMG_CONTEXT>); not an InternVL export"
            )
        image_processor = AutoImageProcessor.from_pretrained(str(folder), backend="pil")
        return cls(tokenizer, image_processor, ExportProcessorConfig(_image_seq_length(folder)))

    def apply_chat_template(self, messages: list, **kwargs):
        """The export's chat template (an image item renders as ``<IMG_CONTEXT>``)."""
        return self.tokenizer.apply_chat_template(messages, **kwargs)

    def decode(self, ids, **kwargs) -> str:
        return self.tokenizer.decode(ids, **kwargs)

    def batch_decode(self, ids, **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(ids, **kwargs)

    def _image_block(self, tiles: int) -> str:
        """What one image placeholder becomes: InternVLProcessor.replace_image_token."""
        return (
            self.start_image_token
            + self.image_token * (self.config.image_seq_length * tiles)
            + self.end_image_token
        )

    def expand(self, texts: Sequence[str], num_patches: Sequence[int]) -> list[str]:
        """Each placeholder, in order over ``texts``, expanded with its image's tile count."""
        count = sum(t.count(self.image_token) for t in texts)
        if count != len(num_patches):
            raise ValueError(
                f"the text has {count} {self.image_token} placeholder(s) for "
                f"{len(num_patches)} image(s); give one image per placeholder"
            )
        tiles = iter(num_patches)
        pattern = re.compile(re.escape(self.image_token))
        return [pattern.sub(lambda _m: self._image_block(next(tiles)), t) for t in texts]

    def __call__(
        self,
        images=None,
        text: Union[str, Sequence[str], None] = None,
        return_tensors: Optional[str] = "pt",
        **kwargs,
    ):
        """``input_ids``, ``attention_mask`` and (with images) ``pixel_values``: a BatchFeature
        as InternVLProcessor returns it. ``images``: PIL images or paths, flat or one list per
        text; extra keyword arguments go to the tokenizer."""
        from transformers import BatchFeature

        if text is None:
            raise ValueError(f"give text (a chat-template rendering with one {self.image_token} per image)")
        texts = [text] if isinstance(text, str) else list(text)
        if self.video_token and any(self.video_token in t for t in texts):
            raise ValueError(f"{self.video_token}: videos are not supported (SAIL-VL trains on images)")
        flat = []
        for item in images or []:
            flat.extend(item if isinstance(item, (list, tuple)) else [item])
        data = {}
        num_patches: list[int] = []
        if flat:
            pixels = self.image_processor(
                [_open_image(i) for i in flat],
                return_tensors="pt",
                crop_to_patches=self.config.crop_to_patches,
            )
            num_patches = [int(n) for n in pixels["num_patches"]]
            data["pixel_values"] = pixels["pixel_values"]
        expanded = self.expand(texts, num_patches)
        kwargs.setdefault("padding", len(expanded) > 1)
        kwargs.setdefault("padding_side", self.config.padding_side)
        data.update(self.tokenizer(expanded, return_tensors=return_tensors, **kwargs))
        return BatchFeature(data=data, tensor_type=return_tensors)
