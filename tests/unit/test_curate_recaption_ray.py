"""--executor ray on a local 2-CPU Ray: the same shards, byte for byte, as the local executor;
a shard that keeps failing is retried on the actors and then reported (docs/curation.md)."""

from __future__ import annotations

import pytest

from megatron_sail.curate.backends import BackendConfig
from megatron_sail.curate.recaption import RecaptionConfig, run
from recaption_fixtures import FakeVLMServer, write_shards

ray = pytest.importorskip("ray")


def test_ray_executor_matches_local_and_retries_failed_shards(tmp_path):
    write_shards(tmp_path / "in", 3, 3, seed=2)
    inputs = [str(tmp_path / "in" / "*.tar")]
    blocked = tmp_path / "ray" / "00002.tar"
    blocked.mkdir(parents=True)  # its final name is a directory: every attempt fails on rename
    with FakeVLMServer() as server:
        backend = BackendConfig("openai", "fake-vlm", api_base=server.url, max_new_tokens=16, backoff_s=0.01)
        local = run(RecaptionConfig(inputs, str(tmp_path / "local"), backend, seed=3, progress=False))
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            dist = run(
                RecaptionConfig(
                    inputs,
                    str(tmp_path / "ray"),
                    backend,
                    seed=3,
                    executor="ray",
                    workers=2,
                    shard_retries=1,
                    progress=False,
                )
            )
        finally:
            ray.shutdown()
    assert local["shards_done"] == ["00000", "00001", "00002"] and not local["failed_shards"]
    assert dist["shards_done"] == ["00000", "00001"] and dist["executor"] == "ray"
    [failed] = dist["failed_shards"]
    assert failed["shard"] == "00002" and failed["attempts"] == 2
    for name in ("00000", "00001"):
        assert (tmp_path / "ray" / f"{name}.tar").read_bytes() == (
            tmp_path / "local" / f"{name}.tar"
        ).read_bytes()
        assert (tmp_path / "ray" / f"{name}.rejects.jsonl").read_bytes() == (
            tmp_path / "local" / f"{name}.rejects.jsonl"
        ).read_bytes()
    assert dist["captioned"] == 6 and local["captioned"] == 9


def test_filter_data_on_ray_matches_local(tmp_path):
    """filter_data's signature and filter passes on Ray actors (the same executor as recaption):
    the same shards, rejects and keep-lists as the local run."""
    from megatron_sail.curate.filters.pipeline import FilterConfig, run_filters
    from test_curate_dedup import cross_shard_input, lists_of

    cross_shard_input(tmp_path / "in")
    cfg = FilterConfig()
    cfg.language.enabled = False
    inputs = [str(tmp_path / "in" / "*.tar")]
    local = run_filters(inputs, str(tmp_path / "local"), cfg)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        dist = run_filters(inputs, str(tmp_path / "ray"), cfg, executor="ray", workers=2)
    finally:
        ray.shutdown()
    assert dist["kept"] == local["kept"] == 4
    for f in ("a.tar", "b.tar", "c.tar", "a.rejects.jsonl", "b.rejects.jsonl", "c.rejects.jsonl"):
        assert (tmp_path / "ray" / f).read_bytes() == (tmp_path / "local" / f).read_bytes(), f
    assert lists_of(tmp_path / "ray" / "dedup" / "keep") == lists_of(tmp_path / "local" / "dedup" / "keep")
