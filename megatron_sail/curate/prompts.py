"""The prompt bank: detailed-caption instructions, one drawn per image with the seed.

Varying the instruction keeps a captioner fine-tuned on the output from overfitting to one
phrasing; the draw hashes (seed, shard, key), so it is the same on every rerun and executor.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from typing import Optional

DEFAULT_PROMPTS = (
    "Describe this image in detail.",
    "Give a detailed description of everything visible in the image.",
    "Write a thorough caption for this picture: the objects, their colours, positions and any text.",
    "Describe the image as completely as you can, including the background and small details.",
    "What does this image show? Answer with a detailed, factual description.",
    "Provide a comprehensive caption of the image, covering every object and how they are arranged.",
    "Describe the scene in this image in detail, mentioning shapes, colours, counts and any written words.",
    "Write a long, precise description of this image for someone who cannot see it.",
)


@dataclass(frozen=True)
class PromptBankConfig:
    """Where the caption instructions come from."""

    prompt_file: Optional[str] = None
    """A text file with one prompt per line (blank lines and '#' lines skipped), or a JSON list;
    None: the built-in detailed-caption bank."""
    seed: int = 1234
    """Seed of the per-image draw."""


class PromptBank:
    """A fixed list of prompts and the seeded, per-image choice among them."""

    def __init__(self, cfg: PromptBankConfig = PromptBankConfig()):
        self.seed = cfg.seed
        self.prompts = load_prompts(cfg.prompt_file) if cfg.prompt_file else list(DEFAULT_PROMPTS)

    def pick(self, shard: str, key: str) -> tuple[int, str]:
        """(index, prompt) for one image: a hash, so no state is shared between workers."""
        i = zlib.crc32(f"{self.seed}:{shard}:{key}".encode("utf-8", "surrogatepass")) % len(self.prompts)
        return i, self.prompts[i]


def load_prompts(path: str) -> list[str]:
    """The prompts of a --prompt-file; an empty or malformed file is an error naming it."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        try:
            prompts = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--prompt-file {path}: invalid JSON list ({e})") from e
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"--prompt-file {path}: every item of the JSON list must be a string")
    else:
        prompts = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    prompts = [p.strip() for p in prompts if p.strip()]
    if not prompts:
        raise ValueError(f"--prompt-file {path}: no prompts in it")
    return prompts
