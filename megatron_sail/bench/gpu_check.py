"""The Python half of scripts/gpu_check.sh: probe the machine, decide which checks can run, collect
each check's figures, and write the report (the command line is tools/gpu_check.py).

Records accumulate in DIR/checks.jsonl (one line per check, in run order); the report joins them
with the probe. Files are written under a temporary name and renamed. ``need`` and ``record``
do not import torch, so that a skipped check costs a fraction of a second."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable, Optional

FP8_MIN_CAPABILITY = (8, 9)
"""FP8 tensor cores: Ada (8.9) and Hopper (9.0) or newer."""


PACKAGES = (
    "torch",
    "megatron-core",
    "transformer-engine",
    "transformer_engine",
    "nvidia-dali-cuda130",
    "nvidia-dali-cuda120",
    "transformers",
    "tokenizers",
    "safetensors",
    "numpy",
    "pillow",
    "pytest",
)
"""Distributions whose versions the report lists (absent ones are left out)."""


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary name next to ``path``, then rename it into place."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _version(name: str) -> Optional[str]:
    """Installed distribution version, None when absent."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _card(torch) -> dict:
    """The GPU as torch and nvidia-smi see it (empty without CUDA)."""
    if not torch.cuda.is_available():
        return {}
    props = torch.cuda.get_device_properties(0)
    card = {
        "name": props.name,
        "count": torch.cuda.device_count(),
        "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
        "memory_gib": round(props.total_memory / 2**30, 1),
        "multiprocessors": props.multi_processor_count,
    }
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        card["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, IndexError):
        card["driver"] = None
    return card


def _try_import(module: str) -> tuple[bool, str]:
    """(importable, reason when not)."""
    try:
        __import__(module)
        return True, ""
    except Exception as exc:  # TE raises OSError/RuntimeError without CUDA, not only ImportError
        return False, f"{module} does not import ({type(exc).__name__}: {str(exc)[:160]})"


def probe(te_range: Callable[[Optional[str]], tuple[bool, str]]) -> dict:
    """Card, versions and which kinds of check this machine can run (with the reason if not).
    ``te_range(version)`` says whether an installed Transformer Engine version suits
    megatron-core (tools/image_requirements.py, which stays standalone for the image build)."""
    import torch

    cuda = torch.cuda.is_available()
    versions = {name: v for name in PACKAGES if (v := _version(name))}
    versions["python"] = platform.python_version()
    versions["torch_cuda"] = torch.version.cuda
    versions["cudnn"] = torch.backends.cudnn.version() if cuda else None
    versions["nccl"] = ".".join(map(str, torch.cuda.nccl.version())) if cuda else None
    can: dict[str, str] = {}  # ability -> reason it is missing ('' = present)
    can["cuda"] = "" if cuda else "no CUDA device (torch.cuda.is_available() is False)"
    ok, why = _try_import("megatron.core")
    can["megatron"] = "" if ok else f"megatron-core missing: {why} (carry the wheels: --wheels)"
    ok, why = _try_import("transformer_engine.pytorch") if cuda else (False, "needs CUDA")
    can["te"] = "" if ok else f"Transformer Engine unavailable: {why}"
    cap = torch.cuda.get_device_capability(0) if cuda else (0, 0)
    can["fp8"] = can["te"] or (
        ""
        if cap >= FP8_MIN_CAPABILITY
        else f"compute capability {cap[0]}.{cap[1]} has no FP8 tensor cores "
        f"(needs {FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]}+)"
    )
    ok, why = _try_import("nvidia.dali")
    can["dali"] = "" if ok else f"DALI unavailable: {why}"
    ok, why = _try_import("transformers")
    if ok:
        import transformers

        ok = hasattr(transformers, "InternVLForConditionalGeneration")
        why = why or f"transformers {transformers.__version__} has no InternVLForConditionalGeneration"
    can["internvl"] = "" if ok else why
    te_ok, te_note = te_range(_version("transformer-engine") or _version("transformer_engine"))
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host": platform.node(),
        "card": _card(torch),
        "versions": versions,
        "te_range": {"ok": te_ok, "note": te_note},
        "can": can,
    }


def need(probe_data: dict, abilities: list[str]) -> str:
    """Why a check needing ``abilities`` cannot run ('' when it can)."""
    for a in abilities:
        reason = probe_data["can"].get(a)
        if reason is None:
            raise SystemExit(f"unknown ability {a!r}; known: {sorted(probe_data['can'])}")
        if reason:
            return reason
    return ""


_KV = re.compile(r"([A-Za-z_][\w.]*)=(-?[\d.]+(?:e[-+]?\d+)?)(?=\s|$)")


def parse_kv(text: str) -> dict:
    """Numeric ``key=value`` pairs of a log; a line starting with ``[tag]`` prefixes its keys."""
    out = {}
    for line in text.splitlines():
        tag = ""
        m = re.match(r"\s*\[([\w-]+)\]\s*", line)
        if m:
            tag, line = m.group(1) + ".", line[m.end() :]
        for key, value in _KV.findall(line):
            out[tag + key] = float(value)
    return out


def parse_junit(path: Path) -> dict:
    """Counts of a pytest junit XML, with the failed tests and the skip reasons."""
    root = ET.parse(path).getroot()
    cases = list(root.iter("testcase"))
    failed, skipped = [], {}
    for c in cases:
        name = f"{c.get('classname', '')}::{c.get('name', '')}"
        if c.find("failure") is not None or c.find("error") is not None:
            failed.append(name)
        s = c.find("skipped")
        if s is not None:
            skipped[name] = (s.get("message") or "").strip()[:200]
    return {
        "tests": len(cases),
        "passed": len(cases) - len(failed) - len(skipped),
        "failed": len(failed),
        "skipped": len(skipped),
        "failed_tests": failed,
        "skip_reasons": skipped,
    }


def parse_metrics(path: Path) -> dict:
    """The trainer's metrics.jsonl: first/last loss, mean speed after the first step."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    later = rows[1:] or rows
    mean = lambda key: (  # noqa: E731
        sum(r[key] for r in later if r.get(key) is not None)
        / max(1, sum(r.get(key) is not None for r in later))
    )
    return {
        "steps": len(rows),
        "first_loss": rows[0]["lm_loss"],
        "last_loss": rows[-1]["lm_loss"],
        "tokens_per_s": round(mean("tokens_per_s"), 1),
        "tflops_per_gpu": round(mean("tflops_per_gpu"), 2),
        "memory_gib": max((r.get("memory_gib") or 0.0) for r in rows),
        "skipped_steps": rows[-1].get("skipped_steps", 0),
    }


BENCH_KEYS = ("tokens_per_s", "tflops_per_gpu", "mfu", "peak_memory_gib", "step_time_s")


def parse_benchmarks(paths: list[Path]) -> dict:
    """Headline numbers of tools/benchmark.py / hf_reference.py JSON files, keyed by file stem."""
    out = {}
    for p in paths:
        if p.is_file():
            data = json.loads(p.read_text())
            out.update({f"{p.stem}.{k}": data.get(k) for k in BENCH_KEYS})
    hf, ours = out.get("hf.tokens_per_s"), out.get("ours.tokens_per_s")
    if hf and ours:
        out["speedup_vs_hf"] = round(ours / hf, 3)
    return out


def figures(parse: str, log: Optional[Path], files: list[Path]) -> dict:
    """The figures of one check, by parser name (missing outputs give none)."""
    try:
        if parse == "kv" and log and log.is_file():
            return parse_kv(log.read_text(errors="replace"))
        if parse == "junit" and files and files[0].is_file():
            return parse_junit(files[0])
        if parse == "metrics" and files and files[0].is_file():
            return parse_metrics(files[0])
        if parse == "benchmark":
            return parse_benchmarks(files)
    except (ValueError, KeyError, ET.ParseError) as exc:
        return {"parse_error": f"{type(exc).__name__}: {exc}"}
    return {}


@dataclass
class CheckRecord:
    """One check's outcome."""

    name: str
    """Check name (the script's)."""
    status: str
    """passed, failed, timed_out or skipped."""
    reason: str = ""
    """Why it was skipped (or how it failed)."""
    seconds: float = 0.0
    """Wall time it ran."""
    log: str = ""
    """Its log file, relative to the output folder."""
    figures: dict = field(default_factory=dict)
    """Numbers it measured."""


def record(out: Path, rec: CheckRecord) -> None:
    """Append one record to out/checks.jsonl and print its line."""
    with open(out / "checks.jsonl", "a") as f:
        f.write(json.dumps(asdict(rec)) + "\n")
    print(
        f"[gpu_check] {rec.name}: {rec.status.upper()}"
        f"{' - ' + rec.reason if rec.reason else ''}"
        f"{f' ({rec.seconds:.0f} s)' if rec.seconds else ''}",
        flush=True,
    )


def goals(checks: dict) -> list[dict]:
    """Issue 6's GPU goals, judged from the figures when the checks ran."""
    cmp_ = checks.get("compare_hf", {}).get("figures", {})
    fp8 = checks.get("fp8_speed", {}).get("figures", {})
    rows = []
    if cmp_.get("speedup_vs_hf") is not None:
        mem_ok = (cmp_.get("ours.peak_memory_gib") or 0) <= (cmp_.get("hf.peak_memory_gib") or 0)
        rows.append(
            {
                "goal": ">= 1.5x transformers' tokens/s at no more peak memory (2B, bf16)",
                "value": f"{cmp_['speedup_vs_hf']:.2f}x, peak "
                f"{cmp_.get('ours.peak_memory_gib')} vs {cmp_.get('hf.peak_memory_gib')} GiB",
                "met": cmp_["speedup_vs_hf"] >= 1.5 and mem_ok,
            }
        )
    bf16, f8 = cmp_.get("ours.tokens_per_s"), fp8.get("fp8.tokens_per_s")
    if bf16 and f8:
        rows.append(
            {"goal": "FP8 >= 1.2x our bf16 step (TE)", "value": f"{f8 / bf16:.2f}x", "met": f8 / bf16 >= 1.2}
        )
    return rows


def _fmt(value) -> str:
    """A figure for the markdown table."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)[:300]
    return str(value)


def report(out: Path, command: str) -> dict:
    """Join probe.json and checks.jsonl into report.json and report.md; returns the report."""
    pr = json.loads((out / "probe.json").read_text())
    recs = (
        [json.loads(line) for line in (out / "checks.jsonl").read_text().splitlines() if line.strip()]
        if (out / "checks.jsonl").is_file()
        else []
    )
    by_name = {r["name"]: r for r in recs}
    summary = {s: sum(r["status"] == s for r in recs) for s in ("passed", "failed", "timed_out", "skipped")}
    rep = {
        "date": pr["date"],
        "host": pr["host"],
        "command": command,
        "card": pr["card"],
        "versions": pr["versions"],
        "te_range": pr["te_range"],
        "abilities": pr["can"],
        "checks": recs,
        "summary": summary,
        "goals": goals(by_name),
    }
    write_atomic(out / "report.json", json.dumps(rep, indent=2) + "\n")
    write_atomic(out / "report.md", markdown(rep))
    return rep


def markdown(rep: dict) -> str:
    """The report as markdown: card, versions, checks with figures or skip reasons, goals."""
    card = rep["card"]
    card_line = (
        f"{card['name']} x{card['count']}, compute capability {card['capability']}, "
        f"{card['memory_gib']} GiB, driver {card.get('driver')}"
        if card
        else "none (no CUDA device)"
    )
    lines = [
        f"# GPU check, {rep['date']}",
        "",
        f"- machine: {rep['host']}",
        f"- card: {card_line}",
        f"- command: `{rep['command']}`",
        f"- Transformer Engine vs megatron-core: {rep['te_range']['note']}",
        "- summary: " + ", ".join(f"{v} {k}" for k, v in rep["summary"].items()),
        "",
        "## Versions",
        "",
        "| package | version |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in rep["versions"].items()]
    lines += ["", "## Checks", "", "| check | status | seconds | figures / reason |", "|---|---|---|---|"]
    for r in rep["checks"]:
        detail = (
            r["reason"]
            if r["status"] == "skipped"
            else "; ".join(f"{k}={_fmt(v)}" for k, v in r["figures"].items()) or r["reason"]
        )
        lines.append(f"| {r['name']} | {r['status']} | {r['seconds']:.0f} | {detail.replace('|', '/')} |")
    if rep["goals"]:
        lines += ["", "## Issue 6 goals", "", "| goal | measured | met |", "|---|---|---|"]
        lines += [f"| {g['goal']} | {g['value']} | {'yes' if g['met'] else 'no'} |" for g in rep["goals"]]
    return "\n".join(lines) + "\n"


def dali_parity(images: Path) -> dict:
    """Tiles of the first JPEGs in a folder from the GPU DALI backend against PIL's (normalized
    units: one 8-bit level is about 0.017)."""
    from megatron_sail.config.images import ImageConfig, TilingConfig
    from megatron_sail.data.images import build_image_pipeline
    from megatron_sail.data.images.files import load_record

    files = sorted(images.glob("*.jpg"))[:8]
    if not files:
        raise SystemExit(f"{images}: no .jpg files")
    records = [load_record(str(f), TilingConfig(tile_size=448, max_tiles=12)) for f in files]
    ref, _ = build_image_pipeline(ImageConfig(backend="pil")).tiles(records)
    got, ok = build_image_pipeline(ImageConfig(backend="dali", max_batch_images=8)).tiles(records)
    out = {
        "images": len(files),
        "tiles": int(ref.shape[0]),
        "decoded": int(sum(ok)),
        "same_shape": int(tuple(got.shape) == tuple(ref.shape)),
    }
    if out["same_shape"]:
        diff = (got.float().cpu() - ref.float()).abs()
        out.update(max_abs_diff=float(diff.max()), mean_abs_diff=float(diff.mean()))
    return out
