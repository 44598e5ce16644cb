#!/usr/bin/env python
"""Recaption throughput on this machine: the tiny random InternVL on demo images, with the local
executor (1 and 2 worker processes) and Ray (a local instance), through tools/recaption.py.

    python tools/bench_recaption.py --work /tmp/bench_rc --shards 4 --per-shard 32
    # a real captioner on real shards, e.g. vLLM on 8 GPUs through Ray
    python tools/bench_recaption.py --model sail_captioner_hf --backend vllm --input 'sample/*.tar' \
        --batch-size 256 --max-new-tokens 256 --runs ray:8 --gpus-per-worker 1

Prints one JSON line per run: images/s end to end (model loading included) and per worker in
steady state (images / the seconds its shards took, from the done markers).

``--compare`` instead times our megatron backend against the hf backend (transformers'
``generate``) on the same shards and model: one local worker each, the two alternating in
separate processes (``--repeats`` times, hf first on even repeats) with OMP_NUM_THREADS=1, and
ends with ``point=recaption ours=X peer=Y ratio=R`` (median steady images/s) plus how many
captions the two backends wrote identically.

    python tools/bench_recaption.py --work /tmp/bench_rc --compare --shards 1 --per-shard 64 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from megatron_sail import cli

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "unit"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument(
        "--work",
        default="/tmp/bench_recaption",
        metavar="DIR",
        help="scratch folder for shards, model and outputs (default: %(default)s)",
    )
    p.add_argument(
        "--shards", type=int, default=4, metavar="N", help="generated input shards (default: %(default)s)"
    )
    p.add_argument(
        "--per-shard",
        type=int,
        default=32,
        metavar="N",
        help="images per generated shard (default: %(default)s)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=32,
        metavar="N",
        help="longest caption in tokens (default: %(default)s)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=8,
        metavar="N",
        help="images captioned together (default: %(default)s)",
    )
    p.add_argument("--runs", default="local:1,local:2,ray:2", help="executor:workers, comma separated")
    p.add_argument("--model", help="a real captioner instead of the tiny random one (with --input)")
    p.add_argument("--input", help="shards to caption instead of generated demo shards (glob)")
    p.add_argument("--backend", default="megatron", help="backend of --model (megatron, hf, vllm)")
    p.add_argument(
        "--max-tiles", type=int, default=4, metavar="N", help="most tiles per image (default: %(default)s)"
    )
    p.add_argument("--gpus-per-worker", type=float, default=0.0, help="Ray runs: GPUs per captioner actor")
    p.add_argument("--compare", action="store_true", help="megatron vs hf backend, alternating, one worker")
    p.add_argument("--repeats", type=int, default=3, help="--compare: runs per backend")
    args = p.parse_args()
    from recaption_fixtures import tiny_checkpoint, write_shards

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    inputs = args.input
    if inputs is None:
        write_shards(work / "in", args.shards, args.per_shard)
        inputs = str(work / "in" / "*.tar")
    ckpt = args.model or tiny_checkpoint(work / "ckpt")
    if args.compare:
        return compare(args, inputs, ckpt, work)
    for run in args.runs.split(","):
        executor, workers = run.split(":")
        out = work / f"out_{executor}_{workers}"
        cmd = [
            sys.executable,
            str(REPO / "tools" / "recaption.py"),
            "--input",
            inputs,
            "--output-dir",
            str(out),
            "--model",
            ckpt,
            "--backend",
            args.backend,
            "--max-tiles",
            str(args.max_tiles),
            "--max-new-tokens",
            str(args.max_new_tokens),
            "--batch-size",
            str(args.batch_size),
            "--executor",
            executor,
            "--workers",
            workers,
            "--no-progress",
        ]
        if executor == "ray":
            cmd += ["--gpus-per-worker", str(args.gpus_per_worker)]
            cmd += [] if args.gpus_per_worker else ["--ray-num-cpus", workers]
        t0 = time.time()
        res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        wall = time.time() - t0
        if res.returncode != 0:
            print(res.stderr[-3000:], file=sys.stderr)
            return 1
        s = json.loads(res.stdout)
        shard_s = [json.load(open(f))["seconds"] for f in sorted((out / "done").glob("*.json"))]
        print(
            json.dumps(
                {
                    "executor": executor,
                    "workers": int(workers),
                    "images": s["samples"],
                    "wall_s": round(wall, 1),
                    "images_per_s_end_to_end": round(s["samples"] / wall, 2),
                    "images_per_s_per_worker_steady": round(s["samples"] / sum(shard_s), 2),
                    "max_new_tokens": args.max_new_tokens,
                    "batch_size": args.batch_size,
                }
            )
        )
    return 0


def recaption_run(args, inputs: str, ckpt: str, out: Path, backend: str) -> float:
    """One local single-worker recaption run; steady images/s (images / shard seconds)."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        sys.executable,
        str(REPO / "tools" / "recaption.py"),
        "--input",
        inputs,
        "--output-dir",
        str(out),
        "--model",
        ckpt,
        "--backend",
        backend,
        "--max-tiles",
        str(args.max_tiles),
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--batch-size",
        str(args.batch_size),
        "--executor",
        "local",
        "--workers",
        "1",
        "--no-progress",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"recaption --backend {backend} failed:\n{res.stderr[-3000:]}")
    samples = json.loads(res.stdout)["samples"]
    shard_s = [json.load(open(f))["seconds"] for f in sorted((out / "done").glob("*.json"))]
    return samples / sum(shard_s)


def captions(out: Path) -> dict:
    """Every caption text the run wrote, by tar member name."""
    found = {}
    for tar_path in sorted(out.rglob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                if m.isfile() and m.name.endswith((".txt", ".json")):
                    found[f"{tar_path.name}/{m.name}"] = tar.extractfile(m).read()
    return found


def compare(args, inputs: str, ckpt: str, work: Path) -> int:
    """megatron vs hf backend, alternating in separate processes; the point= line."""
    rates = {"megatron": [], "hf": []}
    for r in range(args.repeats):
        for backend in ("hf", "megatron") if r % 2 == 0 else ("megatron", "hf"):
            rate = recaption_run(args, inputs, ckpt, work / f"cmp_{backend}", backend)
            rates[backend].append(rate)
            print(f"run repeat={r} backend={backend} images_per_s_steady={rate:.2f}", flush=True)
    ours, peer = captions(work / "cmp_megatron"), captions(work / "cmp_hf")
    same = sum(1 for k, v in ours.items() if peer.get(k) == v)
    print(f"captions: {same} of {len(ours)} files identical between the backends")
    o, h = statistics.median(rates["megatron"]), statistics.median(rates["hf"])
    print(f"point=recaption ours={o:.2f} peer={h:.2f} ratio={o / h:.2f}")
    return 0


if __name__ == "__main__":
    cli.run(main)
