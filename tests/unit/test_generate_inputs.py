"""Bad input at generate's door (issue 20 item 11): each is named in one line, before any model
is loaded where it can be, and one bad record never stops the good ones."""

import json
import subprocess
import sys
import types

import pytest
from PIL import Image

from megatron_sail.generate import read_input
from megatron_sail.inference.prompts import PromptBuilder, image_bytes, image_size
from testkit import ROOT, subprocess_env


def _generate(*args: str) -> subprocess.CompletedProcess:
    env = subprocess_env()
    return subprocess.run(
        [sys.executable, "-m", "megatron_sail.generate", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_non_utf8_line_is_a_reject_naming_file_and_line(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_bytes(
        json.dumps({"prompt": "first"}).encode()
        + b"\n"
        + b'{"prompt": "caf\xe9"}\n'
        + json.dumps({"prompt": "third"}).encode()
        + b"\n"
    )
    good, rejects = read_input(str(path))
    assert [r.line for r in good] == [1, 3]
    assert [r.request.prompt for r in good] == ["first", "third"]
    assert len(rejects) == 1 and rejects[0]["file"] == str(path) and rejects[0]["line"] == 2
    assert "not UTF-8" in rejects[0]["reason"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--max-new-tokens", "-5"], "--max-new-tokens: must be at least 0"),
        (["--max-tiles", "0"], "--max-tiles: must be at least 1"),
        (["--top-p", "1.5"], "--top-p: must be in (0, 1]"),
        (["--output", "/nonexistent-folder/answers.jsonl"], "folder /nonexistent-folder does not exist"),
    ],
)
def test_flags_are_refused_before_loading_in_one_line(args, message):
    out = _generate("--checkpoint", "/nonexistent-checkpoint", "--prompt", "hi", *args)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr and "Traceback" not in out.stderr
    assert "nonexistent-checkpoint" not in out.stderr  # refused before the checkpoint is read


def test_a_directory_as_image_is_named_as_a_directory(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a directory, not an image file"):
        image_bytes(str(tmp_path), "request 0 image 0")


def test_a_huge_image_is_too_large_not_undecodable(tmp_path):
    path = tmp_path / "big.png"
    Image.new("1", (8000, 8000)).save(path)  # 64 MP, a few KB on disk
    data, name = image_bytes(str(path), "request 0 image 0")
    with pytest.raises(ValueError, match=r"too large \(8000x8000 = 64000000 px > limit 50000000 px\)"):
        image_size(data, name)
    assert image_size(data, name, max_pixels=64_000_000) == (8000, 8000)


def test_a_prompt_longer_than_the_model_is_refused_and_a_long_answer_cut(caplog):
    builder = types.SimpleNamespace(max_positions=4096)
    fit = PromptBuilder._fit
    assert fit(builder, 4000, 96, "request 0") == 96
    with pytest.raises(
        ValueError, match="the prompt is 6039 tokens, the model's max_position_embeddings is 4096"
    ):
        fit(builder, 6039, 16, "request 0")
    with caplog.at_level("WARNING", logger="megatron_sail"):
        assert fit(builder, 4000, 512, "request 3") == 96
    assert "request 3: prompt 4000 + 512 new tokens > max_position_embeddings 4096" in caplog.text
