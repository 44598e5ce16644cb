"""Recaption pipeline (megatron_sail/curate/, tools/recaption.py): prompts, rejects, provenance,
resume after kill -9, SLURM-array sharding, the OpenAI backend's retries / rate limit, and the
megatron and hf backends on a tiny random InternVL (docs/curation.md, "Recaption")."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

import recaption as cli
from megatron_sail.curate.backends import BackendConfig, CaptionRequest
from megatron_sail.curate.prompts import DEFAULT_PROMPTS, PromptBank, PromptBankConfig
from megatron_sail.curate.recaption import RecaptionConfig, my_shards, run
from recaption_fixtures import FakeVLMServer, add_member, read_output, tiny_checkpoint, write_shards
from testkit import ROOT, subprocess_env


def png(w: int, h: int = 40, colour=(200, 30, 30)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, format="PNG")
    return buf.getvalue()


def openai_cfg(server, **kw) -> BackendConfig:
    return BackendConfig("openai", "fake-vlm", api_base=server.url, max_new_tokens=32, backoff_s=0.01, **kw)


def all_keys(out: Path) -> list[str]:
    """Every key in the output shards and the rejects files (duplicates kept)."""
    keys = []
    for tar in sorted(out.glob("*.tar")):
        keys += list(read_output(str(tar)))
    for rej in sorted(out.glob("*.rejects.jsonl")):
        keys += [json.loads(ln)["key"] for ln in rej.read_text().splitlines()]
    return keys


# ------------------------------------------------------------------ prompts and sharding
def test_prompt_bank_is_seeded_per_image(tmp_path):
    bank = PromptBank(PromptBankConfig(seed=7))
    picks = [bank.pick("00000", f"{k:09d}") for k in range(64)]
    assert picks == [PromptBank(PromptBankConfig(seed=7)).pick("00000", f"{k:09d}") for k in range(64)]
    assert len({i for i, _ in picks}) >= 5, "the draw should spread over the bank"
    assert all(DEFAULT_PROMPTS[i] == p for i, p in picks)
    other = [PromptBank(PromptBankConfig(seed=8)).pick("00000", f"{k:09d}")[0] for k in range(64)]
    assert other != [i for i, _ in picks]
    f = tmp_path / "p.txt"
    f.write_text("# comment\nDescribe A.\n\n  Describe B.  \n")
    assert PromptBank(PromptBankConfig(str(f))).prompts == ["Describe A.", "Describe B."]
    f.write_text('["only one"]')
    assert PromptBank(PromptBankConfig(str(f))).prompts == ["only one"]
    f.write_text("# nothing\n")
    with pytest.raises(ValueError, match="no prompts"):
        PromptBank(PromptBankConfig(str(f)))


def test_shard_index_partitions_and_jsonl_ranges(tmp_path):
    write_shards(tmp_path / "in", 5, 1)
    jl = tmp_path / "pool.jsonl"
    jl.write_text("".join(json.dumps({"image": "a.png", "caption": str(i)}) + "\n" for i in range(7)))
    inputs = [str(tmp_path / "in" / "*.tar"), str(jl)]
    parts = [
        my_shards(
            RecaptionConfig(inputs, str(tmp_path / "o"), samples_per_shard=3, shard_index=i, num_shards=3)
        )
        for i in range(3)
    ]
    names = [s.name for p in parts for s in p]
    assert sorted(names) == sorted(
        ["00000", "00001", "00002", "00003", "00004", "pool-00000", "pool-00001", "pool-00002"]
    )
    assert len(names) == len(set(names))
    ranges = sorted((s.start, s.stop) for p in parts for s in p if s.kind == "jsonl")
    assert ranges == [(0, 3), (3, 6), (6, 7)]
    with pytest.raises(ValueError, match="shard-index"):
        RecaptionConfig(inputs, "o", shard_index=3, num_shards=3)


def test_cli_errors_and_slurm_array_defaults(tmp_path, monkeypatch, capsys):
    write_shards(tmp_path / "in", 1, 1)
    base = [
        "--input",
        str(tmp_path / "in" / "*.tar"),
        "--output-dir",
        str(tmp_path / "o"),
        "--model",
        "m",
        "--no-progress",
    ]
    if importlib.util.find_spec("vllm") is None:  # an optional backend that is missing: one clear error
        assert cli.main(base + ["--backend", "vllm"]) == 2
        assert "needs the optional package vllm" in capsys.readouterr().err
    assert cli.main(base + ["--input", str(tmp_path / "none*.tar")]) == 2
    assert "matches no files" in capsys.readouterr().err
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "5")
    cfg = cli.config_from(cli.parse_args(base))
    assert (cfg.shard_index, cfg.num_shards) == (3, 5)
    cfg = cli.config_from(cli.parse_args(base + ["--shard-index", "1", "--num-shards", "2"]))
    assert (cfg.shard_index, cfg.num_shards) == (1, 2)


# ------------------------------------------------------------------ the openai backend
def test_openai_backend_retries_with_backoff_and_sends_the_key(monkeypatch):
    from megatron_sail.curate.backends.openai import OpenAIBackend

    monkeypatch.setenv("MY_VLM_KEY", "sk-test-123")
    with FakeVLMServer(fail_first=3) as server:
        backend = OpenAIBackend(openai_cfg(server, max_retries=4, batch_size=1, api_key_env="MY_VLM_KEY"))
        t0 = time.monotonic()
        [res] = backend.caption([CaptionRequest(png(33), "Describe it.")])
        elapsed = time.monotonic() - t0
        backend.close()
        assert (
            res.error is None
            and res.text == "a 33x40 image; asked: Describe it."
            and res.finish_reason == "stop"
        )
        assert server.calls == 4 and backend.retries == 3
        assert elapsed >= 0.01 + 0.02 + 0.04  # exponential backoff: 1x, 2x, 4x the first delay
        assert set(server.auth) == {"Bearer sk-test-123"}
    with FakeVLMServer(fail_first=100) as server:  # never recovers: bounded, then an error result
        backend = OpenAIBackend(openai_cfg(server, max_retries=2, batch_size=2))
        out = backend.caption([CaptionRequest(png(10), "x"), CaptionRequest(png(11), "y")])
        backend.close()
        assert server.calls == 6
        assert all("HTTP 503" in r.error and "after 2 retries" in r.error for r in out)
        assert set(server.auth) == {None}  # MY_VLM_KEY unset here: no key sent


def test_openai_rate_limit_spaces_requests():
    from megatron_sail.curate.backends.openai import OpenAIBackend

    with FakeVLMServer() as server:
        backend = OpenAIBackend(openai_cfg(server, batch_size=4, requests_per_second=20))
        t0 = time.monotonic()
        out = backend.caption([CaptionRequest(png(20 + k), "p") for k in range(7)])
        elapsed = time.monotonic() - t0
        backend.close()
    assert [r.text.split(";")[0] for r in out] == [f"a {20 + k}x40 image" for k in range(7)]
    assert elapsed >= 6 / 20 - 0.01, elapsed  # 7 starts at least 50 ms apart


# ------------------------------------------------------------------ rejects and output
def _reject_inputs(root: Path) -> tuple[list[str], dict]:
    """One tar with a sample for every reject reason, a JSONL file and an image folder."""
    root.mkdir()
    expect = {}
    with tarfile.open(root / "mixed.tar", "w") as tar:
        for key, data, reason in [
            ("ok1", png(30), None),
            ("badimg", b"\x89PNG not really", "undecodable_image"),
            ("empty", png(41), "empty_caption"),
            ("trunc", png(42), "truncated_caption"),
            ("generr", png(43), "generation_error"),
            ("ok2", png(31), None),
        ]:
            add_member(tar, f"{key}.png", data)
            add_member(tar, f"{key}.txt", f"alt {key}".encode())
            expect[key] = reason
        add_member(tar, "noimg.txt", b"text only")
        expect["noimg"] = "missing_image"
        add_member(tar, "ok1.jpg", png(30))  # the key again, later in the shard
    (root / "imgs").mkdir()
    (root / "imgs" / "a.png").write_bytes(png(50))
    lines = [
        {"image": "a.png", "caption": "orig a"},
        {"image": "gone.png", "caption": "x"},
        {"image": "../mixed.tar", "caption": "y"},
        {
            "image": "a.png",
            "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "llava a"}],
        },
    ]
    (root / "pool.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (root / "folder").mkdir()
    (root / "folder" / "f1.png").write_bytes(png(60))
    (root / "folder" / "f1.txt").write_text("folder caption")
    (root / "folder" / "f2.png").write_bytes(b"GIF89a broken")
    return [str(root / "mixed.tar"), str(root / "pool.jsonl"), str(root / "folder")], expect


def test_every_reject_reason_and_the_output_shard(tmp_path):
    inputs, expect = _reject_inputs(tmp_path / "in")
    out = tmp_path / "out"
    with FakeVLMServer(empty_widths=[41], length_widths=[42], error_widths=[43]) as server:
        summary = run(
            RecaptionConfig(
                inputs,
                str(out),
                openai_cfg(server, max_retries=0, batch_size=3),
                image_root=str(tmp_path / "in" / "imgs"),
                seed=5,
                progress=False,
            )
        )
    rejects = {
        json.loads(ln)["key"]: json.loads(ln) for ln in (out / "mixed.rejects.jsonl").read_text().splitlines()
    }
    assert {k: r["reason"] for k, r in rejects.items() if k != "ok1"} == {
        k: v for k, v in expect.items() if v
    }
    assert rejects["ok1"]["reason"] == "duplicate_key"
    assert "HTTP 500" in rejects["generr"]["detail"]
    assert rejects["trunc"]["provenance"]["finish_reason"] == "length"
    pool = [json.loads(ln) for ln in (out / "pool.rejects.jsonl").read_text().splitlines()]
    assert [r["reason"] for r in pool] == ["missing_image", "path_outside_root"]
    folder = [json.loads(ln) for ln in (out / "folder.rejects.jsonl").read_text().splitlines()]
    assert [(r["key"], r["reason"]) for r in folder] == [("000000001", "undecodable_image")]
    assert summary["rejects_by_reason"] == {
        "duplicate_key": 1,
        "empty_caption": 1,
        "generation_error": 1,
        "missing_image": 2,
        "path_outside_root": 1,
        "truncated_caption": 1,
        "undecodable_image": 2,
    }
    assert summary["captioned"] == 2 + 2 + 1 and summary["samples"] == 8 + 4 + 2

    bank = PromptBank(PromptBankConfig(seed=5))
    shard = read_output(str(out / "mixed.tar"))
    assert sorted(shard) == ["ok1", "ok2"]
    src = {m.name: m for m in tarfile.open(tmp_path / "in" / "mixed.tar").getmembers()}
    for key, w in (("ok1", 30), ("ok2", 31)):
        s = shard[key]
        assert s["png"] == tarfile.open(tmp_path / "in" / "mixed.tar").extractfile(src[f"{key}.png"]).read()
        meta = json.loads(s["json"])
        prompt = bank.pick("mixed", key)[1]
        assert s["txt"].decode() == meta["caption"] == f"a {w}x40 image; asked: {prompt}"
        assert s["original.txt"].decode() == meta["original_text"] == f"alt {key}"
        assert {
            k: meta["provenance"][k] for k in ("prompt", "model", "backend", "seed", "finish_reason")
        } == {"prompt": prompt, "model": "fake-vlm", "backend": "openai", "seed": 5, "finish_reason": "stop"}
    pool_out = read_output(str(out / "pool.tar"))
    assert [json.loads(v["json"])["original_text"] for v in pool_out.values()] == ["orig a", "llava a"]
    f1 = read_output(str(out / "folder.tar"))["000000000"]
    assert f1["original.txt"] == b"folder caption" and f1["png"] == png(60)
    manifest = json.loads((out / "done_manifest.json").read_text())
    assert sorted(manifest["shards"]) == ["folder", "mixed", "pool"] and manifest["samples"] == 14
    assert not list(out.glob("*.tmp"))


# ------------------------------------------------------------------ crash / kill and resume
def _cli(out: Path, url: str, extra=()) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "tools" / "recaption.py"),
        "--input",
        str(out.parent / "in" / "*.tar"),
        "--output-dir",
        str(out),
        "--model",
        "fake-vlm",
        "--backend",
        "openai",
        "--api-base",
        url,
        "--batch-size",
        "1",
        "--max-new-tokens",
        "16",
        "--backoff",
        "0.01",
        "--no-progress",
        *extra,
    ]


def test_kill_9_mid_run_then_rerun_gives_every_sample_exactly_once(tmp_path):
    keys = write_shards(tmp_path / "in", 4, 5, seed=1)
    out = tmp_path / "out"
    env = subprocess_env()
    with FakeVLMServer(delay_s=0.08) as server:
        proc = subprocess.Popen(
            _cli(out, server.url), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.time() + 120
        while not (out / "done" / "00000.json").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        time.sleep(0.15)  # into the next shard
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
        done_before = sorted(p.stem for p in (out / "done").glob("*.json"))
        assert done_before and len(done_before) < 4, done_before
        assert list(out.glob("*.tar.tmp")), "the killed shard was mid-write"
        time.sleep(0.3)  # the request in flight at the kill still completes on the server
        calls_before = server.ok_calls
        res = subprocess.run(
            [a for a in _cli(out, server.url) if a != "--no-progress"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert res.returncode == 0, res.stderr[-3000:]
        summary = json.loads(res.stdout)
        assert summary["skipped_done"] == len(done_before)
        left = 5 * (4 - len(done_before))  # the progress bar counts the images still to do
        assert f"{left}/{left} [" in res.stderr and "img/s" in res.stderr, res.stderr[-500:]
        assert server.ok_calls - calls_before == 5 * (4 - len(done_before))  # finished shards not redone
    got = all_keys(out)
    assert sorted(got) == sorted(keys) and len(got) == len(set(got)) == 20
    assert not list(out.glob("*.tmp"))
    again = subprocess.run(
        _cli(out, "http://127.0.0.1:9/v1"), env=env, capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0 and json.loads(again.stdout)["skipped_done"] == 4


@pytest.mark.parametrize("workers", [1, 2])
def test_failed_shard_is_retried_then_reported(tmp_path, workers):
    """In this process (1 worker) and in spawned worker processes (2): a shard that raises is
    tried 1 + shard_retries times, the others finish, and the outputs are the same."""
    write_shards(tmp_path / "in", 3, 2)
    out = tmp_path / "out"
    (out / "00001.tar").mkdir(parents=True)  # the final name is taken: the rename fails every time
    with FakeVLMServer() as server:
        summary = run(
            RecaptionConfig(
                [str(tmp_path / "in" / "*.tar")],
                str(out),
                openai_cfg(server),
                shard_retries=2,
                workers=workers,
                progress=False,
            )
        )
        assert server.ok_calls == 2 * 2 + 3 * 2  # shard 1 tried three times
    assert summary["shards_done"] == ["00000", "00002"]
    [failed] = summary["failed_shards"]
    assert failed["shard"] == "00001" and failed["attempts"] == 3 and "00001.tar" in failed["error"]
    assert not list(out.glob("*.tmp"))
    keys = sorted(read_output(str(out / "00000.tar")) | read_output(str(out / "00002.tar")))
    assert keys == ["000000000", "000000001", "000000004", "000000005"]


# ------------------------------------------------------------------ model backends
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny checkpoint; the platform load_generator starts is shut down afterwards, so the
    tests that follow in this process find no process group."""
    import torch

    from megatron_sail.platform import distributed

    started_before = torch.distributed.is_initialized()
    root = tmp_path_factory.mktemp("tiny")
    yield {"ckpt": tiny_checkpoint(root / "hf"), "root": root}
    if not started_before and torch.distributed.is_initialized():
        distributed.shutdown()


def test_megatron_and_hf_backends_give_the_same_captions(tiny, tmp_path):
    """The megatron backend (inference/ on the HF folder) and the hf backend (transformers'
    generate with our prompt) decode the same greedy tokens; run() records the truncation."""
    from megatron_sail.curate.backends import make_backend
    from megatron_sail.inference import GenerationConfig, GenerationRequest, load_generator

    reqs = [
        CaptionRequest(png(80, 40, (10, 200, 10)), "Describe this image in detail."),
        CaptionRequest(png(40, 90, (10, 10, 200)), "Write a thorough caption."),
    ]
    cfg = BackendConfig("megatron", tiny["ckpt"], max_new_tokens=6, batch_size=2, max_tiles=2)
    meg = make_backend(cfg).caption(reqs)
    direct = load_generator(tiny["ckpt"], GenerationConfig(max_new_tokens=6, max_tiles=2)).generate(
        [GenerationRequest(r.prompt, [r.image]) for r in reqs]
    )
    assert [(m.text, m.tokens, m.finish_reason) for m in meg] == [
        (d.text, len(d.token_ids), d.finish_reason) for d in direct
    ]
    hf = make_backend(BackendConfig("hf", tiny["ckpt"], max_new_tokens=6, batch_size=2, max_tiles=2)).caption(
        reqs
    )
    assert [(h.text, h.tokens, h.finish_reason) for h in hf] == [
        (m.text, m.tokens, m.finish_reason) for m in meg
    ]

    write_shards(tmp_path / "in", 1, 3)
    summary = run(
        RecaptionConfig([str(tmp_path / "in" / "*.tar")], str(tmp_path / "out"), cfg, progress=False)
    )
    assert summary["samples"] == 3
    rejects = [json.loads(ln) for ln in (tmp_path / "out" / "00000.rejects.jsonl").read_text().splitlines()]
    captioned = read_output(str(tmp_path / "out" / "00000.tar"))
    assert len(rejects) + len(captioned) == 3
    for r in rejects:  # a random model rarely stops within 6 tokens
        assert r["reason"] in ("truncated_caption", "empty_caption")
        assert r["provenance"]["backend"] == "megatron" and r["provenance"]["model"] == tiny["ckpt"]
        if r["reason"] == "truncated_caption":
            assert r["provenance"]["finish_reason"] == "length" and r["provenance"]["tokens"] == 6


def test_a_reader_failure_mid_shard_fails_the_shard_cleanly(tmp_path, monkeypatch):
    """The prefetch thread's exception reaches the shard (which is then retried / reported) and
    leaves no partial files and no thread behind."""
    import threading

    from megatron_sail.curate.reader import ReadStage

    write_shards(tmp_path / "in", 1, 4)
    real = ReadStage.read

    def failing(self, spec):
        for k, sample in enumerate(real(self, spec)):
            if k == 3:
                raise OSError("disk went away")
            yield sample

    monkeypatch.setattr(ReadStage, "read", failing)
    out = tmp_path / "out"
    with FakeVLMServer() as server:
        summary = run(
            RecaptionConfig(
                [str(tmp_path / "in" / "*.tar")],
                str(out),
                openai_cfg(server, batch_size=2),
                shard_retries=1,
                progress=False,
            )
        )
    [failed] = summary["failed_shards"]
    assert failed["attempts"] == 2 and "disk went away" in failed["error"]
    assert not list(out.glob("*.tmp")) and not list(out.glob("*.tar"))
    assert not [t for t in threading.enumerate() if t.name.startswith("read-")]
