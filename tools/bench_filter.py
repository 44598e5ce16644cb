#!/usr/bin/env python
"""Filter throughput (images/s on one core, and per CPU-second of the process, which stays
meaningful on a shared machine): synthetic WebDataset shards through
tools/filter_data.py's pipeline with the default filters, per-stage seconds included.

    OMP_NUM_THREADS=1 taskset -c 0 python tools/bench_filter.py --images 2000 --size 384x288
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_sail import cli
from megatron_sail.curate.filters.pipeline import FilterConfig, run_filters  # noqa: E402

WORDS = "a red car parked beside an old stone wall under a cloudy sky with trees behind it".split()


def make_shards(folder: str, n: int, size: tuple[int, int], per_shard: int) -> None:
    """JPEG photos-like images (smooth gradients plus noise) with varied captions; 10% exact copies."""
    rng = np.random.default_rng(0)
    w, h = size
    for s in range(0, n, per_shard):
        with tarfile.open(os.path.join(folder, f"{s // per_shard:05d}.tar"), "w") as tar:
            prev = None
            for i in range(s, min(n, s + per_shard)):
                if prev is not None and i % 10 == 0:
                    jpg = prev
                else:
                    base = np.linspace(0, 255, w)[None, :, None] * rng.random(3)[None, None, :]
                    img = np.clip(base + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)
                    buf = io.BytesIO()
                    Image.fromarray(img).save(buf, format="JPEG", quality=85)
                    jpg = prev = buf.getvalue()
                cap = " ".join(rng.choice(WORDS, size=rng.integers(8, 30))).encode()
                for ext, data in (("jpg", jpg), ("txt", cap)):
                    info = tarfile.TarInfo(f"{i:08d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--images",
        type=int,
        default=2000,
        metavar="N",
        help="synthetic images to filter (default: %(default)s)",
    )
    p.add_argument("--size", default="384x288", help="WxH")
    p.add_argument(
        "--per-shard",
        type=int,
        default=500,
        metavar="N",
        help="images per input shard (default: %(default)s)",
    )
    a = p.parse_args()
    w, h = map(int, a.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        os.makedirs(os.path.join(tmp, "in"))
        make_shards(os.path.join(tmp, "in"), a.images, (w, h), a.per_shard)
        from megatron_sail.curate.filters.caption_check import language_identifier

        language_identifier()  # model decoding is a one-off start-up cost, not throughput
        cpu0, t0 = time.process_time(), time.perf_counter()
        # one process (workers=1): the signature pass, the grouping pass and the filter pass
        res = run_filters([os.path.join(tmp, "in", "*.tar")], os.path.join(tmp, "out"), FilterConfig())
        cpu, seconds = time.process_time() - cpu0, time.perf_counter() - t0
    print(
        json.dumps(
            {
                "images": res["samples"],
                "size": a.size,
                "kept": res["kept"],
                "seconds": round(seconds, 2),
                "cpu_seconds": round(cpu, 2),
                "images_per_s": round(res["samples"] / seconds, 1),
                "images_per_cpu_s": round(res["samples"] / cpu, 1),
                "filter_stage_seconds": res["stage_seconds"],
                "removed": res["removed_by_stage"],
            }
        )
    )
    return 0


if __name__ == "__main__":
    cli.run(main)
