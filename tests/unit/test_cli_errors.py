"""A user's mistake ends in one ``error: ...`` line and exit code 2, never a traceback, from every
entry point (issue 22); a real bug keeps its traceback."""

import subprocess
import sys

import pytest

from megatron_sail import cli
from testkit import ROOT, subprocess_env


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in subprocess_env().items() if k not in ("RANK", "SLURM_PROCID")}
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["-m", "megatron_sail.train", "--stage", "nope"], "error: unknown stage 'nope'; expected one of"),
        (
            ["-m", "megatron_sail.train", "--data-path", "/nonexistent/sft"],
            "error: /nonexistent/sft: no complete dataset (missing /nonexistent/sft.meta.json)",
        ),
        (["tools/scaling_law.py", "/nonexistent-runs"], "error: no benchmarks/* scores with "),
    ],
)
def test_user_errors_are_one_line(args, message):
    out = _run(args)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "[rank0]" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(message), out.stderr[-2000:]


def test_run_maps_user_errors_and_keeps_bugs(capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("SLURM_PROCID", raising=False)

    def bad_input(argv):
        raise FileNotFoundError(2, "No such file or directory", "/data/x.jsonl")

    with pytest.raises(SystemExit) as info:
        cli.run(bad_input, [])
    assert info.value.code == 2
    assert capsys.readouterr().err == "error: No such file or directory: /data/x.jsonl\n"

    def bug(argv):
        raise KeyError("a bug")

    with pytest.raises(KeyError):  # not a user error: the traceback stays
        cli.run(bug, [])
    monkeypatch.setenv("SAIL_TRACEBACK", "1")
    with pytest.raises(ValueError):  # debugging: the user error's traceback on request
        cli.run(lambda argv: (_ for _ in ()).throw(ValueError("x")), [])


def test_other_ranks_wait_then_name_themselves(capsys, monkeypatch):
    """Under torchrun rank 0 prints the line; another rank prints only if it is still alive after
    a grace period (the launcher stops it first when rank 0 failed the same way)."""
    slept = []
    monkeypatch.setattr(cli.time, "sleep", slept.append)
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(SystemExit):
        cli.fail(ValueError("bad --data-path"))
    assert slept == [cli.RANK_PEER_GRACE_S]
    assert capsys.readouterr().err == "error: bad --data-path (rank 3)\n"
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit):
        cli.fail(ValueError("bad --data-path"))
    assert slept == [cli.RANK_PEER_GRACE_S] and capsys.readouterr().err == "error: bad --data-path\n"
