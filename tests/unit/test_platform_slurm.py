"""SLURM launch support: node-list parsing, torchrun variables derived from an srun step, and
the warning for a process that would start alone while SLURM counts more tasks."""

import logging

import pytest

from megatron_sail.platform import slurm


@pytest.mark.parametrize(
    "nodelist,first",
    [
        ("node07", "node07"),
        ("node[01-04]", "node01"),
        ("gpu[007-010,012],cpu3", "gpu007"),
        ("a1,b[2-3]", "a1"),
        ("rack[2-3]-n[009-011]", "rack2-n009"),
        ("dgx-h100-[3,5-6]-ib", "dgx-h100-3-ib"),
    ],
)
def test_first_host_of_compressed_node_lists(nodelist, first):
    assert slurm.first_host(nodelist, use_scontrol=False) == first


@pytest.mark.parametrize("bad", ["", "node[01-04", "node[a-b]"])
def test_unparsable_node_lists_are_errors(bad):
    with pytest.raises(ValueError):
        slurm.first_host(bad, use_scontrol=False)


def srun_env(**kw):
    """Variables srun sets for task 11 of a 2-node x 8-task step."""
    env = {
        "SLURM_JOB_ID": "42",
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": "11",
        "SLURM_LOCALID": "3",
        "SLURM_NTASKS": "16",
        "SLURM_STEP_NUM_TASKS": "16",
        "SLURM_STEP_NUM_NODES": "2",
        "SLURM_STEP_NODELIST": "gpu[12-13]",
        "SLURM_JOB_NODELIST": "gpu[12-13]",
        "SLURM_STEP_TASKS_PER_NODE": "8(x2)",
    }
    env.update(kw)
    return env


def test_srun_task_gets_rank_world_local_rank_and_master(monkeypatch):
    monkeypatch.setattr(slurm.shutil, "which", lambda name: None)  # no scontrol: the parser
    out = slurm.rendezvous_from_slurm(srun_env())
    assert out == {
        "RANK": "11",
        "WORLD_SIZE": "16",
        "LOCAL_RANK": "3",
        "MASTER_ADDR": "gpu12",
        "MASTER_PORT": "29500",
        "LOCAL_WORLD_SIZE": "8",
    }
    out = slurm.rendezvous_from_slurm(srun_env(MASTER_PORT="31111", MASTER_ADDR="head"))
    assert (out["MASTER_ADDR"], out["MASTER_PORT"]) == ("head", "31111")


def test_torchrun_variables_win_and_a_batch_shell_is_not_a_task():
    assert slurm.rendezvous_from_slurm(srun_env(RANK="0", WORLD_SIZE="8")) is None
    batch = {k: v for k, v in srun_env().items() if not k.startswith("SLURM_STEP")}
    assert slurm.rendezvous_from_slurm(batch) is None
    one = srun_env(SLURM_NTASKS="1", SLURM_STEP_NUM_TASKS="1", SLURM_PROCID="0")
    assert slurm.rendezvous_from_slurm(one) is None  # one task: the single-process default


def test_warns_when_slurm_counts_more_tasks_than_the_world():
    assert "not in an srun step" in slurm.single_process_warning(
        {"SLURM_NTASKS": "8", "SLURM_PROCID": "0"}, 1
    )
    assert "WORLD_SIZE=1" in slurm.single_process_warning(srun_env(), 1)
    assert slurm.single_process_warning(srun_env(), 16) is None
    assert slurm.single_process_warning({"SLURM_NTASKS": "1"}, 1) is None
    assert slurm.single_process_warning({}, 1) is None


def test_launch_env_fills_torchrun_variables(monkeypatch):
    from megatron_sail.platform import distributed

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        # setenv first: delenv of an absent key records nothing, so what launch_env sets would
        # outlive the test (a leaked WORLD_SIZE=16 made later curation subprocesses refuse to run)
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    for key, value in srun_env(SLURM_STEP_NODELIST="node[3-4]").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(slurm.shutil, "which", lambda name: None)
    distributed.launch_env()
    import os

    assert [os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")] == [
        "11",
        "16",
        "3",
        "node3",
    ]


def test_batch_shell_with_four_tasks_starts_alone_and_warns(monkeypatch, caplog):
    import os

    from megatron_sail.platform import distributed

    for key in list(os.environ):
        if key.startswith("SLURM_") or key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("MASTER_PORT", "31234")
    with caplog.at_level(logging.WARNING, logger="megatron_sail"):
        assert distributed.launch_env() is True  # a lone process
    assert "SLURM_NTASKS=4 but this process is not in an srun step" in caplog.text
    # It joins through an in-process store: nothing for child processes to inherit.
    assert "RANK" not in os.environ and "WORLD_SIZE" not in os.environ
    assert os.environ["MASTER_PORT"] == "31234"


def test_lone_process_leaves_no_rank_or_port_for_its_children(monkeypatch):
    """A child started by a lone process (conversion, preprocessing) must not inherit a
    RANK/MASTER_PORT whose port the parent's process group holds (it failed with EADDRINUSE)."""
    import os
    import subprocess
    import sys

    for key in list(os.environ):
        if key.startswith("SLURM_") or key in (
            "RANK",
            "WORLD_SIZE",
            "LOCAL_RANK",
            "MASTER_ADDR",
            "MASTER_PORT",
        ):
            monkeypatch.delenv(key)
    code = (
        "import os, torch.distributed as dist\n"
        "from megatron_sail.platform import distributed\n"
        "distributed.init_process_group()\n"
        "assert dist.get_world_size() == 1 and dist.get_rank() == 0\n"
        "import subprocess, sys\n"
        "child = 'from megatron_sail.platform import distributed; distributed.init_process_group(); print(\"ok\")'\n"
        "print(subprocess.run([sys.executable, '-c', child], capture_output=True, text=True, check=True).stdout.strip())\n"
        "print(sorted(k for k in ('RANK', 'WORLD_SIZE', 'MASTER_PORT') if k in os.environ))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["ok", "[]"]
