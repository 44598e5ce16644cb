"""Global dedup passes and filter_data as a sharded job (issue 26): near-duplicate groups equal
brute force, keep-lists byte-identical for any partition or worker count, cross-shard duplicates
(the same image in two shards and a re-encoded copy) leave exactly one survivor, a kill -9 of a
filtering run resumes to the output of an uninterrupted run, and the bench prints its line."""

from __future__ import annotations

import filecmp
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from megatron_sail.curate.dedup.grouping import GroupConfig, run_grouping
from megatron_sail.curate.filters.pipeline import FilterConfig, run_filters
from recaption_fixtures import FakeVLMServer, add_member
from testkit import ROOT as REPO
from testkit import subprocess_env

CAPTIONS = [
    "a red square beside a small blue circle on a white table",
    "two green triangles under a yellow sun in the corner",
    "a purple box with an orange lid standing on grass",
    "three black birds flying over a grey stone bridge",
]


def pattern(seed: int, size=(64, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (8, 8, 3)).astype(np.uint8)).resize(size, Image.NEAREST)


def encode(img: Image.Image, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def write_tar(path: Path, samples: list[tuple[str, dict]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                add_member(tar, f"{key}.{ext}", data.encode() if isinstance(data, str) else data)


def lists_of(folder: Path) -> dict[str, bytes]:
    return {
        p.name: p.read_bytes()
        for p in sorted(folder.iterdir())
        if p.name.endswith((".keep.txt", ".dropped.jsonl"))
    }


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """3000 synthetic 64-bit signatures with planted groups, in 7 shards."""
    import bench_dedup as bench

    root = tmp_path_factory.mktemp("sig")
    syn = bench.Synthetic(3000, 30, 1, 4, seed=1)
    names = bench.write_signatures(syn, str(root / "sig"), 450)
    return bench, syn, root, names


def test_near_groups_equal_brute_force_for_any_partition_count(synthetic):
    bench, syn, root, names = synthetic
    outs = []
    for parts in (1, 3, 11):
        out = root / f"keep{parts}"
        report = run_grouping(
            GroupConfig(signatures=str(root / "sig"), output_dir=str(out), max_distance=4, partitions=parts)
        )
        assert report["partitions"] == parts and report["settings"]["bands"] == 5
        outs.append(lists_of(out))
    assert outs[0] == outs[1] == outs[2] and len(outs[0]) == 2 * len(names)
    exact = bench.brute_force_check(syn, str(root / "keep1"), names, 4)
    assert exact["equals_brute_force"] and exact["brute_force_grouped_rows"] > 0
    assert exact["brute_force_recall"] == exact["brute_force_precision"] == 1.0
    recall, precision, drops = bench.score(syn, str(root / "keep1"), names)
    assert recall == 1.0 and precision == 1.0 and drops == report["dropped"] > 0
    # fewer, wider bands than max_distance + 1: an approximate search, recall reported below 1
    approx = run_grouping(
        GroupConfig(signatures=str(root / "sig"), output_dir=str(root / "approx"), max_distance=4, bands=2)
    )
    recall2, precision2, _ = bench.score(syn, str(root / "approx"), names)
    assert approx["settings"]["bands"] == 2 and recall2 < 1.0 and precision2 == 1.0
    against = bench.brute_force_check(syn, str(root / "approx"), names, 4)
    assert not against["equals_brute_force"] and against["brute_force_precision"] == 1.0
    assert 0.0 < against["brute_force_recall"] < 1.0


def test_bench_prints_its_line():
    r = subprocess.run(
        [sys.executable, str(REPO / "tools" / "bench_dedup.py"), "--signatures", "4000", "--partitions", "3"],
        capture_output=True,
        text=True,
        timeout=300,
        env=subprocess_env(),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    last = r.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"rows_per_s=(\d+) peak_rss_mb=(\d+) recall=([0-9.]+)", last)
    assert m and float(m.group(3)) == 1.0, last


def cross_shard_input(root: Path) -> dict:
    """The same image in shards a and c, a resized JPEG re-encode of it in shard b (and a
    byte copy of that in c); the re-encode is larger, so its first copy is the one survivor."""
    img = pattern(7)
    same = encode(img)
    reenc = encode(img.resize((96, 96), Image.BILINEAR), "JPEG", quality=80)
    write_tar(
        root / "a.tar",
        [("x0", {"png": same, "txt": CAPTIONS[0]}), ("x1", {"png": encode(pattern(1)), "txt": CAPTIONS[1]})],
    )
    write_tar(
        root / "b.tar",
        [("y0", {"png": encode(pattern(2)), "txt": CAPTIONS[2]}), ("y1", {"jpg": reenc, "txt": CAPTIONS[3]})],
    )
    write_tar(
        root / "c.tar",
        [
            ("z0", {"png": encode(pattern(3)), "txt": CAPTIONS[0]}),
            ("z1", {"png": same, "txt": CAPTIONS[1]}),
            ("z2", {"jpg": reenc, "txt": CAPTIONS[2]}),
        ],
    )
    # the reason is relative to the survivor: z2 has its bytes, x0 and z1 only its pHash
    return {"x0": "near_duplicate", "z1": "near_duplicate", "z2": "exact_duplicate"}


def kept_keys(out: Path) -> list[str]:
    keys = []
    for p in sorted(out.glob("*.tar")):
        with tarfile.open(p) as tar:
            keys += list(dict.fromkeys(n.split(".", 1)[0] for n in tar.getnames()))
    return keys


def test_cross_shard_duplicates_leave_exactly_one_survivor(tmp_path):
    expect = cross_shard_input(tmp_path / "in")
    cfg = FilterConfig()
    cfg.language.enabled = False
    runs = {}
    for name, job in (("w1", {"workers": 1}), ("w2", {"workers": 2})):
        out = tmp_path / name
        run_filters([str(tmp_path / "in" / "*.tar")], str(out), cfg, **job)
        runs[name] = out
        assert kept_keys(out) == ["x1", "y0", "y1", "z0"]
        rejects = {
            json.loads(ln)["key"]: json.loads(ln)
            for p in sorted(out.glob("*.rejects.jsonl"))
            for ln in p.read_text().splitlines()
        }
        assert {k: r["reason"] for k, r in rejects.items()} == expect
        assert all("duplicate of b/y1" in r["detail"] for r in rejects.values())
    assert lists_of(runs["w1"] / "dedup" / "keep") == lists_of(runs["w2"] / "dedup" / "keep")
    for f in ("a.tar", "b.tar", "c.tar", "a.rejects.jsonl", "b.rejects.jsonl", "c.rejects.jsonl"):
        assert filecmp.cmp(runs["w1"] / f, runs["w2"] / f, shallow=False), f


def judge_answer(prompt: str, w: int, h: int) -> str:
    """A deterministic fake judge: VIR from the width, ITA from the height."""
    if "from 1 to 5" in prompt:
        return f"Score: {w % 5 + 1}"
    return "Yes." if h % 3 else "No, it is not."


def judge_yaml(path: Path, url: str) -> Path:
    path.write_text(f"""filters:
  - image: {{min_side: 16}}
  - caption_length: {{min_words: 3}}
  - exact_dedup: {{}}
  - near_dedup: {{max_distance: 4}}
  - judge: {{backend: openai, model: fake-judge, api_base: "{url}", min_vir: 3}}
""")
    return path


def judge_input(root: Path, shards: int = 4, per: int = 3) -> list[str]:
    keys = []
    for s in range(shards):
        samples = []
        for k in range(per):
            n = s * per + k
            size = (40 + n, 40 + (n * 7) % 11)
            samples.append(
                (
                    f"k{n:03d}",
                    {
                        "png": encode(pattern(100 + n, size)),
                        "txt": CAPTIONS[n % 4],
                        "json": json.dumps({"n": n}),
                    },
                )
            )
            keys.append(f"k{n:03d}")
        write_tar(root / f"{s:03d}.tar", samples)
    return keys


def outputs(out: Path) -> dict[str, bytes]:
    """What must not depend on a kill: shards, rejects, keep-lists (reports hold timings)."""
    files = (
        sorted(out.glob("*.tar"))
        + sorted(out.glob("*.rejects.jsonl"))
        + sorted((out / "dedup" / "keep").glob("*.*"))
    )
    return {str(p.relative_to(out)): p.read_bytes() for p in files if not p.name.endswith("report.json")}


def test_kill_9_mid_filter_run_then_rerun_equals_an_uninterrupted_run(tmp_path):
    keys = judge_input(tmp_path / "in")
    with FakeVLMServer(delay_s=0.05, answer=judge_answer) as server:
        cfg = judge_yaml(tmp_path / "filters.yaml", server.url)
        cmd = lambda out: [  # noqa: E731
            sys.executable,
            str(REPO / "tools" / "filter_data.py"),
            "--input",
            str(tmp_path / "in" / "*.tar"),
            "--output-dir",
            str(out),
            "--config",
            str(cfg),
            "--quiet",
        ]
        env = subprocess_env()
        ref = subprocess.run(cmd(tmp_path / "ref"), capture_output=True, text=True, env=env, timeout=300)
        assert ref.returncode == 0, ref.stderr[-2000:]
        out = tmp_path / "out"
        proc = subprocess.Popen(cmd(out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        deadline = time.time() + 180
        while not (out / "done" / "000.json").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
        done = sorted(p.stem for p in (out / "done").glob("*.json"))
        assert 1 <= len(done) < 4, done
        again = subprocess.run(cmd(out), capture_output=True, text=True, env=env, timeout=300)
        assert again.returncode == 0, again.stderr[-2000:]
    assert outputs(out) == outputs(tmp_path / "ref")
    seen = kept_keys(out) + [
        json.loads(ln)["key"]
        for p in sorted(out.glob("*.rejects.jsonl"))
        for ln in p.read_text().splitlines()
    ]
    assert sorted(seen) == keys and len(seen) == len(set(seen))
    assert not list(out.rglob("*.tmp*"))  # the killed shard's partial files were redone
    report = json.loads((out / "filter_report.json").read_text())
    assert report["samples"] == len(keys) and set(report["removed_by_stage"]) <= {"judge", "dedup", "image"}
    assert report["removed_by_stage"]["judge"]  # some fail VIR >= 3 or ITA
    with tarfile.open(out / "000.tar") as tar:
        for m in tar.getmembers():
            if m.name.endswith(".json"):
                judged = json.loads(tar.extractfile(m).read())
                assert judged["judge"]["vir"] >= 3 and judged["judge"]["ita"] == "yes" and "n" in judged


def test_slurm_array_tasks_together_equal_one_run_and_a_failed_shard_is_reported(tmp_path, capsys):
    cross_shard_input(tmp_path / "in")
    cfg_path = tmp_path / "f.yaml"
    cfg_path.write_text("language: {enabled: false}\n")
    import filter_data as fd

    base = ["--input", str(tmp_path / "in" / "*.tar"), "--config", str(cfg_path), "--quiet"]
    assert fd.main(base + ["--output-dir", str(tmp_path / "ref")]) == 0
    keep = ["--keep-lists", str(tmp_path / "ref" / "dedup" / "keep")]
    for i in (0, 1):  # two array tasks: shards a, c and b
        assert (
            fd.main(
                base
                + keep
                + ["--output-dir", str(tmp_path / "arr"), "--shard-index", str(i), "--num-shards", "2"]
            )
            == 0
        )
    for f in ("a.tar", "b.tar", "c.tar", "a.rejects.jsonl", "b.rejects.jsonl", "c.rejects.jsonl"):
        assert filecmp.cmp(tmp_path / "ref" / f, tmp_path / "arr" / f, shallow=False), f
    report = json.loads((tmp_path / "arr" / "filter_report.json").read_text())
    assert report["samples"] == 7 and report["kept"] == 4  # merged over both tasks' shards
    capsys.readouterr()
    (tmp_path / "bad" / "b.tar").mkdir(parents=True)  # the final name is taken: b's rename fails
    assert fd.main(base + keep + ["--output-dir", str(tmp_path / "bad"), "--shard-retries", "1"]) == 1
    err = capsys.readouterr().err
    assert "shard b (" in err and "failed after 2 attempts" in err
    assert (tmp_path / "bad" / "a.tar").is_file() and (tmp_path / "bad" / "c.tar").is_file()
    assert not list((tmp_path / "bad").rglob("*.tmp*"))


def semantic_signatures(folder: Path, seed: int = 3) -> dict:
    """Three signature shards of 16-d unit embeddings (random pHashes and SHA-256s, so only the
    semantic pass can link rows): 60 rows each; 12 rows get a copy in another shard with a
    slightly moved embedding (cosine > 0.99) and a size of their own. Returns {row key: copy key}."""
    import bench_dedup as bench

    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(180, 16)).astype(np.float32)
    pixels = rng.integers(1_000, 100_000, 180)
    copies = {}
    for k, src in enumerate(range(0, 60, 5)):  # rows 0, 5, ... of shard 0 -> shard 1 or 2
        dst = 60 + 60 * (k % 2) + 7 + k
        emb[dst] = emb[src] + rng.normal(scale=0.02, size=16)
        copies[f"s0/{src}"] = f"s{1 + k % 2}/{dst - 60 * (1 + k % 2)}"
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    (folder / "done").mkdir(parents=True)
    for s in range(3):
        rows = slice(60 * s, 60 * s + 60)
        np.savez(
            folder / f"s{s}{bench.SUFFIX}",
            keys=np.char.encode(np.arange(60).astype(str), "ascii"),
            sha256=rng.integers(0, 256, (60, 32), dtype=np.uint8),
            phash=rng.integers(0, 2**63, (60, 4), dtype=np.uint64),
            phash_ok=np.ones(60, np.uint8),
            pixels=pixels[rows],
            embedding=emb[rows],
        )
        bench.write_atomic(bench.done_marker(str(folder), f"s{s}"), b'{"samples": 60, "signed": 60}')
    return {"copies": copies, "emb": emb, "pixels": pixels}


def test_semantic_groups_are_the_planted_pairs_with_the_survivor_rule_for_any_partitions(tmp_path):
    planted = semantic_signatures(tmp_path / "sig")
    emb = planted["emb"]
    sim = emb @ emb.T
    brute = {(int(i), int(j)) for i, j in zip(*np.nonzero(np.triu(sim >= 0.95, 1)))}
    assert len(brute) == len(planted["copies"])  # the random rows are far apart: only the copies
    outs = []
    for parts in (1, 4):
        out = tmp_path / f"keep{parts}"
        report = run_grouping(
            GroupConfig(
                signatures=str(tmp_path / "sig"),
                output_dir=str(out),
                semantic=True,
                clusters=4,
                threshold=0.95,
                partitions=parts,
            )
        )
        assert report["verified_pairs"]["semantic"] == len(brute)
        outs.append(lists_of(out))
    assert outs[0] == outs[1]
    dropped = {}
    for name in ("s0", "s1", "s2"):
        for line in (tmp_path / "keep1" / f"{name}.dropped.jsonl").read_text().splitlines():
            d = json.loads(line)
            dropped[f"{name}/{d['key']}"] = (d["reason"], d["survivor"])

    def row(key: str) -> int:
        shard, k = key.split("/")
        return 60 * int(shard[1:]) + int(k)

    want = {}
    for a, b in planted["copies"].items():  # the larger image survives, then the first by shard
        pa, pb = planted["pixels"][row(a)], planted["pixels"][row(b)]
        loser, survivor = (b, a) if pa >= pb else (a, b)
        want[loser] = ("semantic_duplicate", survivor)
    assert dropped == want


def test_colour_distance_keeps_recoloured_images_and_still_drops_resized_copies(tmp_path):
    """pHash reads luminance structure only: a recoloured image (luminance a scaled copy of the
    original's) is a pHash duplicate. near_dedup.colour_distance keeps it, while a 2x JPEG
    copy of the original is still dropped; identical results for 1 and 3 partitions."""
    v = np.asarray(pattern(7).convert("L"), dtype=np.float32)
    grey = Image.fromarray(np.stack([v, v, v], -1).astype(np.uint8))
    recoloured = Image.fromarray(np.stack([v, v / 2, np.zeros_like(v)], -1).astype(np.uint8))
    copy = encode(grey.resize((128, 128), Image.BICUBIC), "JPEG", quality=90)
    write_tar(
        tmp_path / "in" / "a.tar",
        [
            ("x0", {"png": encode(grey), "txt": CAPTIONS[0]}),
            ("x1", {"png": encode(recoloured), "txt": CAPTIONS[1]}),
        ],
    )
    write_tar(
        tmp_path / "in" / "b.tar",
        [("y0", {"jpg": copy, "txt": CAPTIONS[2]}), ("y1", {"png": encode(pattern(8)), "txt": CAPTIONS[3]})],
    )
    removed = {}
    for name, colour in (("plain", None), ("colour", 24)):
        cfg = FilterConfig()
        cfg.language.enabled = False
        cfg.near_dedup.colour_distance = colour
        out = tmp_path / name
        run_filters([str(tmp_path / "in" / "*.tar")], str(out), cfg)
        removed[name] = {
            json.loads(ln)["key"]: json.loads(ln)["reason"]
            for p in sorted(out.glob("*.rejects.jsonl"))
            for ln in p.read_text().splitlines()
        }
    assert removed["plain"] == {"x0": "near_duplicate", "x1": "near_duplicate"}
    assert removed["colour"] == {"x0": "near_duplicate"}
    report = json.loads((tmp_path / "colour" / "dedup" / "keep" / "dedup_report.json").read_text())
    assert report["settings"]["colour_distance"] == 24
    sig = tmp_path / "colour" / "dedup" / "keep"
    again = run_grouping(
        GroupConfig(
            signatures=str(tmp_path / "colour" / "dedup" / "signatures"),
            output_dir=str(tmp_path / "p3"),
            colour_distance=24,
            partitions=3,
        )
    )
    assert again["dropped"] == 1 and lists_of(tmp_path / "p3") == lists_of(sig)
    with pytest.raises(ValueError, match="no colour thumbnails"):
        run_grouping(
            GroupConfig(
                signatures=str(tmp_path / "plain" / "dedup" / "signatures"),
                output_dir=str(tmp_path / "p4"),
                colour_distance=24,
            )
        )
    with pytest.raises(ValueError, match=r"colour_distance 300 must be in \[0, 255\]"):
        FilterConfig().near_dedup.__class__(colour_distance=300)


def test_the_demo_pool_near_copies_are_the_only_near_duplicates_under_the_demo_config(tmp_path):
    """examples/sail_caption.sh keeps near-dedup on: of the demo pool (its exact captions, as a
    tar), the dedup passes with the example's filter list drop as near duplicates the originals
    of the planted resized copies (a copy is larger, so it survives) and otherwise only scenes
    with the same caption (the same shapes on another canvas size or background shade), never a
    scene that shares its layout in other colours."""
    from megatron_sail.curate.filters.pipeline import load_config
    from megatron_sail.demo.pool import PoolConfig, make_pool
    from testkit import ROOT

    info = make_pool(str(tmp_path / "demo"), PoolConfig(samples=160, seed=4321))
    rows = [json.loads(ln) for ln in open(info["pool_truth"])]
    data = {r["id"]: (tmp_path / "demo" / r["image"]).read_bytes() for r in rows}
    samples = [(r["id"], {r["image"].rsplit(".", 1)[1]: data[r["id"]], "txt": r["caption"]}) for r in rows]
    write_tar(tmp_path / "in" / "pool.tar", samples)
    copy_of = {r["id"]: r["copy_of"] for r in rows if "copy_of" in r}
    assert info["pool_near_copies"] == len(copy_of) == 8
    run_filters(
        [str(tmp_path / "in" / "pool.tar")],
        str(tmp_path / "out"),
        load_config(str(ROOT / "examples" / "sail_caption_filters.yaml")),
    )
    near = {}
    for ln in (tmp_path / "out" / "pool.rejects.jsonl").read_text().splitlines():
        r = json.loads(ln)
        if r["reason"] == "near_duplicate":
            near[r["key"]] = r["detail"]
    caption = {r["id"]: r["caption"] for r in rows}
    sources = {data[src] for src in copy_of.values()}  # the copied images (some scenes repeat)
    assert {k for k, b in data.items() if k not in copy_of and b in sources} <= set(near)
    for key, detail in near.items():
        survivor = re.search(r"duplicate of pool/(\S+) ", detail).group(1)
        assert caption[survivor] == caption[key], (key, survivor)
    rejected = {r["key"]: r for r in map(json.loads, (tmp_path / "out" / "pool.rejects.jsonl").open())}
    for key in copy_of:  # a copy survives, or is the byte copy of another copy (same scene, size)
        r = rejected.get(key)
        assert r is None or (r["reason"] == "exact_duplicate" and r["detail"].split("pool/")[1] in copy_of)


def test_semantic_signatures_from_a_tiny_clip_group_as_brute_force(tmp_path):
    """The signature pass with semantic_dedup embeds each image with transformers' CLIP (a tiny
    random one): unit vectors in the signature shards; with one cluster the grouping's semantic
    pairs are all pairs at cosine >= threshold, and an image repeated in another shard is one."""
    from megatron_sail.curate.dedup.sigfile import load_signatures
    from recaption_fixtures import tiny_clip

    model = tiny_clip(tmp_path / "clip", CAPTIONS)
    write_tar(
        tmp_path / "in" / "a.tar",
        [(f"x{k}", {"png": encode(pattern(k)), "txt": CAPTIONS[k % 4]}) for k in range(4)],
    )
    write_tar(
        tmp_path / "in" / "b.tar",
        [
            ("y0", {"png": encode(pattern(2)), "txt": CAPTIONS[0]}),
            ("y1", {"png": encode(pattern(9)), "txt": CAPTIONS[1]}),
        ],
    )
    cfg = FilterConfig()
    cfg.language.enabled = cfg.exact_dedup.enabled = cfg.near_dedup.enabled = False
    cfg.semantic_dedup.enabled, cfg.semantic_dedup.model = True, model
    cfg.semantic_dedup.clusters, cfg.semantic_dedup.threshold = 1, 0.999
    out = tmp_path / "out"
    run_filters([str(tmp_path / "in" / "*.tar")], str(out), cfg)
    sig = [load_signatures(str(out / "dedup" / "signatures" / f"{n}.sig.npz"), True) for n in ("a", "b")]
    emb = np.concatenate([s["embedding"] for s in sig]).astype(np.float32)
    keys = [f"{n}/{k.decode()}" for n, s in zip("ab", sig) for k in s["keys"]]
    assert emb.shape == (6, 8) and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-2)
    i, j = np.nonzero(np.triu(emb @ emb.T >= 0.999, 1))
    brute = {(keys[a], keys[b]) for a, b in zip(i, j)}
    assert ("a/x2", "b/y0") in brute
    report = json.loads((out / "dedup" / "keep" / "dedup_report.json").read_text())
    assert report["verified_pairs"]["semantic"] == len(brute)
    rejects = [
        json.loads(ln) for p in sorted(out.glob("*.rejects.jsonl")) for ln in p.read_text().splitlines()
    ]
    assert rejects and all(r["reason"] == "semantic_duplicate" for r in rejects)
