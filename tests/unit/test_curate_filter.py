"""Filters and dedup on constructed shards: exact / near duplicates (resized, recompressed
copies), looping captions, refusals, boilerplate, language, image checks; the band index
against brute force; the CLI's outputs (shards, rejects, report, PNG); determinism."""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from megatron_sail.curate.filters.caption_check import duplicate_ngram_fraction
from megatron_sail.curate.filters.dedup import BandIndex
from megatron_sail.curate.filters.pipeline import FilterConfig, load_config, run_filters
from recaption_fixtures import tiny_clip
from testkit import ROOT, subprocess_env


def pattern(seed: int, size=(64, 64)) -> Image.Image:
    """A random 8x8 block pattern scaled up: distinct seeds give far-apart perceptual hashes."""
    rng = np.random.default_rng(seed)
    arr = (rng.integers(0, 256, (8, 8, 3))).astype(np.uint8)
    return Image.fromarray(arr).resize(size, Image.NEAREST)


def encode(img: Image.Image, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def write_tar(path: str, samples: list[tuple[str, dict]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                data = data.encode() if isinstance(data, str) else data
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


GOOD = [
    "a red square beside a small blue circle on a white table",
    "two green triangles under a yellow sun in the corner",
    "a purple box with an orange lid standing on grass",
    "three black birds flying over a grey stone bridge",
    "a wooden chair next to an open window with curtains",
    "a plate of fruit with apples and pears on a kitchen counter",
]


def build(tmp_path) -> tuple[list[str], dict]:
    """Two shards; ``expect`` maps each key to its reason (None: kept)."""
    png0 = encode(pattern(0))
    near = encode(pattern(1).resize((80, 80), Image.BILINEAR).convert("RGB"), "JPEG", quality=70)
    s1 = [
        ("a000", {"png": png0, "txt": GOOD[0], "json": '{"k": 1}'}),
        ("a001", {"png": encode(pattern(1)), "txt": GOOD[1], "original.txt": "IMG_001"}),
        ("a002", {"jpg": near, "txt": GOOD[2], "original.txt": "IMG_002"}),  # near dup of a001
        ("a003", {"png": encode(pattern(3)), "txt": "a cat a cat a cat a cat a cat a cat a cat a cat"}),
        ("a004", {"png": encode(pattern(4)), "txt": "I'm sorry, but I cannot describe this image."}),
        ("a005", {"png": encode(pattern(5)), "txt": "Stock photo of a beach, royalty-free download"}),
        (
            "a006",
            {"png": encode(pattern(6)), "txt": "ein roter Kreis links im Bild neben einem blauen Quadrat"},
        ),
        ("a007", {"png": encode(pattern(7, (20, 20))), "txt": GOOD[3]}),
        ("a008", {"png": encode(pattern(8, (300, 40))), "txt": GOOD[3]}),
        ("a009", {"png": b"not an image at all", "txt": GOOD[4]}),
        ("a010", {"png": encode(pattern(10)), "txt": "dog"}),
        ("a011", {"png": encode(pattern(11))}),
    ]
    s2 = [
        ("b000", {"png": png0, "caption": GOOD[5]}),  # exact dup of a000
        ("b001", {"png": encode(pattern(20)), "caption": GOOD[5]}),
        ("b002", {"png": encode(pattern(3)), "txt": GOOD[4]}),  # same image as a003, whose caption looped
        ("b003", {"webp": encode(pattern(20).resize((48, 48)), "WEBP", quality=60), "txt": GOOD[0]}),
    ]
    # the survivor of a duplicate group is the largest image, then the first by shard and order:
    # a002 (80x80) beats a001 (64x64); b003 (48x48) loses to b001; a003 is rejected before dedup,
    # so b002 (its exact copy) survives
    expect = {
        "a000": None,
        "a001": "near_duplicate",
        "a002": None,
        "a003": "repetition",
        "a004": "refusal",
        "a005": "boilerplate",
        "a006": "language",
        "a007": "too_small",
        "a008": "aspect_ratio",
        "a009": "undecodable",
        "a010": "too_short",
        "a011": "no_caption",
        "b000": "exact_duplicate",
        "b001": None,
        "b002": None,
        "b003": "near_duplicate",
    }
    paths = [str(tmp_path / "in" / "s1.tar"), str(tmp_path / "in" / "s2.tar")]
    os.makedirs(tmp_path / "in")
    write_tar(paths[0], s1)
    write_tar(paths[1], s2)
    return paths, expect


def read_keys(path: str) -> list[str]:
    with tarfile.open(path) as tar:
        names = tar.getnames()
    return list(dict.fromkeys(n.split(".", 1)[0] for n in names))


def read_rejects(out) -> dict:
    """Every shard's rejects, by key."""
    return {r["key"]: r for p in sorted(out.glob("*.rejects.jsonl")) for r in map(json.loads, open(p))}


def test_every_reason_on_constructed_samples(tmp_path):
    paths, expect = build(tmp_path)
    out = tmp_path / "clean"
    res = run_filters([str(tmp_path / "in" / "*.tar")], str(out), FilterConfig())
    kept = read_keys(str(out / "s1.tar")) + read_keys(str(out / "s2.tar"))
    assert kept == [k for k, r in expect.items() if r is None]
    rejects = read_rejects(out)
    assert {k: r["reason"] for k, r in rejects.items()} == {k: r for k, r in expect.items() if r}
    assert "s1/a002" in rejects["a001"]["detail"] and "s1/a000" in rejects["b000"]["detail"]
    assert "s2/b001" in rejects["b003"]["detail"]
    report = json.load(open(out / "filter_report.json"))
    assert report["samples"] == len(expect) == res["samples"]
    assert report["kept"] + sum(report["removed_by_reason"].values()) == report["samples"]
    assert report["removed_by_stage"]["dedup"] == {"exact_duplicate": 1, "near_duplicate": 2}
    assert sorted(report["thumbnails"]["near_duplicate"]) == ["s1/a001", "s2/b003"]
    assert "data:image/jpeg;base64," in (out / "filter_report.html").read_text()
    assert report["scores"]["caption_words"]["n"] >= 10
    assert (out / "filter_report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # kept members are written unchanged (image bytes, caption, original text, json)
    with tarfile.open(out / "s1.tar") as tar:
        assert tar.extractfile("a002.original.txt").read() == b"IMG_002"
        assert tar.extractfile("a000.json").read() == b'{"k": 1}'
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_deterministic_and_config(tmp_path):
    paths, expect = build(tmp_path)
    runs = []
    for name in ("o1", "o2"):
        run_filters(paths, str(tmp_path / name), FilterConfig())
        runs.append(
            [
                (tmp_path / name / f).read_bytes()
                for f in ("s1.tar", "s2.tar", "s1.rejects.jsonl", "s2.rejects.jsonl")
            ]
        )
    assert runs[0] == runs[1]
    cfg_path = tmp_path / "filters.yaml"
    cfg_path.write_text(
        "near_dedup: {enabled: false}\nlanguage: {languages: [en, de]}\nimage: {min_side: 16}\n"
    )
    run_filters(paths, str(tmp_path / "o3"), load_config(str(cfg_path)))
    reasons = {k: r["reason"] for k, r in read_rejects(tmp_path / "o3").items()}
    assert "a001" not in reasons and "a006" not in reasons and "a007" not in reasons
    assert reasons["b000"] == "exact_duplicate"
    cfg_path.write_text("near_dedup: {max_distnce: 3}\n")
    with pytest.raises(ValueError, match="near_dedup.max_distnce"):
        load_config(str(cfg_path))


def test_band_index_matches_brute_force():
    rng = random.Random(0)
    base = [rng.getrandbits(64) for _ in range(300)]
    hashes = []
    for h in base:  # each base hash plus a few copies with 0..6 flipped bits
        hashes.append(h)
        for _ in range(2):
            c = h
            for b in rng.sample(range(64), rng.randint(0, 6)):
                c ^= 1 << b
            hashes.append(c)
    for t in (0, 3, 5):
        idx, kept_idx, kept_brute = BandIndex(64, t), [], []
        for h in hashes:
            if idx.query(h) is None:
                idx.add(h, "")
                kept_idx.append(h)
            if all((h ^ k).bit_count() > t for k in kept_brute):
                kept_brute.append(h)
        assert kept_idx == kept_brute
        assert len(kept_idx) < len(hashes)


def test_repetition_measure():
    assert duplicate_ngram_fraction("the cat sat on the mat".split(), 3) == 0.0
    loop = ("a dog " * 20).split()
    assert duplicate_ngram_fraction(loop, 3) > 0.9


def test_cli_outputs_and_errors(tmp_path):
    paths, expect = build(tmp_path)
    no_lang = tmp_path / "no_lang.yaml"
    no_lang.write_text("language: {enabled: false}\n")
    cmd = [
        sys.executable,
        str(ROOT / "tools" / "filter_data.py"),
        "--input",
        str(tmp_path / "in" / "*.tar"),
        "--output-dir",
        str(tmp_path / "clean"),
    ]
    r = subprocess.run(
        cmd + ["--config", str(no_lang)], capture_output=True, text=True, cwd=ROOT, env=subprocess_env()
    )
    assert r.returncode == 0, r.stderr
    kept = sum(v is None for v in expect.values()) + 1  # a006 (German) is kept without the language check
    assert f"{len(expect)} samples, kept {kept}" in r.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("dedupe: {}\n")
    r = subprocess.run(
        cmd + ["--config", str(bad)], capture_output=True, text=True, cwd=ROOT, env=subprocess_env()
    )
    assert r.returncode == 2 and "unknown filter section 'dedupe'" in r.stderr


def test_clip_filter_with_tiny_random_model(tmp_path):
    """A tiny random transformers CLIP saved to disk: scores are cosines in [-1, 1], recorded,
    and min_score removes exactly the samples scoring below it."""
    from megatron_sail.curate.filters.clip_score import ClipScoreConfig

    model_dir = tiny_clip(tmp_path / "clip", GOOD)
    paths, expect = build(tmp_path)
    fc = FilterConfig()
    fc.clip = ClipScoreConfig(enabled=True, model=str(model_dir), min_score=-2.0)
    res = run_filters(paths, str(tmp_path / "c1"), fc)
    scores = [
        float(x)
        for p in sorted((tmp_path / "c1" / "reports").glob("*.json"))
        for x in json.load(open(p))["scores"].get("clip_score", [])
    ]
    assert (
        len(scores)
        == res["samples"]
        - sum(n for st, r in res["removed_by_stage"].items() if st != "clip" for n in r.values())
        and all(-1.0 <= s <= 1.0 for s in scores)
        and len(set(scores)) > 1
    )
    threshold = sorted(set(scores))[2]
    fc.clip.min_score = threshold
    res2 = run_filters(paths, str(tmp_path / "c2"), fc)
    below = sum(s < threshold for s in scores)
    assert below >= 2 and res2["removed_by_stage"]["clip"]["clip_score"] == below
