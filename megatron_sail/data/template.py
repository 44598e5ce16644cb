"""The SAIL-VL (ChatML) chat template: a conversation -> token ids + loss mask.

``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per turn; each ``<image>`` placeholder becomes
``<img>`` + ``<IMG_CONTEXT>`` x n + ``</img>``. Only assistant content and its closing
``<|im_end|>`` are trained. The returned loss mask already follows the row convention of
records.py: ``loss_mask[t] = 1`` iff the token at ``t + 1`` is trained (labels are the next token).
"""

from __future__ import annotations

import numpy as np

from megatron_sail.config.data import TemplateConfig
from megatron_sail.data.tokenizer import Tokenizer

IMAGE_PLACEHOLDER = "<image>"
ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
"""Accepted ``from``/``role`` values and the ChatML role each becomes."""


class SampleError(Exception):
    """A sample that cannot be used; ``reason`` is a short key counted in the reject report."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def _check_unicode(text: str, where: str) -> None:
    """Refuse text a tokenizer cannot take: a lone surrogate (JSON ``"\\ud800"``) or an invalid
    UTF-8 byte kept as one (surrogateescape), as a ``bad_encoding`` reject, not a TypeError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        c = ord(text[e.start])
        what = (
            f"invalid UTF-8 byte 0x{c - 0xDC00:02x}" if 0xDC80 <= c <= 0xDCFF else f"lone surrogate U+{c:04X}"
        )
        raise SampleError("bad_encoding", f"{where}: {what} at character {e.start}") from e


def normalize_turns(turns: list[dict], num_images: int, cfg: TemplateConfig) -> list[tuple[str, str]]:
    """Validate LLaVA turns and return [(chatml_role, text)], placeholders fixed up.

    Why here: every input format ends up as LLaVA-style turns, so the checks (roles, an assistant
    turn, placeholder count) are done once for all of them.
    """
    out: list[tuple[str, str]] = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise SampleError("bad_sample", f"turn {i} is not an object")
        role = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        if role not in ROLES:
            raise SampleError("unknown_role", f"turn {i} has role {role!r}")
        if not isinstance(text, str):
            raise SampleError("bad_sample", f"turn {i} has no text value")
        _check_unicode(text, f"turn {i}")
        if ROLES[role] == "system" and i != 0:
            raise SampleError("unknown_role", f"system turn at position {i}")
        out.append((ROLES[role], text))
    if not any(r == "assistant" for r, _ in out):
        raise SampleError("no_assistant_turn", f"none of the {len(out)} turns is from gpt/assistant")
    placeholders = sum(t.count(IMAGE_PLACEHOLDER) for _, t in out)
    if placeholders == 0 and num_images > 0:
        first_user = next((i for i, (r, _) in enumerate(out) if r == "user"), None)
        if first_user is None:
            raise SampleError("placeholder_mismatch", "images but no user turn to put them in")
        prefix = (IMAGE_PLACEHOLDER + cfg.image_separator) * num_images
        out[first_user] = ("user", prefix + out[first_user][1])
    elif placeholders != num_images:
        raise SampleError("placeholder_mismatch", f"{placeholders} <image> placeholders, {num_images} images")
    if out[0][0] != "system" and cfg.system_prompt:
        out.insert(0, ("system", cfg.system_prompt))
    return out


class ChatTemplate:
    """Renders normalized turns to ids; caches the constant pieces (role headers, separator)."""

    def __init__(self, tokenizer: Tokenizer, cfg: TemplateConfig = TemplateConfig()):
        self.tok = tokenizer
        self.cfg = cfg
        sp = tokenizer.special
        self._header = {
            r: np.asarray([sp.im_start] + tokenizer.encode(r + "\n"), dtype=np.int32)
            for r in ("system", "user", "assistant")
        }
        self._close = np.asarray([sp.im_end] + tokenizer.encode(cfg.turn_separator), dtype=np.int32)

    def _content(self, text: str, image_tokens: list[int], next_image: int) -> tuple[list[np.ndarray], int]:
        """Id segments of one turn's text with its images expanded; returns the next image index.

        Image runs are built as numpy arrays: a 13-tile image is 3,328 ids, and building those
        as Python lists dominated the cost of long samples.
        """
        sp = self.tok.special
        parts = text.split(IMAGE_PLACEHOLDER)
        segs = [np.asarray(self.tok.encode(parts[0]), dtype=np.int32)]
        for part in parts[1:]:
            run = np.full(image_tokens[next_image] + 2, sp.img_context, dtype=np.int32)
            run[0], run[-1] = sp.img_start, sp.img_end
            segs.append(run)
            next_image += 1
            segs.append(np.asarray(self.tok.encode(part), dtype=np.int32))
        return segs, next_image

    def render(self, turns: list[tuple[str, str]], image_tokens: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids (int32) and shifted loss mask (uint8) of one normalized conversation.

        ``image_tokens[k]`` is the <IMG_CONTEXT> count of the k-th image (tiles x tokens per tile).
        """
        ids: list[np.ndarray] = []
        trained: list[np.ndarray] = []
        img = 0
        for role, text in turns:
            body, img = self._content(text, image_tokens, img)
            flag = 1 if role == "assistant" else 0
            header = self._header[role]
            ids.append(header)
            trained.append(np.zeros(len(header), np.uint8))
            for seg in body:
                ids.append(seg)
                trained.append(np.full(len(seg), flag, np.uint8))
            ids.append(self._close)
            close = np.zeros(len(self._close), np.uint8)
            close[0] = flag  # <|im_end|> of an assistant turn is trained; the separator is not
            trained.append(close)
        tokens = np.concatenate(ids)
        flags = np.concatenate(trained)
        mask = np.zeros(len(tokens), dtype=np.uint8)
        mask[:-1] = flags[1:]
        return tokens, mask
