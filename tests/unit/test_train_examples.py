"""The multi-node launchers pass only flags that exist and values that pass validation.

Each script runs with DRY_RUN=1, which resolves every stage's trainer arguments through
config.run (the trainer's own parser and checks) and prints the result instead of launching, so a
renamed flag or an invalid value fails here. The printed configs are then checked against the
hardware the scripts are sized for (8 GPUs per node): parallel sizes divide the node, the global
batch splits into micro-batches over the data-parallel ranks, and FP8's 16-token alignment holds.
"""
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import yaml

from megatron_sail.config.parallel import ParallelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GPUS_PER_NODE = 8


def dry_run(script: str, env: dict, *extra: str) -> subprocess.CompletedProcess:
    """Run examples/<script> with DRY_RUN=1 and the given environment."""
    full = dict(os.environ, DRY_RUN="1", PYTHON=sys.executable, PYTHONPATH=ROOT, **env)
    for var in ("MASTER_ADDR", "NNODES", "NODE_RANK", "SLURM_JOB_ID", "TP", "PP", "GBS", "MBS"):
        full.pop(var, None)
    return subprocess.run(["bash", os.path.join("examples", script), *extra], cwd=ROOT, env=full,
                          capture_output=True, text=True, timeout=120)


def stages(script: str, env: dict) -> list[dict]:
    """The resolved config of each stage the script would launch, in order."""
    proc = dry_run(script, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    assert docs, proc.stdout[-2000:]
    return docs


def check_fits_a_node(cfg: dict, monkeypatch) -> None:
    """The layout fits 8 GPUs, the batch splits over DP ranks, and FP8 is accepted."""
    from megatron_sail.models import layer_specs
    from megatron_sail.training import precision
    from megatron_sail.training.loop import BatchPlan

    par = ParallelConfig(**cfg["parallel"])
    dp = par.data_parallel_size(GPUS_PER_NODE)
    t = cfg["train"]
    assert BatchPlan(t["global_batch_size"], t["micro_batch_size"], dp, 0).num_microbatches >= 1
    assert t["bf16"] and t["fp8_format"] == "hybrid"
    monkeypatch.setattr(layer_specs, "te_available", lambda: True)  # TE exists on the GPU image
    precision._check_fp8(SimpleNamespace(train=SimpleNamespace(**t), parallel=par,
                                         data=SimpleNamespace(**cfg["data"])))
    assert cfg["images"]["backend"] == "dali"
    assert cfg["checkpoint"]["save"] == cfg["checkpoint"]["load"]
    assert cfg["checkpoint"]["save"].endswith(f"{cfg['stage']['name']}/checkpoints")


@pytest.mark.parametrize("script,recipe,tp,pp", [("pretrain_sail_2b.sh", "sail_2b", 2, 1),
                                                 ("pretrain_sail_8b.sh", "sail_8b", 4, 2)])
def test_pretrain_scripts_resolve(script, recipe, tp, pp, monkeypatch):
    """Both pretraining stages resolve; the second starts from the first one's checkpoints."""
    docs = stages(script, {"DATA_PATH": "0.7 /data/caption 0.3 /data/ocr",
                           "VALID_DATA_PATH": "/data/valid", "INIT_FROM": "/ckpt/hf"})
    assert [d["stage"]["name"] for d in docs] == ["pretrain-alignment", "pretrain-advance"]
    for d in docs:
        assert d["recipe"] == recipe
        assert (d["parallel"]["tp"], d["parallel"]["pp"], d["parallel"]["sp"]) == (tp, pp, True)
        assert d["data"]["data_path"] == ["0.7", "/data/caption", "0.3", "/data/ocr"]
        assert d["data"]["valid_data_path"] == ["/data/valid"]
        check_fits_a_node(d, monkeypatch)
    assert docs[0]["checkpoint"]["init_from"] == "/ckpt/hf"
    assert docs[1]["checkpoint"]["init_from"] == docs[0]["checkpoint"]["save"]
    assert [d["train"]["train_iters"] for d in docs] == [15600, 62500]


def test_sft_script_chains_three_stages(monkeypatch):
    """sft-knowledge -> sft-instruction -> sft-preference, each from the previous weights."""
    docs = stages("sft_sail_8b.sh", {"INIT_FROM": "/ckpt/advance", "KNOWLEDGE_DATA": "/d/k",
                                     "INSTRUCTION_DATA": "/d/i", "PREFERENCE_DATA": "/d/p"})
    assert [d["stage"]["name"] for d in docs] == ["sft-knowledge", "sft-instruction",
                                                  "sft-preference"]
    assert [d["data"]["data_path"] for d in docs] == [["/d/k"], ["/d/i"], ["/d/p"]]
    assert [d["checkpoint"]["init_from"] for d in docs] == [
        "/ckpt/advance", docs[0]["checkpoint"]["save"], docs[1]["checkpoint"]["save"]]
    for d in docs:
        assert d["recipe"] == "sail_8b"
        assert d["stage"]["train_vision"] and d["stage"]["train_language"]
        check_fits_a_node(d, monkeypatch)


def test_unknown_flag_or_bad_value_fails_the_script():
    """A flag the trainer does not know, or a value it refuses, stops the launcher."""
    env = {"DATA_PATH": "/data/x"}
    proc = dry_run("pretrain_sail_2b.sh", env, "--no-such-flag", "1")
    assert proc.returncode != 0 and "--no-such-flag" in proc.stderr
    proc = dry_run("pretrain_sail_2b.sh", env, "--lr-decay-style", "zigzag")
    assert proc.returncode != 0 and "zigzag" in proc.stderr
