"""SAIL-VL2's hub layout ('sailvl': AIMv2 tower in Apple's original names) converts both ways.

The fixture is a tiny checkpoint written here in the key names and shapes of the released
SAIL-VL2-2B (model.safetensors.index.json / config.json: ``vision_model.preprocessor.*``,
``vision_model.trunk.blocks.{i}.{attn.qkv,attn.proj,mlp.fc1,fc2,fc3,norm_1,norm_2}``,
``pos_embed`` of shape [1, N, d], ``mlp1.*``, ``language_model.*`` with a stored tied
``lm_head``), in bf16, plus stand-in remote-code files. Checked, in one subprocess:
* our encoder, loaded from it, matches an independent forward written from the AIMv2 remote
  code's semantics (fc1 gate, fc3 up, fc2 down; qkv = [q; k; v] per head) on the raw tensors;
* hf-to-mcore -> mcore-to-hf --layout chat reproduces every tensor (bits and dtype), the
  config.json and the remote-code files byte for byte; the selected-away last layer and final
  norm come back from unused_hf_tensors;
* --layout hf is refused with an error naming the limitation;
* generation's checkpoint inspection reads the hub folder (model config, tiling settings);
* tools/compare_logits.py on the hub folder and the converted checkpoint: logits agree.
"""

import json
import subprocess
import sys

import torch

from testkit import subprocess_env

D, LAYERS, HEADS, FFN, PATCH, IMAGE = 64, 3, 4, 96, 8, 32
LM = dict(
    hidden_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    intermediate_size=160,
)


def hub_config(vocab: int) -> dict:
    """A sailvl config.json with the released SAIL-VL2-2B's fields, tiny shapes, select_layer -2."""
    return {
        "architectures": ["SAILVLModel"],
        "model_type": "sailvl",
        "auto_map": {
            "AutoConfig": "configuration_sailvl.SAILVLConfig",
            "AutoModel": "modeling_sailvl.SAILVLModel",
        },
        "downsample_ratio": 0.5,
        "dynamic_image_size": True,
        "force_image_size": IMAGE,
        "max_dynamic_patch": 6,
        "min_dynamic_patch": 1,
        "use_thumbnail": True,
        "pad2square": False,
        "ps_version": "v2",
        "select_layer": -2,
        "template": "univl-chat",
        "torch_dtype": "bfloat16",
        "vision_config": {
            "architectures": ["SAILViTModel"],
            "model_type": "sailvit",
            "hidden_size": D,
            "intermediate_size": FFN,
            "num_hidden_layers": LAYERS,
            "num_attention_heads": HEADS,
            "num_channels": 3,
            "image_size": IMAGE,
            "patch_size": PATCH,
            "rms_norm_eps": 1e-5,
            "qkv_bias": False,
            "use_bias": False,
        },
        "llm_config": {
            "architectures": ["Qwen3ForCausalLM"],
            "model_type": "qwen3",
            "attention_bias": False,
            "hidden_act": "silu",
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000,
            "max_position_embeddings": 4096,
            "tie_word_embeddings": True,
            "vocab_size": vocab,
            **LM,
        },
    }


def hub_tensors(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random bf16 tensors under the released checkpoint's names and shapes."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.1):
        return (torch.randn(*shape, generator=g) * scale).to(torch.bfloat16)

    n, h, f = (IMAGE // PATCH) ** 2, LM["hidden_size"], LM["intermediate_size"]
    v = "vision_model."
    sd = {
        v + "preprocessor.patchifier.proj.weight": r(D, 3, PATCH, PATCH),
        v + "preprocessor.patchifier.proj.bias": r(D),
        v + "preprocessor.patchifier.norm.weight": 1 + r(D),
        v + "preprocessor.pos_embed": r(1, n, D),
        v + "trunk.post_trunk_norm.weight": 1 + r(D),
    }
    for i in range(LAYERS):
        b = f"{v}trunk.blocks.{i}."
        sd.update(
            {
                b + "norm_1.weight": 1 + r(D),
                b + "norm_2.weight": 1 + r(D),
                b + "attn.qkv.weight": r(3 * D, D),
                b + "attn.proj.weight": r(D, D),
                b + "mlp.fc1.weight": r(FFN, D),
                b + "mlp.fc3.weight": r(FFN, D),
                b + "mlp.fc2.weight": r(D, FFN),
            }
        )
    sd.update(
        {
            "mlp1.0.weight": 1 + r(4 * D),
            "mlp1.0.bias": r(4 * D),
            "mlp1.1.weight": r(h, 4 * D),
            "mlp1.1.bias": r(h),
            "mlp1.3.weight": r(h, h),
            "mlp1.3.bias": r(h),
        }
    )
    lm = "language_model.model."
    q, kv = LM["num_attention_heads"] * LM["head_dim"], LM["num_key_value_heads"] * LM["head_dim"]
    sd[lm + "embed_tokens.weight"] = r(vocab, h)
    sd[lm + "norm.weight"] = 1 + r(h)
    sd["language_model.lm_head.weight"] = sd[lm + "embed_tokens.weight"].clone()  # stored although tied
    for i in range(LM["num_hidden_layers"]):
        b = f"{lm}layers.{i}."
        sd.update(
            {
                b + "input_layernorm.weight": 1 + r(h),
                b + "post_attention_layernorm.weight": 1 + r(h),
                b + "self_attn.q_proj.weight": r(q, h),
                b + "self_attn.k_proj.weight": r(kv, h),
                b + "self_attn.v_proj.weight": r(kv, h),
                b + "self_attn.o_proj.weight": r(h, q),
                b + "self_attn.q_norm.weight": 1 + r(LM["head_dim"]),
                b + "self_attn.k_norm.weight": 1 + r(LM["head_dim"]),
                b + "mlp.gate_proj.weight": r(f, h),
                b + "mlp.up_proj.weight": r(f, h),
                b + "mlp.down_proj.weight": r(h, f),
            }
        )
    return sd


def aimv2_reference(sd: dict, tiles: torch.Tensor, layers: int, eps: float = 1e-5) -> torch.Tensor:
    """The AIMv2 remote code's forward, from its documented semantics, on hub-named tensors (fp32):
    conv patchify -> RMSNorm -> + pos_embed; per block x += proj(attn(norm_1 x)) with qkv viewed
    as [B, N, 3, heads, hd]; x += fc2(silu(fc1 y) * fc3 y), y = norm_2 x; hidden state after
    ``layers`` blocks (post_trunk_norm only when all blocks run)."""
    w = {k[len("vision_model.") :]: t.float() for k, t in sd.items() if k.startswith("vision_model.")}

    def rms(x, weight):
        return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    x = torch.nn.functional.conv2d(
        tiles, w["preprocessor.patchifier.proj.weight"], w["preprocessor.patchifier.proj.bias"], stride=PATCH
    )
    x = rms(x.flatten(2).transpose(1, 2), w["preprocessor.patchifier.norm.weight"])
    x = x + w["preprocessor.pos_embed"]
    b, n, _ = x.shape
    for i in range(layers):
        p = f"trunk.blocks.{i}."
        qkv = (rms(x, w[p + "norm_1.weight"]) @ w[p + "attn.qkv.weight"].T).reshape(b, n, 3, HEADS, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, D)
        x = x + a @ w[p + "attn.proj.weight"].T
        y = rms(x, w[p + "norm_2.weight"])
        gate, up = y @ w[p + "mlp.fc1.weight"].T, y @ w[p + "mlp.fc3.weight"].T
        x = x + (torch.nn.functional.silu(gate) * up) @ w[p + "mlp.fc2.weight"].T
    return rms(x, w["trunk.post_trunk_norm.weight"]) if layers == LAYERS else x


_SCRIPT = r"""
import json
from pathlib import Path
import torch
import convert_checkpoint as c
import test_convert_sailvl as t
from megatron_sail.convert import checkpoint as ck, hf_internvl
src, mc, back = Path({src!r}), Path({mc!r}), Path({back!r})
assert c.main(["hf-to-mcore", "--hf-dir", str(src), "--out", str(mc)]) == 0
assert c.main(["mcore-to-hf", "--mcore-dir", str(mc), "--out", str(back), "--layout", "chat"]) == 0
try:
    c.main(["mcore-to-hf", "--mcore-dir", str(mc), "--out", str(back) + "_hf"])
    refusal = None
except ValueError as e:
    refusal = str(e)
hf = ck.read_hf_checkpoint(src)
cfg = ck.checkpoint_model_config(hf)
[model] = ck.build_model_chunks(cfg, ck.ParallelConfig(), use_te=False)
hf_internvl.load_hf_into(model, {{k: v.float() for k, v in hf.state.items()}}, cfg)
tiles = torch.randn(2, 3, t.IMAGE, t.IMAGE, generator=torch.Generator().manual_seed(3))
raw = ck.hf_io.read_state_dict(src)
with torch.no_grad():
    err = (model.vision_model(tiles) - t.aimv2_reference(raw, tiles, cfg.vision.layers_used)).abs().max().item()
from megatron_sail.inference.loading import inspect_checkpoint
ins = inspect_checkpoint(src)
import contextlib, io
import compare_logits
log = io.StringIO()
with contextlib.redirect_stdout(log):
    status = compare_logits.main(["--hf-dir", str(src), "--mcore-dir", str(mc), "--max-tiles", "2"])
compare = log.getvalue().strip().splitlines()[-1]
print("RESULT" + json.dumps(dict(refusal=refusal, err=err, family=cfg.vision.family,
      inspect_same=ins.model_config == cfg, inspect_tiles=ins.settings.max_tiles,
      compare_status=status, compare=compare,
      lm=cfg.language.family, layers_used=cfg.vision.layers_used, tokens=cfg.tokens_per_tile())))
"""


def test_sailvl_layout_parity_and_bit_exact_round_trip(tmp_path):
    from megatron_sail.convert import hf_io
    from test_convert_layouts import tiny  # tools/make_tiny_hf_checkpoint.py (tiny BPE tokenizer)

    src, mc, back = tmp_path / "src", tmp_path / "mc", tmp_path / "back"
    src.mkdir()
    image_id = tiny.write_tokenizer(src, 320)
    sd = hub_tensors(320)
    hf_io.write_safetensors(src, sd, max_shard_bytes=400_000)  # sharded, as the hub's
    config = hub_config(320)
    (src / "config.json").write_text(json.dumps(config, indent=2))
    remote = {
        "modeling_sailvl.py": "# stand-in for the hub's remote code\n",
        "configuration_sailvit.py": "# stand-in\n",
        "conversation.py": "# stand-in\n",
    }
    for name, text in remote.items():
        (src / name).write_text(text)
    code = _SCRIPT.format(src=str(src), mc=str(mc), back=str(back))
    proc = subprocess.run(
        [sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(proc.stdout.split("RESULT")[-1])
    assert (res["family"], res["lm"], res["layers_used"], res["tokens"]) == ("aimv2", "qwen3", 2, 4)
    assert res["err"] < 1e-4, res["err"]  # names -> semantics are right (fc1/fc3/fc2, qkv order)
    assert res["inspect_same"] and res["inspect_tiles"] == 6  # generation reads the hub folder too
    # tools/compare_logits.py: transformers' parts composed (Aimv2VisionModel, InternVL's shuffle
    # and projector, Qwen3ForCausalLM) vs our model from the converted checkpoint
    diff = float(res["compare"].split("max_abs_logit_diff=")[1].split()[0])
    assert res["compare_status"] == 0 and diff < 1e-3, res["compare"]
    assert "cannot hold a 'aimv2' vision tower" in res["refusal"] and "--layout chat" in res["refusal"]
    assert (mc / "unused_hf_tensors.safetensors").is_file()  # block 2 and post_trunk_norm
    got = hf_io.read_state_dict(back)
    assert sorted(got) == sorted(sd)
    for key, value in sd.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key
    assert json.loads((back / "config.json").read_text()) == config
    for name, text in remote.items():
        assert (back / name).read_text() == text
    assert hf_io.find_added_token_id(back, "<IMG_CONTEXT>") == image_id


def test_sailvl_config_maps_to_our_config_and_back_after_a_shape_change():
    """config.json -> ModelConfig; a resized vocabulary rewrites only the shape fields."""
    import dataclasses

    import pytest

    from megatron_sail.convert import sailvl_layout as S

    stored = hub_config(320)
    cfg = S.model_config(stored, image_token_id=311)
    v, lm = cfg.vision, cfg.language
    assert (v.family, v.hidden_size, v.num_layers, v.select_layer, v.layers_used, v.norm_eps) == (
        "aimv2",
        D,
        LAYERS,
        -2,
        2,
        1e-5,
    )
    assert (lm.family, lm.head_dim, lm.qkv_bias, lm.tie_embeddings, cfg.img_context_token_id) == (
        "qwen3",
        32,
        False,
        True,
        311,
    )
    bigger = dataclasses.replace(cfg, language=dataclasses.replace(lm, vocab_size=384))
    fresh = S.config_for(bigger, stored)
    assert S.model_config(fresh, 311) == bigger
    assert fresh["auto_map"] == stored["auto_map"] and fresh["template"] == "univl-chat"
    assert stored["llm_config"]["vocab_size"] == 320  # the stored config is not modified
    # SAIL-VL-1.6-8B's flavour: model_type internvl_chat around Apple's aimv2 vision_config
    v16 = {
        **stored,
        "model_type": "internvl_chat",
        "template": "sailvl-chat",
        "vision_config": {**stored["vision_config"], "model_type": "aimv2"},
    }
    assert S.is_sailvl_config(v16) and S.model_config(v16, 311) == cfg
    assert not S.is_sailvl_config({**v16, "vision_config": {"model_type": "intern_vit_6b"}})
    with pytest.raises(ValueError, match="qkv_bias=true is not supported"):
        S.model_config({**stored, "vision_config": {**stored["vision_config"], "qkv_bias": True}}, 311)
    with pytest.raises(ValueError, match="not an AIMv2-layout tower"):
        S.model_config(
            {**stored, "vision_config": {**stored["vision_config"], "model_type": "intern_vit_6b"}}, 311
        )
