#!/usr/bin/env python
"""Precompute the reference model's answer log-probs of DPO pairs in one pass, so that
``--stage dpo`` holds one model (``--ref-logps FILE``).

    python tools/precompute_ref_logps.py --checkpoint ckpt/sft --data-path pairs.jsonl \
        --seq-length 4096 --out pairs.ref_logps.npz [--image-root DIR] [--micro-batch-size 2]
    torchrun --nproc_per_node 2 tools/precompute_ref_logps.py --tp 2 ...   # a model that needs TP

The pairs are tokenized and packed exactly as the trainer does (the checkpoint's tokenizer and
processor settings, the same --seq-length and file order), and the sidecar stores one row
fingerprint per packed row: the trainer refuses a sidecar made from other data or settings,
naming the row. The file is a plain .npz (no pickles), written under a temporary name.
"""

from __future__ import annotations

import argparse
import time

from megatron_sail import cli


def main(argv: list[str] | None = None) -> int:
    """Parse flags, compute the log-probs on every rank, write the sidecar on rank 0."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="reference checkpoint (any kind generation reads)")
    p.add_argument("--data-path", nargs="+", required=True, help="preference JSONL files")
    p.add_argument("--seq-length", type=int, required=True, help="the trainer's --seq-length")
    p.add_argument("--out", required=True, help="sidecar .npz to write")
    p.add_argument("--image-root", default=None, metavar="DIR", help="base folder of relative image paths")
    p.add_argument(
        "--micro-batch-size", type=int, default=1, help="packed rows per forward pass (default: %(default)s)"
    )
    p.add_argument(
        "--tensor-model-parallel-size",
        "--tp",
        dest="tp",
        type=int,
        default=None,
        metavar="N",
        help="tensor-parallel size (default: 1; torchrun's process count must be tp x pp)",
    )
    p.add_argument(
        "--pipeline-model-parallel-size",
        "--pp",
        dest="pp",
        type=int,
        default=None,
        metavar="N",
        help="pipeline-parallel size (default: 1)",
    )
    a = p.parse_args(argv)
    import torch

    from megatron_sail.config.images import ImageConfig
    from megatron_sail.data.images.pil import PilPipeline
    from megatron_sail.data.preprocess.preference import PairFile, read_pairs
    from megatron_sail.inference import load_generator
    from megatron_sail.inference.loading import LoadConfig
    from megatron_sail.posttrain.pair_rows import build_rows
    from megatron_sail.posttrain.preference import reference_logps
    from megatron_sail.posttrain.ref_sidecar import save_sidecar

    start = time.time()
    gen = load_generator(a.checkpoint, load=LoadConfig(tp=a.tp, pp=a.pp, dtype="float32"))
    data = build_rows(
        read_pairs(PairFile(list(a.data_path), a.image_root)), gen.tokenizer, gen.settings, a.seq_length
    )
    pipe = PilPipeline(ImageConfig(backend="pil", tile_size=gen.settings.tile_size, threads=1))
    logps = reference_logps(gen.chunks, data.rows, pipe, a.seq_length, a.micro_batch_size)
    if torch.distributed.get_rank() == 0:
        save_sidecar(
            a.out,
            data.rows,
            logps,
            {"checkpoint": a.checkpoint, "data_path": list(a.data_path), "seq_length": a.seq_length},
        )
        print(
            f"wrote {a.out}: {sum(data.pairs_per_row)} pairs in {len(data.rows)} rows "
            f"({len(data.rejects)} rejects) in {time.time() - start:.1f}s",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    cli.run(main)
