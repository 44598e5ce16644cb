"""examples/sail_caption.sh in smoke mode (a few samples and steps): every stage runs and the
counts agree from stage to stage (pool -> recaption -> filter -> preprocess -> the data_ablation
comparison, a real two-candidate run). The better-than-baseline claim is measured by the full
run (docs/curation.md), not here."""

from __future__ import annotations

import json
import subprocess
import tarfile

import pytest

from testkit import ROOT, subprocess_env


@pytest.mark.timeout(1500)
def test_sail_caption_smoke(tmp_path):
    out = tmp_path / "run"
    env = subprocess_env(SMOKE="1", OUT=str(out))
    r = subprocess.run(
        ["bash", "examples/sail_caption.sh"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "held-out caption word F1 over 6 images" in r.stdout
    assert "}" not in r.stdout.splitlines()  # recaption's JSON goes to a file, not a lone brace
    n = 25  # 24 pool images and 1 resized copy (near-dedup stays on in the demo)
    assert json.load(open(out / "recaption_summary.json"))["samples"] == n

    pool = [json.loads(line) for line in open(out / "demo" / "pool.jsonl")]
    assert len(pool) == n
    manifest = json.load(open(out / "recaptioned" / "done_manifest.json"))
    assert manifest["samples"] == n
    rejected = sum(1 for _ in open(out / "recaptioned" / "pool.rejects.jsonl"))
    assert manifest["captioned"] + rejected == n and manifest["captioned"] > 0

    report = json.load(open(out / "clean" / "filter_report.json"))
    assert report["samples"] == manifest["captioned"]
    assert report["kept"] + sum(report["removed_by_reason"].values()) == report["samples"]
    with tarfile.open(out / "clean" / "pool.tar") as tar:
        kept = {n.split(".", 1)[0] for n in tar.getnames()}
    assert len(kept) == report["kept"] > 0
    assert (out / "clean" / "filter_report.png").exists()

    packed = {k: json.load(open(out / "packed" / f"{k}.json")) for k in ("recaptioned", "original")}
    assert packed["recaptioned"]["samples"] == report["kept"]
    assert packed["original"]["records"] == n
    assert packed["original"]["samples"] == sum(1 for p in pool if p["caption"].strip())

    rank = json.load(open(out / "ablation" / "ranking.json"))
    assert set(rank["scores"]) == {"recaptioned", "original"} and rank["iters"] == 2
    assert (out / "ablation" / "ranking.png").exists()
    for arm in ("recaptioned", "original"):
        assert (out / "ablation" / arm / "eval" / "caption_predictions.tsv").exists()
    summary = json.load(open(out / "summary.json"))
    assert summary["items"] == 6 and summary["filter"]["kept"] == report["kept"]
    assert summary["gain"] == pytest.approx(
        rank["scores"]["recaptioned"]["caption"] - rank["scores"]["original"]["caption"]
    )
