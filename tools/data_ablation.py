#!/usr/bin/env python
"""Compare candidate datasets by training the same model on each for the same token budget
(same seed, same schedule) and evaluating each on the same benchmarks (docs/curation.md).

    python tools/data_ablation.py --candidate raw=data/raw --candidate recap=data/recap \
        --tokens 2000000 --recipe tiny --benchmark caption=bench/demo_caption.tsv \
        [--benchmark pope=bench/demo_pope.tsv] [--init-from BASE] [--out runs/ablation] \
        [-- extra trainer flags]

Prints a ranking table (score, difference to the best, paired-bootstrap confidence interval of
that difference over benchmark items) and writes OUT/ranking.json and OUT/ranking.png.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_sail import cli
from megatron_sail.curate.ablation import AblationConfig, run_ablation  # noqa: E402
from megatron_sail.curate.ablation_stats import BootstrapConfig  # noqa: E402


def _pairs(values: list[str], flag: str) -> dict[str, str]:
    out = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"data_ablation.py: {flag} {v!r}: expected NAME=PATH")
        if name in out:
            raise SystemExit(f"data_ablation.py: {flag} name {name!r} given twice")
        out[name] = path
    return out


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(
        prog="data_ablation.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument(
        "--candidate",
        nargs="+",
        action="extend",
        required=True,
        metavar="NAME=PREFIX",
        help="a candidate dataset: NAME and its preprocessed output prefix; several after "
        "one flag or the flag repeated (required)",
    )
    p.add_argument("--tokens", type=int, required=True, help="token budget per candidate")
    p.add_argument(
        "--recipe", default="tiny", help="model recipe every candidate trains (default: %(default)s)"
    )
    p.add_argument(
        "--benchmark",
        nargs="+",
        action="extend",
        required=True,
        metavar="NAME=PATH",
        help="a benchmark every candidate is scored on (NAME as in tools/evaluate.py); "
        "several after one flag or the flag repeated, as in evaluate.py (required)",
    )
    p.add_argument(
        "--stage",
        default="pretrain-alignment",
        help="training stage of every candidate (default: %(default)s)",
    )
    p.add_argument("--init-from", help="base checkpoint every candidate starts from")
    p.add_argument(
        "--seed",
        type=int,
        default=1234,
        help="training seed, the same for every candidate (default: %(default)s)",
    )
    p.add_argument("--seq-length", type=int, metavar="N", help="packed row length (default: the datasets')")
    p.add_argument("--global-batch-size", type=int, metavar="N", help="rows per step (default: the recipe's)")
    p.add_argument("--limit", type=int, help="first N items of each benchmark")
    p.add_argument(
        "--resamples",
        type=int,
        default=1000,
        help="bootstrap resamples of the benchmark items (default: %(default)s)",
    )
    p.add_argument(
        "--confidence",
        type=float,
        default=0.95,
        help="level of the bootstrap intervals (default: %(default)s)",
    )
    p.add_argument(
        "--bootstrap-seed", type=int, default=0, help="seed of the resampling (default: %(default)s)"
    )
    p.add_argument(
        "--out",
        default="runs/ablation",
        metavar="DIR",
        help="folder for the runs, scores and ranking (default: %(default)s)",
    )
    p.add_argument(
        "--launcher", help="training launcher, e.g. 'torchrun --nproc_per_node 8' (default: python)"
    )
    a = p.parse_args(argv)
    from megatron_sail.eval.registry import get_benchmark

    benchmarks = _pairs(a.benchmark, "--benchmark")
    try:
        for b in benchmarks:
            get_benchmark(b)
        cfg = AblationConfig(
            candidates=_pairs(a.candidate, "--candidate"),
            benchmarks=benchmarks,
            tokens=a.tokens,
            out_dir=a.out,
            recipe=a.recipe,
            stage=a.stage,
            seed=a.seed,
            init_from=a.init_from,
            seq_length=a.seq_length,
            global_batch_size=a.global_batch_size,
            train_args=extra,
            eval_limit=a.limit,
            launcher=(a.launcher or "").split(),
            bootstrap=BootstrapConfig(a.resamples, a.confidence, a.bootstrap_seed),
        )
        result = run_ablation(cfg)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"data_ablation.py: error: {e}", file=sys.stderr)
        return 2
    print(result["table"])
    print(f"ranking: {os.path.join(a.out, 'ranking.json')} and ranking.png")
    return 0


if __name__ == "__main__":
    cli.run(main)
