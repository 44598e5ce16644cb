"""Rank, world size and rendezvous address from SLURM, for ``srun ... python -m megatron_sail.train``.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; srun with one task per
GPU sets only its own variables. When torchrun's are absent, each srun task takes its rank from
SLURM_PROCID, the world size from SLURM_NTASKS, its local rank from SLURM_LOCALID and the
rendezvous host from the first node of the step's node list, as Megatron-LM users expect.

Only a process inside an srun step (SLURM_STEP_ID set) is one of SLURM_NTASKS tasks: a batch
script's own shell also sees SLURM_PROCID=0 and the job's SLURM_NTASKS, but it is a single
process, so it starts as world size 1, with a warning when SLURM_NTASKS > 1.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from typing import Mapping, Optional

DEFAULT_MASTER_PORT = 29500
"""torchrun's default; MASTER_PORT overrides it (pick another per job when jobs share a node)."""
TORCHRUN_VARS = ("RANK", "WORLD_SIZE")


def first_host(nodelist: str, use_scontrol: bool = True) -> str:
    """The first host of a SLURM node list (``node[01-04,07],gpu5`` -> ``node01``).

    ``scontrol show hostnames`` is the authority when it is installed; otherwise the compressed
    forms are parsed here: comma-separated names, each with any number of bracket groups of
    values and zero-padded ranges (``rack[1-2]-n[003-010]`` -> ``rack1-n003``).
    """
    nodelist = nodelist.strip()
    if not nodelist:
        raise ValueError("empty SLURM node list")
    if use_scontrol and shutil.which("scontrol"):
        try:
            out = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            ).stdout.split()
            if out:
                return out[0]
        except (OSError, subprocess.SubprocessError):
            pass
    first = _split_top_level(nodelist)[0]
    return re.sub(r"\[([^\]]*)\]", lambda m: _first_value(m.group(1), nodelist), first)


def _split_top_level(nodelist: str) -> list[str]:
    """Split at commas outside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(nodelist):
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            parts.append(nodelist[start:i])
            start = i + 1
    parts.append(nodelist[start:])
    if depth != 0 or not parts[0]:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
    return parts


def _first_value(group: str, nodelist: str) -> str:
    """First value of a bracket group (``01-04,07`` -> ``01``; padding kept)."""
    value = group.split(",")[0].split("-")[0].strip()
    if not value.isdigit():
        raise ValueError(f"cannot parse SLURM node list {nodelist!r} (group [{group}])")
    return value


def in_srun_step(env: Mapping[str, str]) -> bool:
    """True inside an srun job step (not a batch script's own shell)."""
    return "SLURM_STEP_ID" in env and "SLURM_PROCID" in env


def slurm_tasks(env: Mapping[str, str]) -> int:
    """Tasks SLURM says this step (or job) has; 0 outside SLURM."""
    for key in ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS"):
        if env.get(key, "").isdigit():
            return int(env[key])
    return 0


def rendezvous_from_slurm(env: Mapping[str, str]) -> Optional[dict]:
    """torchrun's variables derived from an srun step's; None when torchrun's are set, this
    process is not in an srun step, or the step has one task (then the single-process default
    applies: a private free port, not 29500 that another job on the node may hold)."""
    if any(k in env for k in TORCHRUN_VARS) or not in_srun_step(env) or slurm_tasks(env) <= 1:
        return None
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    world = slurm_tasks(env)
    addr = env.get("MASTER_ADDR") or (first_host(nodelist) if nodelist else "127.0.0.1")
    local_size = env.get("SLURM_STEP_TASKS_PER_NODE", env.get("SLURM_NTASKS_PER_NODE", ""))
    out = {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": str(world),
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "MASTER_ADDR": addr,
        "MASTER_PORT": env.get("MASTER_PORT", str(DEFAULT_MASTER_PORT)),
    }
    match = re.match(r"(\d+)", local_size)
    if match:
        out["LOCAL_WORLD_SIZE"] = match.group(1)
    return out


def single_process_warning(env: Mapping[str, str], world_size: int) -> Optional[str]:
    """The warning for a process that starts alone while SLURM counts more tasks."""
    tasks = slurm_tasks(env)
    if world_size != 1 or tasks <= 1:
        return None
    if in_srun_step(env):
        return (
            f"SLURM started {tasks} tasks in this step but this process has WORLD_SIZE=1: each "
            "task trains alone. Drop the inner launcher (srun python -m megatron_sail.train) or "
            "use one task per node with torchrun"
        )
    return (
        f"SLURM_NTASKS={tasks} but this process is not in an srun step: it starts as world size "
        "1. Launch it with `srun python -m megatron_sail.train ...` (one task per GPU) or "
        "torchrun"
    )
