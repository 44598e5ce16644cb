"""The shared curation job refuses to run as several copies that would each take every shard
(torchrun, a multi-task srun step) unless the split is given, and only then: a WORLD_SIZE
left in the environment without a launcher is no launch."""

from __future__ import annotations

import pytest

from megatron_sail.curate.job import JobConfig, parallel_launch, run_job

TORCHRUN = {"TORCHELASTIC_RUN_ID": "none", "WORLD_SIZE": "4", "RANK": "1", "LOCAL_RANK": "1"}
SRUN = {"SLURM_PROCID": "2", "SLURM_STEP_NUM_TASKS": "8", "SLURM_STEP_ID": "0"}


def test_which_environments_are_parallel_launches():
    assert parallel_launch(TORCHRUN) == "torchrun (WORLD_SIZE=4)"
    assert parallel_launch(SRUN) == "an srun step of 8 tasks"
    assert parallel_launch({"WORLD_SIZE": "16", "RANK": "11", "LOCAL_RANK": "3"}) is None  # leftovers
    assert parallel_launch(dict(TORCHRUN, WORLD_SIZE="1")) is None
    assert parallel_launch(dict(SRUN, SLURM_STEP_NUM_TASKS="1")) is None
    assert parallel_launch({"SLURM_ARRAY_TASK_ID": "3", "SLURM_PROCID": "0"}) is None
    assert parallel_launch({"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "many"}) is None


def test_run_job_refuses_torchrun_unless_the_split_is_given(tmp_path, monkeypatch):
    for key, value in TORCHRUN.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match=r"not under torchrun \(WORLD_SIZE=4\).*--shard-index"):
        run_job(JobConfig(output_dir=str(tmp_path / "a"), progress=False), [])
    out = run_job(JobConfig(output_dir=str(tmp_path / "b"), shard_index=1, num_shards=4, progress=False), [])
    assert out["shards"] == 0
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")  # WORLD_SIZE and RANK alone: not a launcher
    assert run_job(JobConfig(output_dir=str(tmp_path / "c"), progress=False), [])["failed_shards"] == []


@pytest.mark.parametrize(
    "tool,func",
    [("filter_data", "main"), ("dedup", "main"), ("bench_dedup", "main"), ("recaption", "parse_args")],
)
def test_curation_tool_flags_explain_themselves(tool, func, monkeypatch):
    """Every flag of the sharded curation tools (the shared job flags included) has help text."""
    from test_cli_help import _tool_parser, _undescribed

    assert _undescribed(_tool_parser(f"tools/{tool}.py", func, monkeypatch)) == []
