"""`srun --ntasks=2 python -m ...` emulated on the CPU: each process sees only SLURM's variables
(no RANK/WORLD_SIZE), joins one gloo group of two, and its collectives get the timeout of
--distributed-timeout-minutes (the single-process cases are in tests/unit/test_platform_slurm.py)."""

import json
import subprocess
import sys

from launcher import free_port
from testkit import ROOT, subprocess_env

PROBE = r"""
import json, torch, torch.distributed as dist
from megatron_sail.config.parallel import ParallelConfig
from megatron_sail.platform import distributed
from megatron.core import parallel_state
distributed.initialize(ParallelConfig(distributed_timeout_minutes=7))
x = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(x)
tp = parallel_state.get_tensor_model_parallel_group()
timeout = lambda g: g._get_backend(torch.device("cpu")).options._timeout.total_seconds() / 60
print(json.dumps({"rank": dist.get_rank(), "world": dist.get_world_size(), "sum": x.item(),
                  "timeout": timeout(dist.group.WORLD), "tp_timeout": timeout(tp)}))
distributed.shutdown()
"""


def run_tasks(envs):
    """Start one probe per environment (like srun's tasks) and return (stdout json, stderr)."""
    base = {
        k: v
        for k, v in subprocess_env().items()
        if not k.startswith("SLURM_")
        and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", PROBE],
            cwd=ROOT,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**base, "CUDA_VISIBLE_DEVICES": "", **env},
        )  # gloo even on a GPU host
        for env in envs
    ]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr[-3000:]
        out.append((json.loads(stdout.strip().splitlines()[-1]), stderr))
    return out


def test_srun_tasks_form_one_group_with_the_timeout():
    port = str(free_port())
    common = {
        "SLURM_JOB_ID": "7",
        "SLURM_STEP_ID": "0",
        "SLURM_NTASKS": "2",
        "SLURM_STEP_NUM_TASKS": "2",
        "SLURM_STEP_NUM_NODES": "1",
        "SLURM_STEP_NODELIST": "localhost",
        "MASTER_PORT": port,
    }
    results = run_tasks([{**common, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)} for r in (0, 1)])
    assert sorted(r["rank"] for r, _ in results) == [0, 1]
    for r, stderr in results:
        assert r["world"] == 2 and r["sum"] == 3.0
        assert r["timeout"] == 7 and r["tp_timeout"] == 7
        assert "WORLD_SIZE=1" not in stderr
