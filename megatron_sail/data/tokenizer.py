"""Tokenizer front end: one small interface over Hugging Face and sentencepiece tokenizers.

The template builds token ids directly (special tokens are inserted as ids, only plain text is
encoded), so user text can never forge an <|im_start|> or <IMG_CONTEXT>. The special tokens the
SAIL-VL template needs are added when the tokenizer lacks them, and ``added`` lists them so the
caller can report it: the model's vocabulary must cover the new ids.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from typing import Callable, Optional

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
IMG_START = "<img>"
IMG_END = "</img>"
IMG_CONTEXT = "<IMG_CONTEXT>"
PAD = "<|endoftext|>"
SPECIAL_TOKENS = (IM_START, IM_END, IMG_START, IMG_END, IMG_CONTEXT, PAD)
"""Tokens the template needs, in the order they are added when missing."""
_SPECIAL_RE = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")


@dataclass(frozen=True)
class SpecialIds:
    """Ids of the template's special tokens."""

    im_start: int
    """<|im_start|>"""
    im_end: int
    """<|im_end|>"""
    img_start: int
    """<img>"""
    img_end: int
    """</img>"""
    img_context: int
    """<IMG_CONTEXT>: replaced by visual tokens in the model."""
    pad: int
    """Padding id for the unused tail of a row (<|endoftext|>)."""


class Tokenizer:
    """encode/decode plus the special ids; built by ``load_tokenizer``."""

    def __init__(
        self,
        path: str,
        encode_fn: Callable[[str], list[int]],
        decode_fn: Callable[[list[int]], str],
        vocab_size: int,
        special: SpecialIds,
        added: list[str],
        fingerprint: Optional[Callable[[], bytes]] = None,
    ):
        self.path = path
        self._fingerprint = fingerprint
        """Canonical bytes of the tokenizer's model (vocab, merges, rules), for tokenizer_identity."""
        self._encode = encode_fn
        self._decode = decode_fn
        self.vocab_size = vocab_size
        """Ids in use, special tokens included (the model's vocab must be >= this)."""
        self.special = special
        self.added = added
        """Special tokens that were missing from the tokenizer and got new ids."""

    def encode(self, text: str) -> list[int]:
        """Plain-text ids, no BOS/EOS and no special-token parsing.

        Hugging Face tokenizers match added tokens inside any text; a literal special-token
        string in user text is therefore encoded in two pieces ('<' + rest), which keeps it
        plain text instead of becoming e.g. an <IMG_CONTEXT> id.
        """
        if not text:
            return []
        if "<" not in text or not _SPECIAL_RE.search(text):
            return self._encode(text)
        ids: list[int] = []
        for k, part in enumerate(_SPECIAL_RE.split(text)):
            if k % 2:
                ids += self._encode(part[:1]) + self._encode(part[1:])
            elif part:
                ids += self._encode(part)
        return ids

    def decode(self, ids) -> str:
        """Text of ids, special tokens written out."""
        return self._decode([int(i) for i in ids])


def _from_hf(path: str, backend) -> Tokenizer:
    """Wrap a ``tokenizers.Tokenizer``, adding missing special tokens as special added tokens."""
    from tokenizers import AddedToken

    vocab = backend.get_vocab(with_added_tokens=True)
    added = [t for t in SPECIAL_TOKENS if t not in vocab]
    if added:
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in added])
    ids = {t: backend.token_to_id(t) for t in SPECIAL_TOKENS}
    special = SpecialIds(ids[IM_START], ids[IM_END], ids[IMG_START], ids[IMG_END], ids[IMG_CONTEXT], ids[PAD])

    def encode(text: str) -> list[int]:
        return backend.encode(text, add_special_tokens=False).ids

    def decode(ids: list[int]) -> str:
        return backend.decode(ids, skip_special_tokens=False)

    vocab_size = backend.get_vocab_size(with_added_tokens=True)
    return Tokenizer(
        path, encode, decode, vocab_size, special, added, fingerprint=lambda: _canonical_hf(backend)
    )


def _from_sentencepiece(path: str) -> Tokenizer:
    """Wrap a sentencepiece model; missing special tokens get ids after its vocabulary."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=path)
    base = sp.vocab_size()
    ids, added = {}, []
    for tok in SPECIAL_TOKENS:
        pid = sp.piece_to_id(tok)
        if pid == sp.unk_id() and tok != sp.id_to_piece(sp.unk_id()):
            pid = base + len(added)
            added.append(tok)
        ids[tok] = pid
    by_id = {v: k for k, v in ids.items()}

    def encode(text: str) -> list[int]:
        return sp.encode(text)

    def decode(id_list: list[int]) -> str:
        out, run = [], []
        for i in id_list:
            if i in by_id:
                out.append(sp.decode(run))
                out.append(by_id[i])
                run = []
            else:
                run.append(i)
        out.append(sp.decode(run))
        return "".join(out)

    special = SpecialIds(ids[IM_START], ids[IM_END], ids[IMG_START], ids[IMG_END], ids[IMG_CONTEXT], ids[PAD])
    return Tokenizer(
        path, encode, decode, base + len(added), special, added, fingerprint=sp.serialized_model_proto
    )


def load_tokenizer(path: str, log: Optional[Callable[[str], None]] = None) -> Tokenizer:
    """Load tokenizer.json, a HF tokenizer directory, or a sentencepiece .model.

    ``log`` (e.g. print) receives one line naming any special tokens that had to be added.
    """
    from tokenizers import Tokenizer as HFTokenizer

    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer not found: {path}")
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "tokenizer.json")):
            tok = _from_hf(path, HFTokenizer.from_file(os.path.join(path, "tokenizer.json")))
        elif os.path.exists(os.path.join(path, "tokenizer.model")):
            tok = _from_sentencepiece(os.path.join(path, "tokenizer.model"))
        else:
            from transformers import AutoTokenizer

            hf = AutoTokenizer.from_pretrained(path, local_files_only=True)
            if not hasattr(hf, "backend_tokenizer"):
                raise ValueError(f"{path}: only fast (Rust-backed) Hugging Face tokenizers are supported")
            tok = _from_hf(path, hf.backend_tokenizer)
    elif path.endswith(".model"):
        tok = _from_sentencepiece(path)
    else:
        try:
            tok = _from_hf(path, HFTokenizer.from_file(path))
        except Exception as e:  # noqa: BLE001 - re-raised with the file name
            raise ValueError(f"{path}: not a tokenizer.json ({e})") from e
    if tok.added and log is not None:
        log(
            f"tokenizer {path}: added missing special tokens {tok.added} "
            f"(vocab now {tok.vocab_size}; the model's vocabulary must cover it)"
        )
    return tok


def _canonical_hf(backend) -> bytes:
    """A ``tokenizers.Tokenizer``'s full definition (model vocab + merges, normalizer,
    pre-tokenizer, added tokens) as key-sorted JSON, so formatting and key order of the file do
    not matter; padding/truncation settings are left out (they never change token ids here)."""
    spec = json.loads(backend.to_str())
    spec.pop("padding", None)
    spec.pop("truncation", None)
    return json.dumps(spec, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()


def tokenizer_identity(tok: Tokenizer) -> str:
    """``sha256:<16 hex>`` of the tokenizer's definition plus its vocab size and special-token
    ids: equal for the same tokenizer files wherever they are, different when the vocabulary,
    merges, rules or special ids differ. Recorded in meta.json and in checkpoints, so training
    refuses data made with another tokenizer (training/resume_checks.py)."""
    h = hashlib.sha256()
    if tok._fingerprint is not None:
        h.update(tok._fingerprint())
    else:  # built from parts (tests): the decoded pieces stand in for the files
        h.update("\x00".join(tok.decode([i]) for i in range(tok.vocab_size)).encode())
    h.update(
        json.dumps({"vocab_size": tok.vocab_size, "special": asdict(tok.special)}, sort_keys=True).encode()
    )
    return "sha256:" + h.hexdigest()[:16]
