"""Hostile shards through recaption and filter_data (issue 20 items 8 and 9): sanitized output
member names, duplicate keys and repeated members as rejects, the per-sample byte cap, and
rejects files that are byte-identical across reruns (no memory addresses in details)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from megatron_sail.curate.backends import BackendConfig
from megatron_sail.curate.filters.pipeline import FilterConfig, run_filters
from megatron_sail.curate.reader import safe_key
from megatron_sail.curate.recaption import RecaptionConfig, run
from recaption_fixtures import FakeVLMServer, add_member, read_output

CAPTION = b"a red square beside a small blue circle on a white table"


def png(w: int, h: int = 40) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), (w % 256, 90, 160)).save(buf, format="PNG")
    return buf.getvalue()


def hostile_tar(path: Path) -> None:
    """Path-traversal keys, an absolute key, a key repeated later, a repeated member inside one
    sample, an over-cap sample, a non-image (PIL's error names a BytesIO address)."""
    with tarfile.open(path, "w") as tar:
        for k, key in enumerate(["../../evil", "/abs/olute", "ok", "sub/../../up"]):
            add_member(tar, f"{key}.png", png(40 + k))
            add_member(tar, f"{key}.txt", CAPTION)
        add_member(tar, "twice.png", png(50))
        add_member(tar, "twice.PNG", png(51))  # the same member name (extensions are lower-cased)
        add_member(tar, "twice.txt", CAPTION)
        add_member(tar, "big.png", png(52))
        add_member(tar, "big.txt", CAPTION)
        add_member(tar, "big.json", b"x" * 1500)
        add_member(
            tar, "big.original.txt", b"y" * 1500
        )  # each under the member cap, together over the sample cap
        add_member(tar, "notimg.png", b"this is not an image at all")
        add_member(tar, "notimg.txt", CAPTION)
        add_member(tar, "ok.png", png(53))  # "ok" again: a duplicate key
        add_member(tar, "ok.txt", CAPTION)


def members_of(tar_path: Path) -> list[str]:
    with tarfile.open(tar_path) as tar:
        return tar.getnames()


def test_filter_output_names_are_sanitized_and_duplicates_are_rejects(tmp_path):
    hostile_tar(tmp_path / "in.tar")
    cfg = FilterConfig()
    cfg.language.enabled = False
    cfg.exact_dedup.enabled = cfg.near_dedup.enabled = False  # (the dedup passes: test_curate_dedup.py)
    out = tmp_path / "out"
    run_filters([str(tmp_path / "in.tar")], str(out), cfg, max_bytes=2000, max_sample_bytes=2500)
    names = members_of(out / "in.tar")
    assert names and all("/" not in n and not n.startswith(".") for n in names), names
    kept = sorted({n.split(".", 1)[0] for n in names})
    assert kept == sorted(safe_key(k) for k in ["../../evil", "/abs/olute", "ok", "sub/../../up"])
    with tarfile.open(out / "in.tar") as tar:  # Python's default extractall stays inside the folder
        tar.extractall(tmp_path / "x")
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == sorted(names)
    assert not (tmp_path / "evil.png").exists()
    rejects = [json.loads(ln) for ln in (out / "in.rejects.jsonl").read_text().splitlines()]
    assert {r["key"]: r["reason"] for r in rejects} == {
        "twice": "duplicate_member",
        "big": "sample_too_large",
        "notimg": "undecodable",
        "ok": "duplicate_key",
    }
    assert all("0x" not in r["detail"] for r in rejects)


def test_recaption_rejects_are_byte_identical_across_reruns(tmp_path):
    hostile_tar(tmp_path / "in.tar")
    outs = []
    with FakeVLMServer() as server:
        for run_id in range(2):
            out = tmp_path / f"out{run_id}"
            backend = BackendConfig(
                "openai", "fake-vlm", api_base=server.url, max_new_tokens=16, backoff_s=0.01
            )
            run(
                RecaptionConfig(
                    [str(tmp_path / "in.tar")],
                    str(out),
                    backend,
                    max_image_bytes=2000,
                    max_sample_bytes=2500,
                    progress=False,
                )
            )
            outs.append(out)
    first = (outs[0] / "in.rejects.jsonl").read_bytes()
    assert first == (outs[1] / "in.rejects.jsonl").read_bytes()
    rejects = {json.loads(ln)["key"]: json.loads(ln) for ln in first.decode().splitlines()}
    assert {k: r["reason"] for k, r in rejects.items()} == {
        "twice": "duplicate_member",
        "big": "sample_too_large",
        "notimg": "undecodable_image",
        "ok": "duplicate_key",
    }
    assert "0x" not in first.decode() and "BytesIO" in rejects["notimg"]["detail"]
    names = members_of(outs[0] / "in.tar")
    assert all("/" not in n for n in names)
    assert sorted(read_output(str(outs[0] / "in.tar"))) == sorted(
        safe_key(k) for k in ["../../evil", "/abs/olute", "ok", "sub/../../up"]
    )
