"""A new user's first hour (issue 22): outputs land where they are expected, and nothing already
there is silently overwritten."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_make_demo_data_refuses_a_used_folder_and_overwrite_leaves_nothing_stale(tmp_path, capsys):
    make = _tool("make_demo_data").main
    out = tmp_path / "demo"
    assert make(["--out", str(out), "--samples", "3", "--vocab-size", "300"]) == 0
    (out / "stale.png").write_bytes(b"old")
    with pytest.raises(SystemExit) as exit_info:
        make(["--out", str(out), "--samples", "3", "--vocab-size", "300"])
    assert exit_info.value.code == 2
    assert "exists and is not empty; give --overwrite" in capsys.readouterr().err
    assert (out / "stale.png").exists()  # refused: nothing touched
    assert make(["--out", str(out), "--samples", "3", "--vocab-size", "300", "--overwrite"]) == 0
    assert not (out / "stale.png").exists()
    assert len([json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]) == 3
