"""The multi-node launchers pass only flags that exist and values that pass validation, and
their DRY_RUN=1 checks the data and checkpoints against the recipe.

Each script runs with DRY_RUN=1, which resolves every stage's trainer arguments through
config.run (the trainer's own parser and checks), prints the result and the launch command
instead of launching, and checks (training/dry_run.py) that every data prefix is a finished dataset
with the recipe's row length and tile geometry and that --init-from holds the recipe's model; so a
renamed flag, an invalid value, or data/checkpoints that do not fit fail here. The printed configs
are then checked against the hardware the scripts are sized for (8 GPUs per node): parallel sizes
divide the node, the global batch splits into micro-batches over the data-parallel ranks, and
FP8's 16-token alignment holds.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from megatron_sail.config.data import PackingConfig, PreprocessConfig
from megatron_sail.config.images import TilingConfig
from megatron_sail.config.parallel import ParallelConfig
from megatron_sail.data.loading.dataset import parse_data_path
from testkit import ROOT, subprocess_env

GPUS_PER_NODE = 8
LAUNCH_VARS = (
    "MASTER_ADDR",
    "MASTER_PORT",
    "NNODES",
    "NODE_RANK",
    "TP",
    "PP",
    "GBS",
    "MBS",
    "STAGES",
    "RANK",
    "WORLD_SIZE",
)


def dry_run(script: str, env: dict, *extra: str) -> subprocess.CompletedProcess:
    """Run examples/<script> with DRY_RUN=1 and the given environment (no inherited SLURM or
    rendezvous variables)."""
    full = {k: v for k, v in subprocess_env().items() if not k.startswith("SLURM_") and k not in LAUNCH_VARS}
    full.update({"DRY_RUN": "1", "PYTHON": sys.executable, **env})
    return subprocess.run(
        ["bash", os.path.join("examples", script), *extra],
        cwd=ROOT,
        env=full,
        capture_output=True,
        text=True,
        timeout=300,
    )


def stages(script: str, env: dict) -> tuple[list[dict], str]:
    """The resolved config of each stage the script would launch, in order, and its stderr."""
    proc = dry_run(script, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    assert docs, proc.stdout[-2000:]
    return docs, proc.stderr


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Tiny real datasets in the SAIL-VL geometry (16,384-token rows, 448 px tiles of 256
    tokens), one in the wrong geometry, and config-only checkpoint directories of both models
    (the model_config.yaml + metadata.json an hf-to-mcore conversion writes; no weights, which
    the dry run does not read)."""
    from megatron_sail.checkpoint.layout import write_model_config
    from megatron_sail.config.model import sail_2b, sail_8b, sail_vl2_8b
    from megatron_sail.data.preprocess.pipeline import run
    from megatron_sail.demo.generator import DemoConfig, make_demo

    root = tmp_path_factory.mktemp("launch")
    demo = make_demo(str(root / "demo"), DemoConfig(samples=10, val_samples=3, seed=2))

    def build(name, source, seq, tile, tokens):
        cfg = PreprocessConfig(
            inputs=[source],
            output_prefix=str(root / name),
            tokenizer=demo["tokenizer"],
            tiling=TilingConfig(tile, 1, 1, True, tokens),
            packing=PackingConfig(seq, 64, 1),
        )
        code, summary = run(cfg, log=lambda m: None)
        assert code == 0, summary
        return str(root / name)

    out = {
        "caption": build("caption", demo["train"], 16384, 448, 256),
        "ocr": build("ocr", demo["val"], 16384, 448, 256),
        "small": build("small", demo["val"], 512, 32, 4),
    }
    (root / "rl.jsonl").write_text('{"question": "How many?", "answer": "2"}\n')
    out["rl"] = str(root / "rl.jsonl")
    for name, model in (("hf_2b", sail_2b()), ("hf_8b", sail_8b()), ("hf_vl2_8b", sail_vl2_8b())):
        folder = root / name
        folder.mkdir()
        write_model_config(folder, model)
        (folder / "metadata.json").write_text("{}")
        out[name] = str(folder)
    return out


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
    precision._check_fp8(
        SimpleNamespace(train=SimpleNamespace(**t), parallel=par, data=SimpleNamespace(**cfg["data"]))
    )
    assert cfg["images"]["backend"] == "dali"
    assert cfg["checkpoint"]["save"] == cfg["checkpoint"]["load"]
    assert cfg["checkpoint"]["save"].endswith(f"{cfg['stage']['name']}/checkpoints")


@pytest.mark.parametrize(
    "script,recipe,tp,pp",
    [("pretrain_sail_2b.sh", "sail_2b", 2, 1), ("pretrain_sail_8b.sh", "sail_8b", 4, 2)],
)
def test_pretrain_scripts_resolve(script, recipe, tp, pp, monkeypatch, assets, tmp_path):
    """Both pretraining stages resolve and their data and checkpoint fit the recipe; the second
    starts from the first one's checkpoints (not written yet: noted, not refused)."""
    ckpt = assets["hf_2b" if recipe == "sail_2b" else "hf_8b"]
    docs, err = stages(
        script,
        {
            "DATA_PATH": f"0.7 {assets['caption']} 0.3 {assets['ocr']}",
            "VALID_DATA_PATH": assets["ocr"],
            "INIT_FROM": ckpt,
            "RUN_ROOT": str(tmp_path / "runs"),
        },
    )
    assert [d["stage"]["name"] for d in docs] == ["pretrain-alignment", "pretrain-advance"]
    for d in docs:
        assert d["recipe"] == recipe
        assert (d["parallel"]["tp"], d["parallel"]["pp"], d["parallel"]["sp"]) == (tp, pp, True)
        assert parse_data_path(d["data"]["data_path"]) == ([assets["caption"], assets["ocr"]], [0.7, 0.3])
        assert d["data"]["valid_data_path"] == [assets["ocr"]]
        check_fits_a_node(d, monkeypatch)
    assert docs[0]["checkpoint"]["init_from"] == ckpt
    assert docs[1]["checkpoint"]["init_from"] == docs[0]["checkpoint"]["save"]
    assert [d["train"]["train_iters"] for d in docs] == [15600, 62500]
    assert err.count(f"[dry-run] launch: {sys.executable} -m torch.distributed.run") == 2
    assert (
        err.count(
            f"ok: --data-path {assets['caption']}: 1 rows of 16384 tokens, 448 px tiles, 256 tokens per tile"
        )
        == 2
    )
    assert f"ok: --init-from {ckpt}: model config matches recipe '{recipe}'" in err
    assert "written by an earlier stage of this launcher" in err


def test_sft_script_chains_three_stages(monkeypatch, assets, tmp_path):
    """sft-knowledge -> sft-instruction -> sft-preference, each from the previous weights."""
    data = {
        "KNOWLEDGE_DATA": assets["caption"],
        "INSTRUCTION_DATA": assets["ocr"],
        "PREFERENCE_DATA": f"{assets['caption']} {assets['ocr']}",
        "RUN_ROOT": str(tmp_path / "r"),
    }
    docs, err = stages("sft_sail_8b.sh", {"INIT_FROM": assets["hf_8b"], **data})
    assert [d["stage"]["name"] for d in docs] == ["sft-knowledge", "sft-instruction", "sft-preference"]
    assert [parse_data_path(d["data"]["data_path"])[0] for d in docs] == [
        [assets["caption"]],
        [assets["ocr"]],
        [assets["caption"], assets["ocr"]],
    ]
    assert [d["checkpoint"]["init_from"] for d in docs] == [
        assets["hf_8b"],
        docs[0]["checkpoint"]["save"],
        docs[1]["checkpoint"]["save"],
    ]
    assert err.count("written by an earlier stage of this launcher") == 2
    for d in docs:
        assert d["recipe"] == "sail_8b"
        assert d["stage"]["train_vision"] and d["stage"]["train_language"]
        check_fits_a_node(d, monkeypatch)


def test_post_training_chain_resolves_every_stage(assets, tmp_path):
    """SFT phases -> soup -> LongCoT SFT -> GRPO -> Think-Fusion SFT -> GRPO (mixed), each
    stage from the previous one's weights; the soup merges the phases' checkpoints."""
    root = str(tmp_path / "r")
    env = {
        "INIT_FROM": assets["hf_vl2_8b"],
        "SFT_PHASES": f"{assets['caption']} {assets['ocr']}",
        "LONGCOT_DATA": assets["caption"],
        "THINK_FUSION_DATA": assets["ocr"],
        "RL_DATA": assets["rl"],
        "RL_MIXED_DATA": assets["rl"],
        "RUN_ROOT": root,
        "JUDGE_URL": "http://judge:8000/v1",
    }
    docs, err = stages("post_train_sail_vl2_8b.sh", env)
    names = [d["stage"]["name"] for d in docs]
    assert names == ["sft-instruction"] * 3 + ["grpo", "sft-instruction", "grpo"]
    assert {d["recipe"] for d in docs} == {"sail_vl2_8b"}
    inits = [d["checkpoint"]["init_from"] for d in docs]
    assert inits[:2] == [assets["hf_vl2_8b"]] * 2 and inits[2] == f"{root}/soup"
    for prev, d in zip(docs[2:], docs[3:]):
        assert d["checkpoint"]["init_from"] == prev["checkpoint"]["save"]
    assert (
        f"[dry-run] soup: {sys.executable} tools/merge_checkpoints.py --inputs "
        f"{root}/sft_phase1/checkpoints {root}/sft_phase2/checkpoints --out {root}/soup"
    ) in err
    rl, mixed = docs[3]["post"], docs[5]["post"]
    assert rl["rewards"] == ["format", "accuracy"] and "\\boxed{}" in rl["prompt_suffix"]
    assert mixed["rewards"] == ["accuracy", "format", "length", "judge"]
    assert mixed["judge_url"] == "http://judge:8000/v1"
    assert [rl["ref_load"], mixed["ref_load"]] == [
        docs[2]["checkpoint"]["save"],
        docs[4]["checkpoint"]["save"],
    ]
    assert err.count(f"ok: --data-path {assets['rl']} (JSONL)") == 2
    assert "error" not in err


def test_unknown_flag_or_bad_value_fails_the_script():
    """A flag the trainer does not know, or a value it refuses, stops the launcher."""
    env = {"DATA_PATH": "/data/x", "STAGES": "pretrain-alignment"}
    proc = dry_run("pretrain_sail_2b.sh", env, "--no-such-flag", "1")
    assert proc.returncode != 0 and "--no-such-flag" in proc.stderr
    proc = dry_run("pretrain_sail_2b.sh", env, "--lr-decay-style", "zigzag")
    assert proc.returncode != 0 and "zigzag" in proc.stderr


def test_dry_run_refuses_data_that_does_not_fit_the_recipe(assets):
    """512-token rows of 32 px tiles (4 tokens each) for a 16,384-token, 448 px recipe; a prefix
    that was never built; a blend whose token ids differ: each an error naming the prefix."""
    one = {"STAGES": "pretrain-alignment"}
    proc = dry_run("pretrain_sail_2b.sh", {"DATA_PATH": f"{assets['caption']} {assets['small']}", **one})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"--data-path {assets['small']}: rows hold 512 tokens but --seq-length is 16384" in proc.stderr
    assert "4 tokens per tile, the model makes 1 from 32 px tiles" in proc.stderr
    assert f"token ids / tiles differ from {assets['caption']}: tokens_per_tile 4 vs 256" in proc.stderr
    missing = os.path.join(os.path.dirname(assets["small"]), "never_built")
    proc = dry_run("pretrain_sail_2b.sh", {"DATA_PATH": missing, **one})
    assert proc.returncode == 2 and f"no {missing}.meta.json" in proc.stderr


def test_dry_run_refuses_a_checkpoint_of_another_model(assets, tmp_path):
    """The 8B conversion as --init-from of the 2B recipe; an --init-from that is not there."""
    env = {"DATA_PATH": assets["caption"], "STAGES": "pretrain-alignment", "RUN_ROOT": str(tmp_path)}
    proc = dry_run("pretrain_sail_2b.sh", {**env, "INIT_FROM": assets["hf_8b"]})
    assert proc.returncode == 2
    assert f"--init-from {assets['hf_8b']}: model differs from recipe 'sail_2b'" in proc.stderr
    assert "language.hidden_size: checkpoint 3584, recipe 1536" in proc.stderr
    proc = dry_run("pretrain_sail_2b.sh", {**env, "INIT_FROM": str(tmp_path / "nothing")})
    assert proc.returncode == 2 and f"--init-from {tmp_path / 'nothing'}: does not exist" in proc.stderr


def test_dry_run_refuses_alignment_between_random_networks(assets, tmp_path):
    """pretrain-alignment trains only the projector: without INIT_FROM (or --allow-random-init)
    it would connect a random ViT to a random LLM; the dry run says so instead of "ok"."""
    env = {"DATA_PATH": assets["caption"], "STAGES": "pretrain-alignment", "RUN_ROOT": str(tmp_path)}
    proc = dry_run("pretrain_sail_2b.sh", env)
    assert proc.returncode == 2
    assert "stage pretrain-alignment trains only the projector, but no --init-from" in proc.stderr
    assert dry_run("pretrain_sail_2b.sh", env, "--allow-random-init").returncode == 0
    advance = dry_run("pretrain_sail_2b.sh", {**env, "STAGES": "pretrain-advance"})
    assert advance.returncode == 0, advance.stderr[-2000:]  # it trains the ViT: allowed


SLURM_STEP = {
    "SLURM_JOB_ID": "77",
    "SLURM_STEP_ID": "0",
    "SLURM_NNODES": "2",
    "SLURM_NODEID": "1",
    "SLURM_STEP_NUM_NODES": "2",
    "SLURM_JOB_NODELIST": "gpu-a[003-004]",
}


@pytest.mark.parametrize("tasks,direct", [("2", False), ("16", True)])
def test_slurm_launch_modes(assets, tasks, direct):
    """One srun task per node runs torch.distributed.run for the node's 8 GPUs, rendezvous at the
    job's first node (parsed from the compressed node list, no scontrol); one task per GPU runs
    the trainer itself (it takes its rank from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID)."""
    env = {
        **SLURM_STEP,
        "SLURM_STEP_NUM_TASKS": tasks,
        "SLURM_NTASKS": tasks,
        "MASTER_PORT": "31337",
        "DATA_PATH": assets["caption"],
        "STAGES": "pretrain-alignment",
    }
    proc = dry_run("pretrain_sail_2b.sh", env, "--allow-random-init")
    assert proc.returncode == 0, proc.stderr[-2000:]
    launch = next(line for line in proc.stderr.splitlines() if line.startswith("[dry-run] launch:"))
    if direct:
        assert launch == f"[dry-run] launch: {sys.executable} -m megatron_sail.train ..."
    else:
        assert launch == (
            f"[dry-run] launch: {sys.executable} -m torch.distributed.run --nnodes 2 "
            "--node_rank 1 --nproc_per_node 8 --master_addr gpu-a003 --master_port 31337 "
            "-m megatron_sail.train ..."
        )


def test_no_launcher_calls_a_bare_torchrun():
    """`torchrun` is only on PATH inside an activated venv (rc 127 otherwise): the scripts use
    the project's Python (`$PYTHON -m torch.distributed.run`)."""
    for script in Path(ROOT, "examples").glob("*.sh"):
        code = "\n".join(line.split("#")[0] for line in script.read_text().splitlines())
        assert not re.search(r"(^|[\s;&|(])torchrun\b", code), script


@pytest.mark.skipif(
    not os.access(os.path.join(ROOT, ".venv", "bin", "python"), os.X_OK), reason="no .venv in this checkout"
)
def test_python_defaults_to_the_checkouts_venv(assets):
    proc = dry_run(
        "pretrain_sail_2b.sh",
        {
            "PYTHON": "",
            "DATA_PATH": assets["caption"],
            "STAGES": "pretrain-alignment",
            "PATH": "/usr/bin:/bin",
        },
        "--allow-random-init",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"[dry-run] launch: {ROOT}/.venv/bin/python -m torch.distributed.run" in proc.stderr


def test_dry_run_module_on_the_tiny_recipe(assets, tmp_path, capsys):
    """In process: the tiny recipe fits the 512-token, 32 px data; a smaller vocabulary is
    reported with the size the trainer will build; another row length is an error."""
    from megatron_sail.training import dry_run

    base = ["--recipe", "tiny", "--seq-length", "512", "--data-path", assets["small"]]
    assert dry_run.main(["--", *base]) == 0
    err = capsys.readouterr().err
    assert f"ok: --data-path {assets['small']}: 1 rows of 512 tokens, 32 px tiles, 4 tokens per tile" in err
    small_vocab = tmp_path / "vocab.yaml"
    small_vocab.write_text("model:\n  language:\n    vocab_size: 256\n")
    assert dry_run.main(["--", *base, "--config", str(small_vocab)]) == 0
    vocab = json.loads(Path(assets["small"] + ".meta.json").read_text())["tokenizer"]["vocab_size"]
    assert (
        f"the data's {vocab} token ids exceed the recipe's vocabulary 256: the model is built "
        f"with {-(-vocab // 128) * 128}"
    ) in capsys.readouterr().err
    assert dry_run.main(["--", *base[:2], "--seq-length", "256", *base[4:]]) == 2
    assert "rows hold 512 tokens but --seq-length is 256" in capsys.readouterr().err


def test_sft_script_runs_a_curriculum_plan(monkeypatch, assets, tmp_path):
    """PLAN=plan.yaml (tools/build_curriculum.py's format): the plan's stages in its order, each
    with its blend, trainer stage and steps, each from the previous stage's weights."""
    plan = {
        "stages": [
            {
                "name": "stage1",
                "trainer_stage": "sft-knowledge",
                "samples": 10,
                "replayed": 0,
                "iters": 7,
                "blend": f"1 {assets['caption']}",
            },
            {
                "name": "stage2",
                "trainer_stage": "sft-preference",
                "samples": 4096,
                "replayed": 1024,
                "blend": f"0.8 {assets['ocr']} 0.2 {assets['caption']}",
            },
        ]
    }
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(plan))
    docs, err = stages(
        "sft_sail_8b.sh",
        {"INIT_FROM": assets["hf_8b"], "PLAN": str(tmp_path / "plan.yaml"), "RUN_ROOT": str(tmp_path / "r")},
    )
    assert [d["stage"]["name"] for d in docs] == ["sft-knowledge", "sft-preference"]
    assert parse_data_path(docs[1]["data"]["data_path"]) == ([assets["ocr"], assets["caption"]], [0.8, 0.2])
    assert [d["train"]["train_iters"] for d in docs] == [7, 2]  # 5,120 samples / (8 per row x 512)
    assert (
        docs[1]["checkpoint"]["init_from"]
        == docs[0]["checkpoint"]["save"]
        == str(tmp_path / "r/stage1/checkpoints")
    )
    assert "written by an earlier stage of this launcher" in err
    (tmp_path / "empty.yaml").write_text("stages: []\n")
    proc = dry_run("sft_sail_8b.sh", {"INIT_FROM": assets["hf_8b"], "PLAN": str(tmp_path / "empty.yaml")})
    assert proc.returncode != 0 and "no stages" in proc.stderr
