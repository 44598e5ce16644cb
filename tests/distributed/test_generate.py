"""Generation (megatron_sail.inference) against transformers' generate, on tiny random InternVLs.

Greedy answers must be token-identical to transformers' ``generate`` on the same weights, image
and prompt, for both HF layouts, for a converted Megatron checkpoint, at TP=2 (also with SP
through generator_from_model) and at PP=2 (also with virtual stages); batched generation must
equal one prompt at a time. The same holds for the newer families (generate_cases.FAMILIES:
Qwen3, Qwen3-MoE in both InternVL layouts, AIMv2 + Qwen3-MoE in the 'sailvl' layout), and
Qwen3-MoE also at TP=2 (experts split over TP), on EP=2 live chunks, and after load_generator
rebuilt EP=2 groups at EP=1. Each job runs in spawned ranks (the CPU backend patches torch).
"""

from __future__ import annotations

import pytest

import generate_cases as gc
from launcher import launch


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Checkpoints + images, and the single-rank results every parallel job is compared with."""
    root = tmp_path_factory.mktemp("generate")
    paths = gc.make_checkpoints(root)
    paths["mcore"] = str(root / "mcore")
    paths["mcore_moe"] = str(root / "mcore_moe")
    [single] = launch(_single_rank_job, 1, paths, timeout=600)
    return paths, single


def _answers(gen, reqs):
    """Token ids of every request, batched."""
    return [r.token_ids for r in gen.generate(reqs)]


def _single_rank_job(rank, paths):
    """Both layouts + a converted checkpoint at one rank: ours batched, ours one by one, HF."""
    gc.set_threads()
    from megatron_sail.convert.checkpoint import ConvertConfig, hf_to_mcore
    from megatron_sail.inference import load_generator

    reqs = gc.requests(paths["images"])
    out = {}
    for layout in ("hf", "chat"):
        gen = load_generator(paths[layout], gc.gen_config(batch_size=4))
        prompts = [gen.prompts.build(r, gen.cfg.max_new_tokens, i) for i, r in enumerate(reqs)]
        results = gen.generate(reqs)
        out[layout] = {
            "batched": [r.token_ids for r in results],
            "single": [gen.generate([r])[0].token_ids for r in reqs],
            "hf": gc.hf_reference(paths[layout], prompts, gen.stop_ids),
            "prompt_ids": [r.prompt_ids for r in results],
            "built_ids": [p.ids for p in prompts],
            "tiles": [int(p.tiles.size(0)) for p in prompts],
            "text": [r.text for r in results],
            "decoded": [gen.tokenizer.decode(r.token_ids) for r in results],
            "reasons": [r.finish_reason for r in results],
            "steps": gen.stats["decode_steps"],
        }
    # A stop token that greedy decoding reaches mid-answer: both sides must stop there.
    first = out["hf"]["hf"][0]
    stop = first[4]
    hf_gen = load_generator(paths["hf"], gc.gen_config(batch_size=4, stop_token_ids=(stop,)))
    prompts = [hf_gen.prompts.build(r, hf_gen.cfg.max_new_tokens, i) for i, r in enumerate(reqs)]
    out["stop"] = {
        "token": stop,
        "ours": _answers(hf_gen, reqs),
        "hf": gc.hf_reference(paths["hf"], prompts, (stop,)),
    }
    # Seeded sampling: same seed -> same answer; a different seed -> a different one.
    from megatron_sail.inference import Generator

    sample = lambda seed: _answers(  # noqa: E731
        Generator(
            hf_gen.chunks,
            hf_gen.model_config,
            hf_gen.tokenizer,
            hf_gen.settings,
            gc.gen_config(batch_size=4, temperature=1.5, top_p=0.95, seed=seed),
        ),
        reqs,
    )
    out["sampled"] = [sample(1), sample(1), sample(2)]
    out["host_reads"] = _host_reads(hf_gen, reqs)
    out["onednn"] = _onednn_everywhere(paths["hf"], reqs)
    hf_to_mcore(paths["hf"], paths["mcore"], ConvertConfig())
    out["mcore"] = _answers(load_generator(paths["mcore"], gc.gen_config(batch_size=4)), reqs)
    out["families"] = {name: _family_case(paths[name], reqs) for name in gc.FAMILIES}
    hf_to_mcore(paths["qwen3_moe"], paths["mcore_moe"], ConvertConfig())
    return out


def _host_reads(gen, reqs) -> dict:
    """Forced answers of 4 and 12 tokens decoded GPU-style (whether a row still runs checked
    every 1000 steps), with the values read back to the host (Tensor.item/tolist/bool/int/float)
    while decoding, against the same answers checked every step."""
    import dataclasses

    import torch

    names = ("item", "tolist", "__bool__", "__int__", "__float__")
    own = {n: torch.Tensor.__dict__[n] for n in names if n in torch.Tensor.__dict__}
    reads = [0]

    def counted(fn):
        def call(*a, **k):
            reads[0] += 1
            return fn(*a, **k)

        return call

    res = {}
    for new in (4, 12):
        cfg = dataclasses.replace(gen.cfg, max_new_tokens=new, min_new_tokens=new, stop_token_ids=None)
        gen_new = type(gen)(gen.chunks, gen.model_config, gen.tokenizer, gen.settings, cfg)
        prompts = [gen_new.prompts.build(r, new, i) for i, r in enumerate(reqs)]
        prompts = [dataclasses.replace(p, max_new_tokens=new) for p in prompts]  # all forced to `new`
        every_step = [r.token_ids for r in gen_new.generate_prompts(prompts)]
        gen_new.sync_every = 1000
        reads[0] = 0
        for n in names:
            setattr(torch.Tensor, n, counted(getattr(torch.Tensor, n)))
        try:
            rarely = [r.token_ids for r in gen_new.generate_prompts(prompts)]
        finally:
            for n in names:
                if n in own:
                    setattr(torch.Tensor, n, own[n])
                else:
                    delattr(torch.Tensor, n)
        res[new] = {"every_step": every_step, "rarely": rarely, "reads": reads[0]}
    return res


def _onednn_everywhere(path, reqs) -> dict:
    """Answers with every linear product of the generation through oneDNN (its size floor set
    to 0; by default the tiny model's products are too small for it), the ops that ran, and
    the same answers with oneDNN off (F.linear only)."""
    from torch.profiler import ProfilerActivity, profile

    from megatron_sail.inference import load_generator
    from megatron_sail.platform import onednn_linear

    floor = onednn_linear.MIN_MACS
    onednn_linear.MIN_MACS = 0
    try:
        gen = load_generator(path, gc.gen_config(batch_size=4))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            answers = _answers(gen, reqs)
    finally:
        onednn_linear.MIN_MACS = floor
    ops = [e.name for e in prof.events()]
    off = load_generator(path, gc.gen_config(batch_size=4, onednn_linear=False))
    return {
        "answers": answers,
        "onednn_calls": ops.count("mkldnn::_linear_pointwise"),
        "mkl_calls": ops.count("aten::addmm") + ops.count("aten::mm"),
        "off": _answers(off, reqs),
    }


def _family_case(path, reqs) -> dict:
    """One newer-family folder: ours batched, ours one by one, transformers; for MoE models also
    ours with every router's expert order reversed (the negative control: routing decides tokens)."""
    from megatron_sail.inference import load_generator

    gen = load_generator(path, gc.gen_config(batch_size=4))
    prompts = [gen.prompts.build(r, gen.cfg.max_new_tokens, i) for i, r in enumerate(reqs)]
    cfg = gen.model_config
    res = {
        "batched": _answers(gen, reqs),
        "single": [gen.generate([r])[0].token_ids for r in reqs],
        "hf": gc.hf_reference(path, prompts, gen.stop_ids),
        "families": (cfg.vision.family, cfg.language.family),
        "tiles": [int(p.tiles.size(0)) for p in prompts],
    }
    if cfg.language.is_moe:
        for lm in gen.lms:
            for layer in lm.decoder.layers:
                layer.mlp.router.weight.data = layer.mlp.router.weight.data.flip(0)
        res["rerouted"] = _answers(gen, reqs)
    return res


def test_greedy_matches_transformers_both_layouts(assets):
    _, single = assets
    for layout in ("hf", "chat"):
        res = single[layout]
        assert res["batched"] == res["hf"], layout
        assert res["single"] == res["hf"], layout
        lengths = [len(t) for t in res["hf"]]
        budgets = [gc.MAX_NEW, gc.MAX_NEW, gc.MAX_NEW, 6]
        assert res["reasons"] == ["length" if n == b else "stop" for n, b in zip(lengths, budgets)]
        assert sum(lengths) >= 20 and "length" in res["reasons"], (layout, lengths)
        assert len({x for t in res["hf"] for x in t}) >= 8, ("degenerate answers", layout, res["hf"])
        assert res["prompt_ids"] == res["built_ids"]
        assert res["text"] == res["decoded"]


def test_prompts_follow_training_template_and_tiling(assets):
    _, single = assets
    res = single["hf"]
    # 130x60 -> 2x1 grid + thumbnail; 50x50 -> 1 tile; 60x170 -> 1x3 + thumbnail (4 tokens/tile)
    assert res["tiles"] == [3, 1 + 4, 0, 4]
    from megatron_sail.data.tokenizer import load_tokenizer

    tok = load_tokenizer(assets[0]["hf"])
    sp = tok.special
    ids = res["prompt_ids"][0]
    head = [sp.im_start] + tok.encode("user\n") + [sp.img_start]
    assert ids[: len(head)] == head
    assert ids.count(sp.img_context) == 3 * 4
    tail = [sp.im_end] + tok.encode("\n") + [sp.im_start] + tok.encode("assistant\n")
    assert ids[-len(tail) :] == tail
    assert res["prompt_ids"][1].count(sp.img_start) == 2


def test_kv_cache_decodes_one_token_per_step(assets):
    _, single = assets
    res = single["hf"]
    # The prefill yields the first token; each later token (and a final stop token) costs one
    # decode step of one token per prompt, never a re-forward of the prompt.
    per = [len(t) if why == "stop" else len(t) - 1 for t, why in zip(res["hf"], res["reasons"])]
    assert res["steps"] == max(per) + sum(per)  # one batched run, then each prompt alone


def test_stop_token_ends_answers_like_transformers(assets):
    _, single = assets
    stop = single["stop"]
    assert stop["ours"] == stop["hf"]
    assert len(stop["ours"][0]) < 5 and stop["token"] not in stop["ours"][0]


def test_decode_reads_nothing_back_per_token(assets):
    _, single = assets
    runs = single["host_reads"]
    for new, run in runs.items():
        assert run["rarely"] == run["every_step"], new
        assert all(len(t) == new for t in run["rarely"]), new
    # 8 more tokens per answer, not one more read: nothing in a decode step syncs with the host
    assert runs[12]["reads"] == runs[4]["reads"]


def test_onednn_products_keep_greedy_tokens_identical(assets):
    """Every linear product through oneDNN (another summation order than transformers' MKL
    sgemm): the greedy answers stay token-identical to transformers' and to F.linear's."""
    _, single = assets
    run = single["onednn"]
    assert run["onednn_calls"] > 0 and run["mkl_calls"] == 0
    assert run["answers"] == single["hf"]["hf"] == run["off"]


def test_seeded_sampling(assets):
    _, single = assets
    a, b, c = single["sampled"]
    assert a == b
    assert a != c
    assert a != single["hf"]["hf"]


def test_converted_megatron_checkpoint(assets):
    _, single = assets
    assert single["mcore"] == single["hf"]["hf"]


def test_newer_families_match_transformers_batched_and_alone(assets):
    """Qwen3, Qwen3-MoE (transformers and InternVL-chat layouts), AIMv2 + Qwen3-MoE (sailvl):
    token-identical to transformers, batched == one prompt at a time (MoE routing is per token)."""
    _, single = assets
    fams = single["families"]
    assert {n: fams[n]["families"] for n in gc.FAMILIES} == {
        "qwen3": ("internvit", "qwen3"),
        "qwen3_moe": ("internvit", "qwen3_moe"),
        "qwen3_moe_chat": ("internvit", "qwen3_moe"),
        "sailvl": ("aimv2", "qwen3_moe"),
    }
    for name in gc.FAMILIES:
        res = fams[name]
        assert res["batched"] == res["hf"], name
        assert res["single"] == res["hf"], name
        assert sum(len(t) for t in res["hf"]) >= 20, (name, res["hf"])
        assert len({x for t in res["hf"] for x in t}) >= 6, ("degenerate answers", name, res["hf"])
        # 56 px tiles as for Qwen2; sailvl's 32 px tiles turn the 50x50 image into 2x2 + thumbnail
        assert res["tiles"] == ([3, 5 + 4, 0, 4] if name == "sailvl" else [3, 1 + 4, 0, 4]), name
        if "rerouted" in res:
            assert res["rerouted"] != res["hf"], name


def _tp_job(rank, paths):
    """TP=2 from the HF folder, then TP=2 + SP through generator_from_model on a DDP-wrapped chunk."""
    gc.set_threads()
    from megatron_sail.config.parallel import ParallelConfig
    from megatron_sail.convert import hf_internvl
    from megatron_sail.convert.checkpoint import read_hf_checkpoint
    from megatron_sail.inference import generator_from_model, inspect_checkpoint, load_generator
    from megatron_sail.inference.loading import LoadConfig
    from megatron_sail.models.sail_vl import SailVLModel
    from megatron_sail.platform import distributed

    reqs = gc.requests(paths["images"])
    gen = load_generator(paths["hf"], gc.gen_config(batch_size=3), LoadConfig(tp=2))
    plain = _answers(gen, reqs)
    tok = gen.tokenizer
    distributed.initialize(ParallelConfig(tp=2, sp=True))
    ck = inspect_checkpoint(paths["hf"])
    model = SailVLModel(ck.model_config, ParallelConfig(tp=2, sp=True), use_te=False)
    full = hf_internvl.hf_to_ours(read_hf_checkpoint(paths["hf"]).state, ck.model_config)
    model.load_state_dict(hf_internvl.shard_for_model(full, model), strict=False)
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp = DistributedDataParallel(
        config=model.config,
        module=model,
        ddp_config=DistributedDataParallelConfig(use_distributed_optimizer=True),
    )
    ddp.train()
    live = generator_from_model([ddp], ck.model_config, tok, ck.settings, gc.gen_config(batch_size=3))
    sp_answers = _answers(live, reqs)
    return {
        "plain": plain,
        "sp": sp_answers,
        "training_kept": ddp.training and model.training,
        "grads": any(p.grad is not None for p in model.parameters()),
        **_moe_parallel(paths, reqs),
    }


def _moe_parallel(paths, reqs) -> dict:
    """Qwen3-MoE at TP=2 from the HF folder; EP=2 live chunks loaded from the converted
    checkpoint (what the in-training hook decodes with at EP=2: every EP rank runs the same
    prompts, so the all-to-alls pair up); then load_generator inside those EP=2 groups."""
    from megatron.core import parallel_state as ps

    from megatron_sail.checkpoint import dcp
    from megatron_sail.config.parallel import ParallelConfig
    from megatron_sail.convert.checkpoint import build_model_chunks
    from megatron_sail.inference import generator_from_model, inspect_checkpoint, load_generator
    from megatron_sail.inference.loading import LoadConfig
    from megatron_sail.platform import distributed

    def experts(chunk) -> int:
        return len(chunk.language_model.decoder.layers[0].mlp.experts.local_experts)

    gen = load_generator(paths["qwen3_moe"], gc.gen_config(batch_size=3), LoadConfig(tp=2))
    out = {"moe_tp": _answers(gen, reqs)}
    ep2 = ParallelConfig(ep=2)
    distributed.initialize(ep2)
    ck = inspect_checkpoint(paths["mcore_moe"])
    chunks = build_model_chunks(ck.model_config, ep2, use_te=False)
    dcp.load_model(chunks, paths["mcore_moe"])
    live = generator_from_model(
        chunks, ck.model_config, gen.tokenizer, ck.settings, gc.gen_config(batch_size=3)
    )
    out.update(moe_ep=_answers(live, reqs), experts_ep=experts(chunks[0]))
    # A replica whose picks disagree (here: rank 1 takes the argmin) must still decode rank 0's
    # tokens in lockstep; forced lengths keep the all-to-alls paired even without that guard.
    import torch.distributed as dist

    from megatron_sail.inference import engine

    real = engine.next_tokens
    if dist.get_rank() == 1:
        engine.next_tokens = lambda logits, *args: real(-logits, *args)
    try:
        forced = generator_from_model(
            chunks,
            ck.model_config,
            gen.tokenizer,
            ck.settings,
            gc.gen_config(batch_size=3, min_new_tokens=gc.MAX_NEW),
        )
        out["moe_ep_forced"] = _answers(forced, reqs)
    finally:
        engine.next_tokens = real
    again = load_generator(paths["mcore_moe"], gc.gen_config(batch_size=3))
    out.update(
        moe_reloaded=_answers(again, reqs),
        experts_reloaded=experts(again.chunks[0]),
        ep_reloaded=ps.get_expert_model_parallel_world_size(),
    )
    return out


def test_tensor_parallel_and_sequence_parallel(assets):
    paths, single = assets
    results = launch(_tp_job, 2, paths, timeout=600)
    moe = single["families"]["qwen3_moe"]["hf"]
    for r in results:
        assert r["plain"] == single["hf"]["hf"]
        assert r["sp"] == single["hf"]["hf"]
        assert r["training_kept"] and not r["grads"]
        assert r["moe_tp"] == moe  # 4 experts, each split over the 2 TP ranks
        assert r["moe_ep"] == moe and r["experts_ep"] == 2  # 2 of 4 experts per EP rank
        # rank 0's greedy tokens on both ranks (answers that ended by length are unforced ones)
        assert r["moe_ep_forced"] == results[0]["moe_ep_forced"]
        by_length = [i for i, (t, b) in enumerate(zip(moe, (gc.MAX_NEW,) * 3 + (6,))) if len(t) == b]
        assert len(by_length) >= 2 and all(r["moe_ep_forced"][i] == moe[i] for i in by_length)
        assert r["moe_reloaded"] == moe and (r["experts_reloaded"], r["ep_reloaded"]) == (4, 1)


def _pp_job(rank, paths):
    """PP=2 (2+2 layers) from the chat folder, then PP=2 x 2 virtual stages on live chunks."""
    gc.set_threads()
    from megatron.core import parallel_state

    from megatron_sail.config.parallel import ParallelConfig
    from megatron_sail.convert import hf_internvl
    from megatron_sail.convert.checkpoint import read_hf_checkpoint
    from megatron_sail.inference import generator_from_model, inspect_checkpoint, load_generator
    from megatron_sail.inference.loading import LoadConfig
    from megatron_sail.models.sail_vl import SailVLModel
    from megatron_sail.platform import distributed

    reqs = gc.requests(paths["images"])
    gen = load_generator(paths["chat"], gc.gen_config(batch_size=4), LoadConfig(pp=2))
    plain = _answers(gen, reqs)
    parallel = ParallelConfig(pp=2, vpp=2)
    distributed.initialize(parallel)
    ck = inspect_checkpoint(paths["chat"])
    full = hf_internvl.hf_to_ours(read_hf_checkpoint(paths["chat"]).state, ck.model_config)
    chunks = []
    for vp in range(2):
        m = SailVLModel(
            ck.model_config,
            parallel,
            vp_stage=vp,
            use_te=False,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
        )
        m.load_state_dict(hf_internvl.shard_for_model(full, m), strict=False)
        chunks.append(m.eval())
    live = generator_from_model(
        chunks, ck.model_config, gen.tokenizer, ck.settings, gc.gen_config(batch_size=2)
    )
    moe = load_generator(paths["sailvl"], gc.gen_config(batch_size=4), LoadConfig(pp=2))
    return {
        "plain": plain,
        "vpp": _answers(live, reqs),
        "layers": [len(c.language_model.decoder.layers) for c in chunks],
        "sailvl_pp": _answers(moe, reqs),
    }  # AIMv2 on stage 0, one MoE layer per stage


def test_pipeline_parallel_and_virtual_stages(assets):
    paths, single = assets
    results = launch(_pp_job, 2, paths, timeout=600)
    for r in results:
        assert r["plain"] == single["chat"]["hf"]
        assert r["vpp"] == single["chat"]["hf"]
        assert r["layers"] == [1, 1]
        assert r["sailvl_pp"] == single["families"]["sailvl"]["hf"]


def test_cli_input_jsonl_matches_api(assets, tmp_path):
    """python -m megatron_sail.generate --input: same tokens as the API; bad lines skipped."""
    import json
    import os
    import subprocess
    import sys

    paths, single = assets
    imgs = paths["images"]
    lines = [
        {"prompt": "Describe this image in detail.", "image": imgs[0], "id": "a"},
        {
            "question": "<image>\nWhat is in the picture? <image>\na red circle on blue",
            "images": [os.path.relpath(imgs[1], tmp_path), imgs[2]],
        },
        {"prompt": 5},
        {"prompt": "What is in the picture?"},
        {"prompt": "a red circle", "image": imgs[2], "max_new_tokens": 6},
    ]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
    out = tmp_path / "out.jsonl"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "megatron_sail.generate",
            "--checkpoint",
            paths["hf"],
            "--input",
            str(src),
            "--output",
            str(out),
            "--max-new-tokens",
            str(gc.MAX_NEW),
            "--max-tiles",
            str(gc.MAX_TILES),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["token_ids"] for r in records] == single["hf"]["hf"]
    assert [r["prompt_ids"] for r in records] == single["hf"]["prompt_ids"]
    assert records[0]["id"] == "a" and records[0]["text"] == single["hf"]["text"][0]
    rejects = [json.loads(x) for x in (tmp_path / "out.jsonl.rejects.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rejects] == [3, 6]
    assert "[1] " + single["hf"]["text"][0] in proc.stdout
    assert "2 skipped" in proc.stderr


def test_cli_under_torchrun_tensor_parallel(assets, tmp_path):
    """torchrun (2 gloo ranks) --tensor-model-parallel-size 2: rank 0 prints and writes the answer."""
    import json
    import os
    import subprocess
    import sys

    from launcher import free_port

    paths, single = assets
    out = tmp_path / "tp.jsonl"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(free_port()),
        "-m",
        "megatron_sail.generate",
        "--checkpoint",
        paths["chat"],
        "--tensor-model-parallel-size",
        "2",
        "--image",
        paths["images"][0],
        "--prompt",
        "Describe this image in detail.",
        "--max-new-tokens",
        str(gc.MAX_NEW),
        "--max-tiles",
        str(gc.MAX_TILES),
        "--output",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [record] = [json.loads(x) for x in out.read_text().splitlines()]
    assert record["token_ids"] == single["chat"]["hf"][0]
    assert proc.stdout.count(record["text"]) == 1  # printed once (rank 0), not per rank
