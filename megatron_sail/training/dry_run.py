"""The launchers' ``DRY_RUN=1``: resolve a stage's flags, then check its data and checkpoints.

``python -m megatron_sail.training.dry_run [--planned DIR ...] -- <trainer flags>`` prints the
resolved config as YAML (``--`` alone before the flags prints it and runs the checks below) and
then checks, without building a model or starting a process group, what would otherwise fail
after the job started:

- every ``--data-path`` / ``--valid-data-path`` prefix is a finished dataset (``P.meta.json``)
  whose row length is ``--seq-length``, whose tokens per tile match the model at its tile size,
  and whose token ids and tile geometry agree with the other prefixes of the run;
- ``--load`` / ``--init-from`` name a checkpoint whose model config (``model_config.yaml`` or the
  run config in ``train_state.pt``) matches the recipe's model, with the vocabulary the trainer
  will use for this data; ``--planned`` names checkpoints an earlier stage of the same launcher
  writes (not there yet, so not checked).

Findings go to stderr, one line each (``[dry-run] ok|note|error: ...``); any error exits 2.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Optional

import yaml

from megatron_sail import cli
from megatron_sail.checkpoint.from_checkpoint import IGNORED_MODEL_FIELDS, resolve
from megatron_sail.checkpoint.layout import read_model_config, resolve_checkpoint
from megatron_sail.config.run import RunConfig, flatten, random_init_problem, to_dict
from megatron_sail.data import geometry
from megatron_sail.data.loading.dataset import parse_data_path

GEOMETRY_KEYS = (
    "img_context_id",
    "img_start_id",
    "img_end_id",
    "im_start_id",
    "im_end_id",
    "pad_id",
    "tokens_per_tile",
    "tile_size",
)


@dataclasses.dataclass
class Report:
    """Findings of one dry run."""

    errors: list[str] = dataclasses.field(default_factory=list)
    """Problems that would stop (or silently spoil) the run."""
    notes: list[str] = dataclasses.field(default_factory=list)
    """What was checked and found fine, or not checkable yet."""


def read_data_meta(prefix: str) -> Optional[dict]:
    """A prefix's meta.json, or None when the dataset is missing or unfinished."""
    path = prefix + ".meta.json"
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def check_data(cfg: RunConfig, report: Report) -> Optional[int]:
    """Check every data prefix against the recipe; returns the largest data vocab (or None)."""
    seen: dict[str, tuple[str, dict]] = {}
    vocab = None
    for flag, value in (("--data-path", cfg.data.data_path), ("--valid-data-path", cfg.data.valid_data_path)):
        if not value:
            if flag == "--data-path":
                report.errors.append("--data-path is not set")
            continue
        try:
            prefixes, _ = parse_data_path(value)
        except ValueError as e:
            report.errors.append(f"{flag}: {e}")
            continue
        for prefix in prefixes:
            meta = read_data_meta(prefix)
            if meta is None:
                report.errors.append(
                    f"{flag} {prefix}: no {prefix}.meta.json (not a finished tools/preprocess_data.py output)"
                )
                continue
            tok = meta.get("tokenizer", {})
            problems = _data_problems(cfg, meta, tok, prefix)
            for p in problems:
                report.errors.append(f"{flag} {prefix}: {p}")
            geometry = {k: tok.get(k) for k in GEOMETRY_KEYS}
            if seen:
                first, ref = next(iter(seen.values()))
                diff = [f"{k} {geometry[k]} vs {ref[k]}" for k in GEOMETRY_KEYS if geometry[k] != ref[k]]
                if diff:
                    report.errors.append(
                        f"{flag} {prefix}: token ids / tiles differ from {first}: " + ", ".join(diff)
                    )
            seen[prefix] = (prefix, geometry)
            vocab = max(vocab or 0, int(tok.get("vocab_size", 0)))
            if not problems:
                trained_at = cfg.model.vision.image_size
                report.notes.append(
                    f"ok: {flag} {prefix}: {meta.get('stats', {}).get('rows', '?')} rows "
                    f"of {meta['seq_length']} tokens, {tok.get('tile_size')} px tiles, "
                    f"{tok.get('tokens_per_tile')} tokens per tile, vocab {tok.get('vocab_size')}"
                    + (
                        ""
                        if tok.get("tile_size") == trained_at
                        else f" (the ViT's image size is {trained_at} px: position "
                        "embeddings are interpolated)"
                    )
                )
    if vocab and trained_vocab(cfg, vocab) != cfg.model.language.vocab_size:
        report.notes.append(
            f"note: the data's {vocab} token ids exceed the recipe's vocabulary "
            f"{cfg.model.language.vocab_size}: the model is built with "
            f"{trained_vocab(cfg, vocab)}"
        )
    return vocab


def _data_problems(cfg: RunConfig, meta: dict, tok: dict, prefix: str) -> list[str]:
    """What in one dataset's meta.json contradicts the recipe (the trainer's own geometry
    check, data/geometry.py, so the dry run and the run refuse the same data)."""
    out = []
    if meta.get("seq_length") != cfg.data.seq_length:
        out.append(f"rows hold {meta.get('seq_length')} tokens but --seq-length is {cfg.data.seq_length}")
    problem = geometry.mismatch(f"{prefix}.meta.json", tok, cfg.model, cfg.recipe)
    return out + ([problem] if problem else [])


def trained_vocab(cfg: RunConfig, data_vocab: Optional[int]) -> int:
    """The LM vocabulary the trainer will build: the recipe's, raised to cover the data's ids
    (rounded up to a multiple of 128 x TP, as train.match_data does)."""
    vocab = cfg.model.language.vocab_size
    if data_vocab and vocab < data_vocab:
        multiple = 128 * cfg.parallel.tp
        vocab = -(-data_vocab // multiple) * multiple
    return vocab


def check_checkpoint(
    cfg: RunConfig,
    flag: str,
    path: Optional[str],
    planned: list[str],
    data_vocab: Optional[int],
    report: Report,
) -> None:
    """A --load / --init-from path: present (or planned), and its model is the recipe's."""
    if not path:
        return
    if os.path.abspath(path) in {os.path.abspath(p) for p in planned}:
        report.notes.append(f"note: {flag} {path}: written by an earlier stage of this launcher")
        return
    if not os.path.exists(path):
        if flag == "--load":
            report.notes.append(f"note: {flag} {path}: no checkpoint yet, the stage starts fresh")
        else:
            report.errors.append(f"{flag} {path}: does not exist")
        return
    try:
        ckpt = resolve_checkpoint(path)
    except (ValueError, FileNotFoundError) as e:
        report.errors.append(f"{flag} {path}: {e}")
        return
    if ckpt is None and flag == "--load":
        report.notes.append(f"note: {flag} {path}: no checkpoint yet, the stage starts fresh")
        return
    if ckpt is None:
        report.errors.append(f"{flag} {path}: no checkpoint there (no `latest`, no metadata.json)")
        return
    try:
        theirs = flatten(dataclasses.asdict(read_model_config(ckpt)))
    except (ValueError, FileNotFoundError, KeyError) as e:
        report.errors.append(f"{flag} {ckpt}: cannot read its model config ({e})")
        return
    ours = flatten(dataclasses.asdict(cfg.model))
    ours["language.vocab_size"] = trained_vocab(cfg, data_vocab)
    diff = [
        f"{k}: checkpoint {theirs.get(k)!r}, recipe {ours.get(k)!r}"
        for k in sorted(set(ours) | set(theirs))
        if k not in IGNORED_MODEL_FIELDS and theirs.get(k) != ours.get(k)
    ]
    if diff:
        report.errors.append(f"{flag} {ckpt}: model differs from recipe {cfg.recipe!r}: " + "; ".join(diff))
    else:
        report.notes.append(f"ok: {flag} {ckpt}: model config matches recipe {cfg.recipe!r}")


def check_post_data(cfg: RunConfig, report: Report) -> None:
    """Stages dpo / grpo read JSONL (grpo also VLMEvalKit TSV) files: each must exist and
    parse (the first record); the records are tokenized when the run starts."""
    if not cfg.data.data_path:
        report.errors.append("--data-path is not set")
    for path in cfg.data.data_path:
        if not os.path.isfile(path):
            report.errors.append(
                f"--data-path {path}: no such file (stage {cfg.stage.name} "
                "reads JSONL" + (" or TSV)" if cfg.stage.name == "grpo" else ")")
            )
            continue
        if path.endswith(".tsv"):
            report.notes.append(f"ok: --data-path {path} (VLMEvalKit TSV)")
            continue
        with open(path, encoding="utf-8") as f:
            first = next((line for line in f if line.strip()), "")
        try:
            json.loads(first)
            report.notes.append(f"ok: --data-path {path} (JSONL)")
        except json.JSONDecodeError as e:
            report.errors.append(f"--data-path {path}: the first record is not JSON ({e})")
    return None


def check(cfg: RunConfig, planned: list[str]) -> Report:
    """All dry-run checks of one resolved stage."""
    report = Report()
    from megatron_sail.config.stage import POST_TRAINING

    vocab = check_post_data(cfg, report) if cfg.stage.name in POST_TRAINING else check_data(cfg, report)
    check_checkpoint(cfg, "--load", cfg.checkpoint.load, planned, vocab, report)
    check_checkpoint(cfg, "--init-from", cfg.checkpoint.init_from, planned, vocab, report)
    load = cfg.checkpoint.load
    resumed = bool(load) and (
        os.path.abspath(load) in {os.path.abspath(p) for p in planned} or os.path.exists(load)
    )
    problem = random_init_problem(cfg, has_checkpoint=resumed)
    if problem:
        report.errors.append(problem)
    return report


def main(argv: Optional[list[str]] = None) -> int:
    """Print the resolved config, then the findings; exit 2 on any error."""
    argv = list(sys.argv[1:] if argv is None else argv)
    own, trainer = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else ([], argv)
    planned = [own[i + 1] for i, a in enumerate(own[:-1]) if a == "--planned"]
    if len(planned) * 2 != len(own):
        print(f"error: dry_run options before '--' are --planned DIR only, got {own}", file=sys.stderr)
        return 2
    try:
        cfg = resolve(trainer)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="", flush=True)
    report = check(cfg, planned)
    stage = f"{cfg.recipe}/{cfg.stage.name}"
    for line in report.notes:
        print(f"[dry-run] {stage} {line}", file=sys.stderr)
    for line in report.errors:
        print(f"[dry-run] {stage} error: {line}", file=sys.stderr)
    return 2 if report.errors else 0


if __name__ == "__main__":
    cli.run(main)
