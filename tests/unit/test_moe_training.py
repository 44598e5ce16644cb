"""Expert parallelism at config resolution, and the MoE load-balancing loss in the metrics."""

import io
import json

import pytest

from megatron_sail.config.run import resolve
from megatron_sail.training.metrics import MetricsConfig, MetricsWriter, StepStats

MOE = ["--recipe", "sail_vl2_30b_a3b"]  # 128 experts, EP=8 in the recipe


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--recipe", "tiny", "--expert-model-parallel-size", "2"], "model is dense"),
        (MOE + ["--expert-model-parallel-size", "3"], "must divide the number of experts (128)"),
        (MOE + ["--tensor-model-parallel-size", "2"], "needs --sequence-parallel"),
        (["--recipe", "tiny_moe", "--expert-model-parallel-size", "3"], "number of experts (4)"),
    ],
)
def test_expert_layouts_refused_by_name(argv, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve(argv)


def test_tiny_moe_recipe():
    cfg = resolve(["--recipe", "tiny_moe", "--expert-model-parallel-size", "2"])
    lm = cfg.model.language
    assert (cfg.recipe, lm.family, lm.num_experts, lm.moe_router_topk, cfg.parallel.ep) == (
        "tiny_moe",
        "qwen3_moe",
        4,
        2,
        2,
    )
    assert cfg.model.vision == resolve(["--recipe", "tiny"]).model.vision


def test_expert_layouts_accepted():
    cfg = resolve(
        MOE
        + ["--expert-model-parallel-size", "16", "--tensor-model-parallel-size", "2", "--sequence-parallel"]
    )
    p = cfg.parallel
    assert (p.ep, p.tp, p.sp) == (16, 2, True)
    with pytest.raises(ValueError, match=f"tp\\*ep\\*pp={2 * 16 * p.pp}"):
        p.data_parallel_size(2 * 8 * p.pp)
    assert p.data_parallel_size(2 * 16 * p.pp * 2) == 16 * 2  # DP counts the EP ranks (Megatron)


def _step(i, moe):
    return StepStats(
        iteration=i,
        lm_loss=4.0,
        lr={"lm": 1e-4},
        grad_norm=1.0,
        step_time_s=1.0,
        tokens=100,
        samples=2,
        moe_losses=moe,
    )


def test_load_balancing_loss_in_jsonl_tensorboard_and_console(tmp_path):
    out = io.StringIO()
    with MetricsWriter(
        tmp_path / "run", tmp_path / "tb", 2, 0, MetricsConfig(total_iters=2), stream=out
    ) as w:
        w.log_step(_step(1, {"load_balancing_loss": 1.25}))
        w.log_step(_step(2, {"load_balancing_loss": 1.75}))
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["load_balancing_loss"] for r in recs] == [1.25, 1.75]
    assert "load_balancing_loss 1.5000" in out.getvalue()  # mean over the console window
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("load_balancing_loss")] == [1.25, 1.75]


def test_dense_runs_log_no_moe_loss(tmp_path):
    out = io.StringIO()
    with MetricsWriter(tmp_path / "run", None, 1, 0, MetricsConfig(), stream=out) as w:
        w.log_step(_step(1, {}))
    rec = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert "load_balancing_loss" not in rec and "load_balancing_loss" not in out.getvalue()


def test_optimizer_layout_change_needs_the_distributed_optimizer():
    """A checkpoint saved with one optimizer (EP=1) loaded by a chained one (EP>1): the
    distributed optimizer's state is refitted; other optimizers are refused by name."""
    from types import SimpleNamespace

    from megatron_sail.checkpoint.optimizer_state import fit_chained_layout

    chained = SimpleNamespace(chained_optimizers=[SimpleNamespace(), SimpleNamespace()])
    with pytest.raises(ValueError, match="distributed optimizer"):
        fit_chained_layout({"param_groups": [], "state": {}}, chained)
    same = {"optimizer": {"param_groups": []}, "param_state": {}}
    assert fit_chained_layout(same, SimpleNamespace()) is same  # same layout: untouched
