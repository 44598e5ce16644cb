"""Benchmark scores of the live model during training: every --eval-benchmark-interval steps
and at the end, each --eval-benchmark NAME=PATH is generated on the training chunks themselves
(any TP/PP layout, through inference.generator_from_model), scored, and logged to metrics.jsonl
as ``benchmarks/NAME`` next to ``consumed_tokens`` (what tools/scaling_law.py fits) and to
TensorBoard. Predictions of each evaluation go to ``<run_dir>/benchmarks/iter_N/``.

Every rank runs the hook (generation is collective over TP/PP). Data-parallel replicas split
the requests (eval/replicas.py: each decodes its share, the answers are all-gathered in the
original order), so an evaluation takes about 1/DP of the time and scores what one replica
would; ``benchmarks_decoded/NAME`` in the record lists how many requests each replica decoded.
Under expert parallelism the replicas run MoE layers together and each decodes every request.
"""

from __future__ import annotations

import os
import time

import torch

from megatron_sail.config.eval import BenchmarkEvalConfig
from megatron_sail.eval.registry import get_benchmark, parse_benchmark_arg
from megatron_sail.eval.replicas import share_from_parallel_state
from megatron_sail.eval.runner import RunnerConfig, run_benchmark
from megatron_sail.eval.tsv import read_items


def processor_fields(meta: dict) -> dict:
    """processor.json-style fields from a dataset's meta.json (how the training data was tiled
    and templated), for generator_from_model."""
    t = meta.get("tiling") or {}
    return {
        "tile_size": int(t.get("tile_size", 448)),
        "max_tiles": int(t.get("max_tiles", 12)),
        "min_tiles": int(t.get("min_tiles", 1)),
        "use_thumbnail": bool(t.get("thumbnail", True)),
        "tokens_per_tile": int(t.get("tokens_per_tile", 256)),
        "template": dict(meta.get("template") or {}),
    }


class BenchmarkHook:
    """Runs the configured benchmarks on the training model when due."""

    def __init__(
        self, cfg: BenchmarkEvalConfig, chunks, model_config, dataset_meta: dict, metrics, run_dir: str
    ):
        self.cfg, self.metrics, self.run_dir = cfg, metrics, run_dir
        self.specs = [(get_benchmark(n), p) for n, p in map(parse_benchmark_arg, cfg.benchmarks)]
        for _, path in self.specs:
            read_items(path, limit=1)  # a missing or malformed file fails before training
        if cfg.interval < 0:
            raise ValueError(f"--eval-benchmark-interval {cfg.interval}: must be at least 0")
        if any(i < 1 for i in cfg.at_iterations):
            raise ValueError(f"--eval-benchmark-at {cfg.at_iterations}: steps must be positive")
        if cfg.limit is not None and cfg.limit < 1:
            raise ValueError(f"--eval-benchmark-limit {cfg.limit}: must be positive")
        self.chunks, self.model_config, self.meta = chunks, model_config, dataset_meta
        self._generator = None
        self.last_iteration = None

    def _gen(self):
        """The generator over the live chunks (built once; it holds no copy of the weights)."""
        if self._generator is None:
            from megatron_sail.data.tokenizer import load_tokenizer
            from megatron_sail.inference import GenerationConfig, generator_from_model

            tok_path = (self.meta.get("tokenizer") or {}).get("path")
            if not tok_path:
                raise ValueError("--eval-benchmark: the training data's meta.json names no tokenizer path")
            fields = processor_fields(self.meta)
            gcfg = GenerationConfig(
                max_new_tokens=self.cfg.max_new_tokens or 64,
                max_tiles=fields["max_tiles"],
                batch_size=self.cfg.batch_size,
            )
            self._generator = generator_from_model(
                self.chunks, self.model_config, load_tokenizer(tok_path), fields, gcfg
            )
        return self._generator

    def due(self, iteration: int, final: bool) -> bool:
        """Whether to evaluate after this step."""
        if not self.specs or self.last_iteration == iteration:
            return False
        return (
            final
            or bool(self.cfg.interval and iteration % self.cfg.interval == 0)
            or iteration in self.cfg.at_iterations
        )

    def run(self, state) -> dict[str, float]:
        """Evaluate every benchmark now; log and return {name: score}."""
        rank0 = torch.distributed.get_rank() == 0
        share = share_from_parallel_state()
        out_dir = os.path.join(self.run_dir, "benchmarks", f"iter_{state.iteration:07d}")
        scores, counts, decoded, t0 = {}, {}, {}, time.perf_counter()
        for spec, path in self.specs:
            rc = RunnerConfig(
                limit=self.cfg.limit,
                batch_size=self.cfg.batch_size,
                max_new_tokens=self.cfg.max_new_tokens,
                writer=rank0,
                model_id=f"iter_{state.iteration}",
                replicas=share,
            )
            mine = []  # requests this replica decoded

            def generate(reqs, _mine=mine):
                _mine.append(len(reqs))
                return self._gen().generate(reqs)

            s, _ = run_benchmark(spec, path, generate, rc, out_dir)
            scores[spec.name], counts[spec.name] = s.score, s.n
            if rank0 and s.bad_items:
                first = s.bad_items[0]
                print(
                    f"[eval] {spec.name}: {len(s.bad_items)} bad item(s), scored as VLMEvalKit "
                    f"scores them (first: index {first['index']}: {first['reason']})",
                    flush=True,
                )
            decoded[spec.name] = share.gather(sum(mine)) if share else [sum(mine)]
        self.last_iteration = state.iteration
        self.metrics.log_benchmarks(
            state.iteration, state.consumed_tokens, scores, counts, time.perf_counter() - t0, decoded
        )
        return scores

    def maybe_run(self, state, final: bool = False) -> None:
        """Evaluate when due (the loop calls this after every step and at the end)."""
        if self.due(state.iteration, final):
            self.run(state)
