"""Single-rank model behaviour: parity with transformers' InternVL, packing, text-only, freeze.

All checks run in one spawned process (the CPU backend patches torch process-wide) and report
numbers that the tests below assert on.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile

import pytest
import torch

import model_cases as mc
from launcher import launch

VARIANTS = ("base", "mha_untied_rms", "mqa", "qwen3", "qwen3_moe", "qwen3_moe_pre_softmax")
MOE = ("qwen3_moe", "qwen3_moe_pre_softmax")


def _variant(name: str):
    """model_cases' variants, plus Qwen3-MoE without top-k renormalization (norm_topk_prob
    False: softmax over all experts, then top-k; Megatron's moe_router_pre_softmax)."""
    if name == "qwen3_moe_pre_softmax":
        cfg = mc.variant("qwen3_moe")
        return dataclasses.replace(cfg, language=dataclasses.replace(cfg.language, moe_norm_topk_prob=False))
    return mc.variant(name)


def _saved_state(hf) -> dict:
    """The model's tensors as ``save_pretrained`` writes them (one tensor per expert for MoE),
    under module keys: what the converters read from a checkpoint folder."""
    from megatron_sail.convert import hf_io

    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        return hf_io.to_module_keys(hf_io.read_state_dict(d))


def _hf_parity(cfg, hf, ours):
    """Max |logit diff| vs transformers for single samples: 1 tile at the trained size, several
    images with multi-tile grids, and a 48 px tile (interpolated position embeddings)."""
    errs = {}
    cases = {
        "one_tile": ([5, 6], [1], 32),
        "multi_image": ([3, 4, 2], [3, 1], 32),
        "tile48": ([4, 3], [2], 48),
        "text_only": ([9], [], 32),
    }
    for name, (texts, imgs, tile) in cases.items():
        ids, tiles = mc.sample(cfg, texts, imgs, tile, seed=len(name))
        with torch.no_grad():
            ref = hf(input_ids=ids[None], pixel_values=tiles if imgs else None).logits
            got = ours(ids[None], tiles)
        errs[name] = (ref - got).abs().max().item()
    return errs


def _packing(cfg, ours):
    """Packed row vs each sample alone, over the real tokens: max |logit diff| and max |diff| of
    the rotated queries and keys entering the first LM layer's core attention.

    RoPE is relative, so logits alone barely move if positions ran on across samples instead of
    restarting (q.k depends on m - n only); the rotated q/k themselves differ, by the rotation
    of the sample's offset, unless the positions restart at its cu_seqlens boundary."""
    samples = [
        mc.sample(cfg, [3, 4], [2], 32, 11),
        mc.sample(cfg, [6], [], 32, 12),
        mc.sample(cfg, [2, 2], [1], 32, 13),
    ]
    ids, tiles, cu = mc.pack(samples, length=40)
    seen = []
    attn = ours.language_model.decoder.layers[0].self_attention.core_attention
    hook = attn.register_forward_pre_hook(lambda _m, args: seen.append((args[0], args[1])))
    try:
        with torch.no_grad():
            packed = ours(ids, tiles, cu_seqlens=cu)[0]
            (q_packed, k_packed), err, qk_err, start = seen.pop(), 0.0, 0.0, 0
            for s_ids, s_tiles in samples:
                alone = ours(s_ids[None], s_tiles)[0]
                q, k = seen.pop()
                err = max(err, (packed[start : start + len(s_ids)] - alone).abs().max().item())
                span = slice(start, start + len(s_ids))
                qk_err = max(
                    qk_err, (q_packed[span] - q).abs().max().item(), (k_packed[span] - k).abs().max().item()
                )
                start += len(s_ids)
    finally:
        hook.remove()
    return {"logits": err, "qk": qk_err}


def _text_only_grads(cfg, ours):
    """Text-only batch: loss backward must give every trainable parameter a gradient."""
    ours.zero_grad(set_to_none=True)
    ids = torch.randint(0, cfg.img_context_token_id, (2, 12))
    loss = ours(ids, torch.zeros(0, 3, 32, 32), labels=ids)
    loss.sum().backward()
    missing = [n for n, p in ours.named_parameters() if p.requires_grad and p.grad is None]
    vit_zero = all(p.grad.abs().sum() == 0 for p in ours.vision_model.parameters())
    return {"missing": missing, "vit_grads_zero": bool(vit_zero), "loss_shape": tuple(loss.shape)}


def _freeze_step(cfg, ours):
    """Freeze ViT + LM, take an Adam step on an image batch: frozen weights must not move."""
    ours.train()
    ours.freeze(vision=True, projector=False, language=True)
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    trainable = [p for p in ours.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1)
    ids, tiles = mc.sample(cfg, [4, 4], [2], 32, 21)
    ours(ids[None], tiles, labels=ids[None]).sum().backward()
    opt.step()
    moved = {n for n, p in ours.named_parameters() if not torch.equal(p, before[n])}
    ours.freeze()  # unfreeze all again
    return {"moved": sorted(moved), "n_trainable": len(trainable)}


def _mismatch_error(cfg, ours):
    """The error raised when <IMG_CONTEXT> count and tiles disagree."""
    ids, tiles = mc.sample(cfg, [4, 4], [2], 32, 31)
    try:
        ours(ids[None], tiles[:1])
    except ValueError as e:
        return str(e)
    return None


def _leaves(tree) -> list:
    """The sharded tensors of a nested dict/list (what a ShardedTensorFactory builds)."""
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in _leaves(v)]
    if isinstance(tree, (list, tuple)):
        return [t for v in tree for t in _leaves(v)]
    return [tree]


def _all_checks(rank):
    """Every single-rank check, for every variant."""
    from megatron_sail.config.parallel import ParallelConfig
    from megatron_sail.convert.hf_internvl import (
        from_transformers_params,
        load_hf_into,
        ours_to_hf,
        to_transformers_params,
    )
    from megatron_sail.platform import distributed as D

    D.initialize(ParallelConfig())
    out, built = {}, {}
    for name in VARIANTS:
        cfg = _variant(name)
        hf = mc.hf_model(cfg, seed=3)
        ours = mc.build_ours(cfg).eval()
        hf_sd = _saved_state(hf)
        load_hf_into(ours, hf_sd, cfg)
        back = ours_to_hf(ours.state_dict(), cfg)
        res = {
            "hf": _hf_parity(cfg, hf, ours),
            "packing": _packing(cfg, ours),
            "roundtrip_missing": sorted(set(hf_sd) - set(back)),
            "roundtrip_equal": all(torch.equal(back[k], v) for k, v in hf_sd.items() if k in back),
            "mismatch": _mismatch_error(cfg, ours),
        }
        sharded = ours.sharded_state_dict()
        res["sharded"] = {
            k: (tuple(v.global_shape), v.replica_id) for k, v in sharded.items() if hasattr(v, "global_shape")
        }
        if name in MOE:
            memory, mem_back = hf.state_dict(), to_transformers_params(back, cfg)
            split = from_transformers_params(memory, cfg)
            res["memory"] = {  # our fused <-> per-expert conversion is transformers' own
                "saved_is_split": set(split) == set(hf_sd)
                and all(torch.equal(split[k], v) for k, v in hf_sd.items()),
                "export_is_memory": set(mem_back) == set(memory)
                and all(torch.equal(mem_back[k], v) for k, v in memory.items()),
            }
            res["params"] = sorted(k for k in ours.state_dict() if not k.endswith("_extra_state"))
            res["local_numel"] = {
                k: math.prod(v.local_shape) for k, v in sharded.items() if hasattr(v, "local_shape")
            }
            # a SwiGLU fc1 is a factory (TP splits gate and up apart): its built tensors
            res["factories"] = {
                k: [tuple(t.global_shape) for t in _leaves(v.build())]
                for k, v in sharded.items()
                if hasattr(v, "build")
            }
            res["local_numel"].update({k: sharded[k].data.numel() for k in res["factories"]})
            res["param_numel"] = sum(p.numel() for p in ours.parameters())
            built[name] = (cfg, hf, ours)
        if name == "base":
            res["text_only"] = _text_only_grads(cfg, ours)
            res["freeze"] = _freeze_step(cfg, ours)
        out[name] = res
    cfg, _, ours = built["qwen3_moe"]  # renormalized routing against transformers without it
    out["misrouted"] = _hf_parity(cfg, built["qwen3_moe_pre_softmax"][1], ours)
    return out


@pytest.fixture(scope="module")
def checks():
    """Results of all single-rank checks (one spawned process)."""
    return launch(_all_checks, 1, timeout=600)[0]


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_transformers(checks, variant):
    errs = checks[variant]["hf"]
    assert set(errs) == {"one_tile", "multi_image", "tile48", "text_only"}
    for case, err in errs.items():
        assert err < 1e-4, f"{variant}/{case}: max |logit diff| {err}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_packed_equals_unpacked(checks, variant):
    """Logits and rotated q/k of every sample are the same packed after others as alone: no
    attention across samples, and RoPE positions restart at each sample (no position ids)."""
    assert checks[variant]["packing"]["logits"] < 1e-4
    assert checks[variant]["packing"]["qk"] < 1e-5


@pytest.mark.parametrize("variant", VARIANTS)
def test_state_dict_round_trip_is_exact(checks, variant):
    cfg = _variant(variant)
    # only ViT layers after select_layer (never computed, so never built) may be absent
    unused = [f"encoder.layer.{i}." for i in range(cfg.vision.layers_used, cfg.vision.num_layers)]
    missing = checks[variant]["roundtrip_missing"]
    assert all(any(u in k for u in unused) for k in missing), missing
    assert bool(missing) == bool(unused)
    assert checks[variant]["roundtrip_equal"]


def test_image_token_mismatch_is_a_clear_error(checks):
    msg = checks["base"]["mismatch"]
    assert msg is not None and "image token count mismatch" in msg and "8" in msg and "4" in msg


def test_text_only_batch_gives_every_param_a_grad(checks):
    t = checks["base"]["text_only"]
    assert t["loss_shape"] == (2, 12)
    assert t["missing"] == []
    assert t["vit_grads_zero"]  # the anchor only makes grads exist; it does not change them


def test_freeze_keeps_frozen_params_bit_identical(checks):
    f = checks["base"]["freeze"]
    assert f["moved"], "nothing trained"
    assert all(n.startswith("projector.") for n in f["moved"]), f["moved"]
    assert {"projector.linear_1.weight", "projector.linear_2.weight"} <= set(f["moved"])


def test_sharded_state_dict_covers_every_weight(checks):
    sharded = checks["mha_untied_rms"]["sharded"]
    cfg = mc.variant("mha_untied_rms")
    assert sharded["vision_model.position_embedding"][0] == (1, 17, cfg.vision.hidden_size)
    assert sharded["vision_model.encoder.layers.0.self_attention.q_layernorm.weight"][0] == (
        cfg.vision.layers_used,
        cfg.vision.hidden_size,
    )
    assert "projector.linear_1.weight" in sharded
    assert "language_model.output_layer.weight" in sharded  # untied
    assert sharded["language_model.embedding.word_embeddings.weight"][0] == (
        cfg.language.vocab_size,
        cfg.language.hidden_size,
    )


def test_moe_routings_differ_visibly_on_these_weights(checks):
    """Renormalized top-k against transformers' plain top-k moves the logits by far more than
    the parity tolerance, so the parity of each MoE variant checks its router mapping."""
    assert min(checks["misrouted"].values()) > 1e-2, checks["misrouted"]


@pytest.mark.parametrize("variant", MOE)
def test_moe_expert_tensors_match_transformers_in_memory_and_on_disk(checks, variant):
    """save_pretrained's per-expert tensors are our split of transformers' fused experts, and
    our export fuses back to exactly the parameters transformers holds."""
    assert checks[variant]["memory"] == {"saved_is_split": True, "export_is_memory": True}


@pytest.mark.parametrize("variant", MOE)
def test_moe_sharded_state_dict_covers_every_weight(checks, variant):
    c, lm = checks[variant], _variant(variant).language
    sharded, factories = c["sharded"], c["factories"]
    missing = [k for k in c["params"] if k not in sharded and k not in factories]
    assert not missing, missing
    assert sum(c["local_numel"].values()) == c["param_numel"]  # TP=1: each weight once, whole
    e, ffn, h, layers = lm.num_experts, lm.expert_ffn_hidden_size, lm.hidden_size, lm.num_layers
    # one global tensor over layers and experts each (any EP/TP layout loads a slice of it)
    fc1 = factories["language_model.decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight"]
    assert fc1 == [(layers, e, 2 * ffn, h)] * 2, fc1  # the gate rows and the up rows of it
    fc2 = sharded["language_model.decoder.layers.1.mlp.experts.local_experts.3.linear_fc2.weight"]
    assert fc2[0] == (layers, e, h, ffn)
    assert sharded["language_model.decoder.layers.0.mlp.router.weight"][0] == (layers, e, h)
