#!/usr/bin/env python
"""Generation and loading speed against transformers, alternating the two in separate processes.

    python tools/bench_generate.py --work /tmp/bench_gen --points decode_tiny_b1 decode_tiny_b8
    python tools/bench_generate.py --work /tmp/bench_gen --points decode_0.5b_b1 decode_0.5b_b8 \
        --new-tokens 16 --repeats 3
    python tools/bench_generate.py --work /tmp/bench_gen --points load_0.5b_hf load_0.5b_mcore

Builds each model once under ``--work`` (``tiny``: tools/make_tiny_hf_checkpoint.py defaults;
``0.5b``: a Qwen2.5-0.5B-shaped LM (hidden 896, 24 layers, 14/2 heads, MLP 4864, vocab 151,936,
tied) behind a 4-layer InternViT of width 384 at 448 px, random fp32 weights) as a transformers
InternVL folder, plus the prompt (one image + a question, ids and tiles from our PromptBuilder)
both sides then read. Every measurement is a fresh process with the same thread count
(``OMP_NUM_THREADS`` and ``torch.set_num_threads``); the sides alternate (peer first on even
repeats, ours first on odd ones), so a change in the machine's load hits both. Each decode run
forces ``--new-tokens`` tokens (``min_new_tokens``) after one warm-up generation, ``--inner`` times,
and keeps its fastest run (on a shared machine the least disturbed one). Decode time runs from
the first token choice to the last on both sides (transformers: a logits processor; ours: the
engine's choice wrapped), so it covers ``--new-tokens - 1`` decode forwards and nothing of the
prompt's; prefill is a one-token generation, timed on its own (also best of ``--inner``). The
greedy tokens of every row must be identical on both sides, or the run fails.

Load points time ``load_generator`` against ``from_pretrained`` of the same HF folder (``_hf``) or
load our converted Megatron checkpoint of it (``_mcore``, the dist-checkpoint format training
checkpoints use) and record the peak RSS above the process's RSS before loading (imports done).

The last lines are one per point, medians over ``--repeats``:
``point=NAME ours=X peer=Y ratio=R`` (decode/prefill in tokens/s: ratio = ours / peer, higher is
better; load in seconds: ratio = peer / ours, higher is better) and, for loads,
``load=NAME ours_s=.. peer_s=.. ours_peak_gb=.. peer_peak_gb=.. weights_gb=.. ours_peak_over_weights=..``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from megatron_sail import cli

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent


@dataclasses.dataclass
class BenchConfig:
    """What to measure."""

    work: str = "/tmp/bench_generate"
    """Folder for the built checkpoints and prompts (reused when present)."""
    points: tuple[str, ...] = ("decode_tiny_b1", "decode_tiny_b8")
    """decode_{tiny,0.5b}_b{N}, prefill is reported with each decode point; load_{shape}_{hf,mcore}."""
    new_tokens: int = 64
    """Tokens generated per row (forced)."""
    repeats: int = 3
    """Runs per side and point; medians are reported."""
    threads: int = 1
    """Intra-op threads on both sides."""
    inner: int = 5
    """Timed generations per process; each process reports its fastest (least disturbed)."""


# ------------------------------------------------------------------ building (own process)
def vl_05b_config(image_token: int):
    """Our ModelConfig of the 0.5B-LM model: Qwen2.5-0.5B LM, small InternViT at 448 px."""
    from megatron_sail.config.model import LanguageConfig, ModelConfig, VisionConfig

    vision = VisionConfig(
        hidden_size=384, num_layers=4, num_heads=6, ffn_hidden_size=1536, image_size=448, layer_scale_init=0.1
    )
    language = LanguageConfig(
        hidden_size=896,
        num_layers=24,
        num_heads=14,
        num_kv_heads=2,
        ffn_hidden_size=4864,
        vocab_size=151936,
        tie_embeddings=True,
    )
    return ModelConfig(vision=vision, language=language, img_context_token_id=image_token)


def build(shape: str, out: Path) -> None:
    """Write the HF folder, our converted Megatron checkpoint of it and the prompt."""
    import tempfile

    import torch

    from megatron_sail.demo.tiny_checkpoint import TinyCheckpointConfig, make_tiny_checkpoint, write_tokenizer

    hf = out / "hf"
    if shape == "tiny":
        make_tiny_checkpoint(hf, TinyCheckpointConfig(vocab_size=300, tokenizer=True))
    else:
        from transformers import InternVLForConditionalGeneration

        from megatron_sail.convert import hf_internvl, hf_io

        tok_dir = Path(tempfile.mkdtemp(dir=out))
        m = vl_05b_config(write_tokenizer(tok_dir, 300))
        hf_cfg = hf_internvl.to_hf_config(m)
        torch.manual_seed(0)
        model = InternVLForConditionalGeneration(hf_cfg).float()
        state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
        config = hf_cfg.to_dict()
        config["architectures"] = ["InternVLForConditionalGeneration"]
        hf_io.write_checkpoint(hf, config, hf_io.to_disk_keys(state), tokenizer_from=tok_dir)
        del model, state
    subprocess.run(
        [
            sys.executable,
            str(TOOLS / "convert_checkpoint.py"),
            "hf-to-mcore",
            "--hf-dir",
            str(hf),
            "--out",
            str(out / "mcore"),
        ],
        check=True,
    )
    write_prompt(hf, out / "prompt.pt")


def write_prompt(hf: Path, path: Path) -> None:
    """One 448x448 random image + a question, as ids and tiles, for both sides."""
    import numpy as np
    import torch
    from PIL import Image

    from megatron_sail.data.tokenizer import load_tokenizer
    from megatron_sail.inference import GenerationRequest
    from megatron_sail.inference.loading import inspect_checkpoint
    from megatron_sail.inference.prompts import PromptBuilder

    image = path.parent / "bench.png"
    Image.fromarray((np.random.RandomState(0).rand(448, 448, 3) * 255).astype("uint8")).save(image)
    ck = inspect_checkpoint(hf)
    builder = PromptBuilder(load_tokenizer(str(hf)), ck.settings, 12)
    prompt = builder.build(GenerationRequest("Describe this image in detail.", [str(image)]), 1)
    torch.save({"ids": list(prompt.ids), "tiles": prompt.tiles.contiguous()}, path)


# ------------------------------------------------------------------ one measurement (own process)
def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(side: str, kind: str, folder: Path, batch: int, new: int, threads: int, inner: int) -> dict:
    """Load (and for decode: generate) on one side; timings, RSS and the greedy tokens."""
    import torch

    torch.set_num_threads(threads)
    prompt = torch.load(folder / "prompt.pt", weights_only=True)
    import transformers  # noqa: F401  (imports before the RSS baseline on both sides)

    from megatron_sail.inference import GenerationConfig, load_generator  # noqa: F401
    from megatron_sail.inference.loading import LoadConfig

    base, t0 = rss_bytes(), time.perf_counter()
    if side == "peer":
        from transformers import InternVLForConditionalGeneration

        model = InternVLForConditionalGeneration.from_pretrained(
            str(folder / "hf"), dtype=torch.float32
        ).eval()
        if torch.cuda.is_available():  # on a GPU both sides run there, in fp32
            model = model.cuda()
        params = model.parameters()
    else:
        ckpt = folder / ("mcore" if kind == "load_mcore" else "hf")
        model = load_generator(
            str(ckpt), GenerationConfig(max_new_tokens=new, min_new_tokens=new), LoadConfig(dtype="float32")
        )
        params = (p for c in model.chunks for p in c.parameters())
    out = {
        "load_s": time.perf_counter() - t0,
        "peak_over_base": peak_rss_bytes() - base,
        "weights": sum(p.numel() * p.element_size() for p in params),
    }
    if kind.startswith("load"):
        return out
    run = _hf_generate if side == "peer" else _our_generate
    ids, tiles = prompt["ids"], prompt["tiles"]
    run(model, ids, tiles, batch, 2)  # warm-up
    prefill = decode = float("inf")
    for _ in range(inner):  # best of `inner`: the run least disturbed by other jobs
        t0 = time.perf_counter()
        run(model, ids, tiles, batch, 1)
        prefill = min(prefill, time.perf_counter() - t0)
        stamps: list[float] = []
        tokens = run(model, ids, tiles, batch, new, stamps)
        decode = min(decode, stamps[-1] - stamps[0])
    out.update(
        prefill_s=prefill,
        decode_s=decode,
        tokens=tokens,
        prefill_tps=batch * len(ids) / prefill,
        decode_tps=batch * (new - 1) / max(decode, 1e-9),
    )
    return out


def _stamp(stamps: list[float] | None) -> None:
    """Record the time a token is being chosen (after the device finished the forward)."""
    if stamps is not None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())


def _hf_generate(model, ids, tiles, batch, new, stamps=None) -> list:
    """transformers' greedy generate with its KV cache; tokens of every row. ``stamps`` gets the
    time of every token choice (a logits processor: the first right after the prompt's forward),
    so decode time is measured between the first and the last choice on both sides, free of the
    prompt forward's noise (which at the 0.5B shape is 5x the decode window)."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class Stamp(LogitsProcessor):
        def __call__(self, input_ids, scores):
            _stamp(stamps)
            return scores

    x = torch.tensor(ids, device=model.device)[None].repeat(batch, 1)
    pix = tiles.to(model.device).repeat(batch, 1, 1, 1)
    with torch.no_grad():
        seq = model.generate(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            pixel_values=pix,
            do_sample=False,
            max_new_tokens=new,
            min_new_tokens=new,
            pad_token_id=0,
            logits_processor=LogitsProcessorList([Stamp()]),
        )
    return seq[:, x.size(1) :].tolist()


def _our_generate(gen, ids, tiles, batch, new, stamps=None) -> list:
    """Our Generator on the same ids and tiles; tokens of every row; ``stamps`` as for
    ``_hf_generate`` (the engine's token choice wrapped for the run)."""
    from megatron_sail.inference.prompts import Prompt

    gen.cfg = dataclasses.replace(gen.cfg, batch_size=batch, min_new_tokens=new)  # frozen config
    choose = type(gen)._choose

    def stamped(*args):
        _stamp(stamps)
        return choose(gen, *args)

    gen._choose = stamped
    try:
        return [
            r.token_ids for r in gen.generate_prompts([Prompt(list(ids), tiles, new) for _ in range(batch)])
        ]
    finally:
        del gen._choose


# ------------------------------------------------------------------ the driver
def parse_point(point: str) -> tuple[str, str, int]:
    """'decode_tiny_b8' -> ('decode', 'tiny', 8); 'load_0.5b_hf' -> ('load_hf', '0.5b', 1)."""
    parts = point.split("_")
    if len(parts) != 3 or parts[0] not in ("decode", "load") or parts[1] not in ("tiny", "0.5b"):
        raise ValueError(
            f"point {point!r}: expected decode_{{tiny,0.5b}}_bN or load_{{tiny,0.5b}}_{{hf,mcore}}"
        )
    if parts[0] == "decode":
        if not parts[2].startswith("b") or not parts[2][1:].isdigit():
            raise ValueError(f"point {point!r}: batch must be bN")
        return "decode", parts[1], int(parts[2][1:])
    if parts[2] not in ("hf", "mcore"):
        raise ValueError(f"point {point!r}: load from hf or mcore")
    return f"load_{parts[2]}", parts[1], 1


def spawn(args: list[str], threads: int) -> dict:
    """Run this script as a worker in a fresh process with fixed threads; its JSON result."""
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    )
    proc = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"worker {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def measure(cfg: BenchConfig) -> list[str]:
    """Every point, alternating sides; the summary lines."""
    work = Path(cfg.work)
    points = [(p, *parse_point(p)) for p in cfg.points]
    for shape in sorted({s for _, _, s, _ in points}):
        if not (work / shape / "prompt.pt").is_file():
            (work / shape).mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            spawn(["--build", shape, "--work", str(work)], cfg.threads)
            print(f"built {shape} in {time.perf_counter() - t0:.1f}s", flush=True)
    summary = []
    for name, kind, shape, batch in points:
        runs = {"ours": [], "peer": []}
        for r in range(cfg.repeats):
            for side in ("peer", "ours") if r % 2 == 0 else ("ours", "peer"):
                res = spawn(
                    [
                        "--worker",
                        side,
                        "--kind",
                        kind,
                        "--work",
                        str(work),
                        "--shape",
                        shape,
                        "--batch",
                        str(batch),
                        "--new-tokens",
                        str(cfg.new_tokens),
                        "--inner",
                        str(cfg.inner),
                    ],
                    cfg.threads,
                )
                runs[side].append(res)
                print(
                    f"run point={name} repeat={r} side={side} "
                    + " ".join(f"{k}={v:.4g}" for k, v in res.items() if isinstance(v, float)),
                    flush=True,
                )
            if kind == "decode" and runs["ours"][-1]["tokens"] != runs["peer"][-1]["tokens"]:
                raise SystemExit(
                    f"point {name} repeat {r}: greedy tokens differ:\n"
                    f"ours {runs['ours'][-1]['tokens'][0]}\npeer {runs['peer'][-1]['tokens'][0]}"
                )
        summary += summarize(name, kind, runs)
    return summary


def summarize(name: str, kind: str, runs: dict) -> list[str]:
    """Median lines of one point."""

    def med(side, key):
        return statistics.median(r[key] for r in runs[side])

    if kind == "decode":
        lines = []
        for key, label in (("prefill_tps", name.replace("decode", "prefill")), ("decode_tps", name)):
            ours, peer = med("ours", key), med("peer", key)
            lines.append(f"point={label} ours={ours:.2f} peer={peer:.2f} ratio={ours / peer:.2f}")
        return lines
    ours, peer = med("ours", "load_s"), med("peer", "load_s")
    gb = 1024**3
    weights = runs["ours"][0]["weights"]
    return [
        f"load={name} ours_s={ours:.2f} peer_s={peer:.2f} ours_peak_gb={med('ours', 'peak_over_base') / gb:.2f} "
        f"peer_peak_gb={med('peer', 'peak_over_base') / gb:.2f} weights_gb={weights / gb:.2f} "
        f"ours_peak_over_weights={med('ours', 'peak_over_base') / weights:.2f}",
        f"point={name} ours={ours:.2f} peer={peer:.2f} ratio={peer / ours:.2f}",
    ]


def main(argv: list[str] | None = None) -> int:
    """Command line (the driver, or one build / worker process it starts)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--work",
        default=BenchConfig.work,
        metavar="DIR",
        help="folder for the built checkpoints and prompts, reused when present (default: %(default)s)",
    )
    p.add_argument(
        "--points",
        nargs="+",
        default=list(BenchConfig.points),
        metavar="POINT",
        help="decode_{tiny,0.5b}_b{N} (prefill reported with each) or load_{tiny,0.5b}_{hf,mcore} "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--new-tokens",
        type=int,
        default=BenchConfig.new_tokens,
        help="tokens generated per row (default: %(default)s)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=BenchConfig.repeats,
        help="runs per side and point, medians reported (default: %(default)s)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=BenchConfig.threads,
        help="intra-op threads on both sides (default: %(default)s)",
    )
    p.add_argument(
        "--inner",
        type=int,
        default=BenchConfig.inner,
        help="timed generations per process; each reports its fastest (default: %(default)s)",
    )
    # the per-side worker processes this tool starts itself
    p.add_argument(
        "--build", choices=("tiny", "0.5b"), help="internal: build the inputs of this shape and exit"
    )
    p.add_argument(
        "--worker", choices=("ours", "peer"), help="internal: run one side's timing in this process"
    )
    p.add_argument(
        "--kind", default="decode", help="internal: the worker's point kind (default: %(default)s)"
    )
    p.add_argument(
        "--shape", default="tiny", help="internal: the worker's model shape (default: %(default)s)"
    )
    p.add_argument(
        "--batch", type=int, default=1, help="internal: the worker's batch size (default: %(default)s)"
    )
    a = p.parse_args(argv)
    if a.build:
        build(a.build, Path(a.work) / a.build)
        print("RESULT {}")
        return 0
    if a.worker:
        res = worker(a.worker, a.kind, Path(a.work) / a.shape, a.batch, a.new_tokens, a.threads, a.inner)
        print("RESULT " + json.dumps(res), flush=True)
        return 0
    lines = measure(BenchConfig(a.work, tuple(a.points), a.new_tokens, a.repeats, a.threads, a.inner))
    for line in lines:
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    cli.run(main)
