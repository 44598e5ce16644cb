#!/usr/bin/env python
"""Print the statistics of a preprocessed prefix as one JSON object; --show K renders sample K.

  python tools/inspect_dataset.py data/demo_train
  python tools/inspect_dataset.py data/demo_train --show 3
  python tools/inspect_dataset.py data/demo_train --verify     # every file against its checksum
Counts are recomputed from the files (not copied from meta.json), so a damaged or mismatched
prefix shows up as an error or as a difference from the numbers preprocess_data printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_sail import cli
from megatron_sail.data.indexed import PackedReader, load_meta  # noqa: E402
from megatron_sail.data.integrity import ALGORITHM, check_files  # noqa: E402
from megatron_sail.data.loading.dataset import TokenizerMeta  # noqa: E402


def stats(reader: PackedReader, chunk: int = 65536) -> dict:
    """Counts over the whole prefix, reading the token and mask streams in chunks of samples."""
    meta = reader.meta
    tm = TokenizerMeta.from_meta(meta)
    rows, seq, n = len(reader), int(meta["seq_length"]), len(reader.tokens)
    total = image_tokens = loss_tokens = 0
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        toks = np.concatenate(reader.tokens[a:b])
        image_tokens += int(np.count_nonzero(toks == tm.img_context_id))
        total += toks.size
        loss_tokens += int(sum(int(m.sum()) for m in reader.loss_mask[a:b]))
    im = reader.image_meta
    grid_tiles = im[:, 0] * im[:, 1]
    tiles = int((grid_tiles + ((im[:, 2] == 1) & (grid_tiles > 1))).sum())
    return {
        "prefix": reader.prefix,
        "seq_length": seq,
        "samples": n,
        "rows": rows,
        "images": int(len(im)),
        "tiles": tiles,
        "text_tokens": total - image_tokens,
        "image_tokens": image_tokens,
        "loss_tokens": loss_tokens,
        "fill_ratio": round(total / (rows * seq), 6) if rows else 0.0,
        "rejects": meta.get("rejects", {}),
        "records": meta["stats"].get("records"),
        "tokenizer": meta["tokenizer"],
    }


def collapse(text: str, context: str = "<IMG_CONTEXT>") -> str:
    """'<IMG_CONTEXT>' x n written as '<IMG_CONTEXT>x{n}'."""
    out, i = [], 0
    while True:
        j = text.find(context, i)
        if j < 0:
            return "".join(out) + text[i:]
        n = 0
        while text.startswith(context, j + n * len(context)):
            n += 1
        out.append(text[i:j] + f"{context}x{n}")
        i = j + n * len(context)


def show(reader: PackedReader, k: int, tokenizer_path: str) -> dict:
    """Sample k rendered back to text, plus the text of its trained (loss) tokens."""
    from megatron_sail.data.tokenizer import load_tokenizer

    n = len(reader.tokens)
    if not 0 <= k < n:
        raise SystemExit(f"error: sample {k} out of range [0, {n})")
    tok = load_tokenizer(tokenizer_path)
    ids, mask = reader.tokens[k], reader.loss_mask[k]
    trained = ids[1:][mask[:-1] == 1]
    row = int(np.searchsorted(reader.row_index, k, side="right") - 1)
    imgs = reader.image_meta[reader.image_meta[:, 5] == k]
    return {
        "sample": k,
        "row": row,
        "tokens": int(len(ids)),
        "loss_tokens": int(mask.sum()),
        "images": [
            {"grid": [int(r[0]), int(r[1])], "thumbnail": bool(r[2]), "size": [int(r[3]), int(r[4])]}
            for r in imgs
        ],
        "text": collapse(tok.decode(ids)),
        "trained": tok.decode(trained),
    }


def verify(prefix: str) -> tuple[int, dict]:
    """Every file against its recorded checksum (naming each damaged one), then the structure."""
    meta = load_meta(prefix)
    if meta is None:
        raise FileNotFoundError(f"{prefix}: no complete dataset (missing {prefix}.meta.json)")
    problems = check_files(prefix, meta, "full")
    for line in problems:
        print(f"error: {line}", file=sys.stderr)
    files = sorted(meta.get("checksums", {}).get("files", {}))
    out = {
        "prefix": prefix,
        "ok": not problems,
        "algorithm": ALGORITHM if files else None,
        "files": files,
        "damaged": [line.split(": ", 1)[0] for line in problems],
    }
    if not files:
        out["note"] = (
            "no checksums recorded (dataset written before checksums); only the structure was checked"
        )
    if problems:
        return 1, out
    PackedReader(prefix, verify="structure")  # raises, naming the file, on a structural problem
    return 0, out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prefix", help="dataset prefix written by tools/preprocess_data.py (PREFIX.meta.json ...)")
    p.add_argument("--show", type=int, default=None, metavar="K", help="render sample K")
    p.add_argument("--tokenizer", default=None, help="override the tokenizer path stored in meta.json")
    p.add_argument("--verify", action="store_true", help="check every file against its recorded checksum")
    a = p.parse_args(argv)
    try:
        if a.verify:
            code, out = verify(a.prefix)
            print(json.dumps(out))
            return code
        reader = PackedReader(a.prefix)
        if a.show is not None:  # the stored tokenizer path may be relative to another directory
            out = show(reader, a.show, a.tokenizer or reader.meta["tokenizer"]["path"])
        else:
            out = stats(reader)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}" + (" (pass --tokenizer)" if "tokenizer" in str(e) else ""), file=sys.stderr)
        return 1
    print(json.dumps(out, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    cli.run(main)
