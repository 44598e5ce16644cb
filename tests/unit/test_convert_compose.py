"""convert_checkpoint.py compose: separate encoder + LLM folders -> a trainable dist checkpoint.

Tiny parts are written with tools/make_tiny_hf_parts.py (InternViT remote-code folder,
transformers Aimv2VisionModel, Qwen2 / Qwen3 / Qwen3-MoE causal LMs with a Qwen-like tokenizer
that lacks the image tokens). All compose runs and every check that needs the Megatron model
run in one subprocess (one interpreter and one process group); it writes a JSON report that the
tests below assert on:
* every encoder / LM tensor read back from the dist checkpoint equals the source's bit for bit;
* the composed model's logits on text-only ids equal transformers' causal LM on the same ids;
* its encoder features equal the reference on the same pixels (InternViT: a forward written
  here from InternVisionModel's semantics on the raw tensors; AIMv2: transformers'
  Aimv2VisionModel);
* the tokenizer holds <img>, </img>, <IMG_CONTEXT> with the recorded ids, old ids unchanged;
* a tokenizer larger than the embedding grows it (new rows = mean) to a multiple of 128;
* the projector is Megatron's seeded init (or --projector-from's tensors);
* unsupported folders and recipe mismatches fail with messages naming the supported types.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from testkit import ROOT, subprocess_env

CASES = {  # name: (vision part, LM part, LM vocab rows, tied, compose flags)
    "vit_qwen2": ("internvit", "qwen2", 512, True, ["--recipe", "tiny"]),
    "aimv2_qwen3": ("aimv2", "qwen3", 300, False, ["--select-layer", "-1", "--seed", "7"]),
    "vit_moe": ("internvit", "qwen3_moe", 512, False, ["--projector-from", "{projector}"]),
    "siglip_qwen2": ("siglip", "qwen2", 512, True, ["--odd-grid", "pad"]),  # 4x4: pads nothing
}


def internvit_reference(sd: dict, cfg: dict, pixels: torch.Tensor) -> torch.Tensor:
    """InternVisionModel's forward on its own tensors (class token dropped): patch conv, class
    token, positions, then per layer x + ls1 * attn(norm1(x)), x + ls2 * mlp(norm2(x)) with the
    fused qkv rows ordered [q; k; v], each split into heads."""
    d, heads, eps = cfg["hidden_size"], cfg["num_attention_heads"], cfg["layer_norm_eps"]
    x = F.conv2d(
        pixels,
        sd["embeddings.patch_embedding.weight"],
        sd["embeddings.patch_embedding.bias"],
        stride=cfg["patch_size"],
    )
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd["embeddings.class_embedding"].expand(x.size(0), 1, d), x], 1)
    x = x + sd["embeddings.position_embedding"]
    b, n, _ = x.shape
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layers.{i}."
        h = F.layer_norm(x, (d,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps)
        qkv = F.linear(h, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"])
        q, k, v = qkv.reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + sd[p + "ls1"] * F.linear(a, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        h = F.layer_norm(x, (d,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps)
        h = F.linear(
            F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
            sd[p + "mlp.fc2.weight"],
            sd[p + "mlp.fc2.bias"],
        )
        x = x + sd[p + "ls2"] * h
    return x[:, 1:]


def _source_tensors(vision: Path, lm: Path) -> dict:
    """The sources' tensors under the names our export (ours_to_hf) gives them."""
    from megatron_sail.convert import hf_io, internvl_chat

    raw_v, raw_l = hf_io.read_state_dict(vision), hf_io.read_state_dict(lm)
    if hf_io.read_config(vision)["model_type"] == "intern_vit_6b":
        want = internvl_chat.chat_to_hf_state_dict({"vision_model." + k: v for k, v in raw_v.items()})
    else:
        want = {"model.vision_tower." + k: v for k, v in raw_v.items() if not k.startswith("head.")}
    want.update({"model.language_model." + k[6:]: v for k, v in raw_l.items() if k.startswith("model.")})
    if "lm_head.weight" in raw_l:
        want["lm_head.weight"] = raw_l["lm_head.weight"]
    return want


def _check(name: str, vision: Path, lm: Path, mc: Path, tied: bool) -> dict:
    """Load the composed checkpoint and measure everything the tests assert."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_sail.checkpoint import dcp
    from megatron_sail.checkpoint.layout import read_model_config
    from megatron_sail.config.parallel import ParallelConfig
    from megatron_sail.convert import checkpoint, hf_internvl, hf_io
    from megatron_sail.data.tokenizer import load_tokenizer

    cfg = read_model_config(mc)
    checkpoint._single_rank()
    [model] = checkpoint.build_model_chunks(cfg, ParallelConfig(), use_te=False)
    dcp.load_model([model], mc)
    model.eval()
    ours = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    got = hf_internvl.ours_to_hf(ours, cfg)
    src_rows = hf_io.read_config(lm)["vocab_size"]
    report = {
        "cfg": {
            "vocab": cfg.language.vocab_size,
            "ctx": cfg.img_context_token_id,
            "family": [cfg.vision.family, cfg.language.family],
            "tied": cfg.language.tie_embeddings,
            "odd_grid": cfg.projector.odd_grid,
        },
        "mismatch": [],
        "grown_rows_are_mean": None,
    }
    for key, value in _source_tensors(vision, lm).items():
        mine = got[key]
        if key.endswith("embed_tokens.weight") or key == "lm_head.weight":
            if mine.shape[0] > value.shape[0]:
                mean = value.double().mean(0).float()
                report["grown_rows_are_mean"] = bool(
                    torch.equal(mine[value.shape[0] :], mean.expand_as(mine[value.shape[0] :]))
                )
            mine = mine[: value.shape[0]]
        if mine.dtype != value.dtype or not torch.equal(mine, value):
            report["mismatch"].append(key)
    ids = torch.tensor([[1, 5, 17, 42, 99, 7, 250, 3, 11, 64]])
    ref_lm = AutoModelForCausalLM.from_pretrained(str(lm)).eval()
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref_lm(input_ids=ids).logits[..., :src_rows]
        mine = model(ids)[..., :src_rows]
        report["logit_diff"] = float((mine - want).abs().max())
        feats = model.vision_model(pixels)
        if cfg.vision.family == "internvit":
            ref = internvit_reference(hf_io.read_state_dict(vision), hf_io.read_config(vision), pixels)
        else:
            import transformers

            cls = {"aimv2": "Aimv2VisionModel", "siglip": "SiglipVisionModel"}[cfg.vision.family]
            ref = (
                getattr(transformers, cls)
                .from_pretrained(str(vision))
                .eval()(pixel_values=pixels)
                .last_hidden_state
            )
        report["feature_diff"] = float((feats - ref).abs().max())
        report["feature_shape"] = list(feats.shape)
    proj = {k[len("projector.") :]: v for k, v in ours.items() if k.startswith("projector.")}
    report["projector"] = {
        k: {
            "mean": float(v.mean()),
            "std": float(v.std()) if v.numel() > 1 else 0.0,
            "first": float(v.flatten()[0]),
        }
        for k, v in proj.items()
    }
    tok = AutoTokenizer.from_pretrained(str(mc / "tokenizer"))
    src_tok = AutoTokenizer.from_pretrained(str(lm))
    data_tok = load_tokenizer(str(mc / "tokenizer"))
    text = "a red circle on a blue square"
    report["tokens"] = {
        t: tok.convert_tokens_to_ids(t)
        for t in ("<img>", "</img>", "<IMG_CONTEXT>", "<|im_start|>", "<|im_end|>", "<|endoftext|>")
    }
    report["source_size"] = len(src_tok)
    report["same_text_ids"] = tok.encode(text) == src_tok.encode(text)
    report["data_tokenizer"] = {
        "added": data_tok.added,
        "ctx": data_tok.special.img_context,
        "vocab": data_tok.vocab_size,
    }
    report["conversion"] = json.loads((mc / "conversion.json").read_text())
    report["processor"] = json.loads((mc / "processor.json").read_text())
    report["files"] = sorted(p.name for p in mc.iterdir())
    return report


def _errors(root: Path, parts: dict) -> dict:
    """Messages of the refused compositions."""
    import convert_checkpoint as c

    out = {}
    trials = {
        "vision_is_lm": [parts["qwen2"], parts["qwen2"]],
        "lm_is_vision": [parts["internvit"], parts["internvit"]],
        "recipe_mismatch": [parts["aimv2"], parts["qwen2"], "--recipe", "tiny"],
        "image_size": [parts["internvit"], parts["qwen2"], "--image-size", "448"],
    }
    for name, (v, lm, *flags) in trials.items():
        try:
            c.main(
                [
                    "compose",
                    "--vision-hf",
                    str(v),
                    "--language-hf",
                    str(lm),
                    "--out",
                    str(root / f"bad_{name}"),
                    *flags,
                ]
            )
            out[name] = "no error"
        except (ValueError, FileNotFoundError) as e:
            out[name] = str(e)
        out[name + "_out_exists"] = (root / f"bad_{name}").exists()
    return out


def run_all(root: str) -> None:
    """Subprocess body: write the parts, compose every case, measure, dump report.json."""
    from safetensors.torch import save_file

    import convert_checkpoint as c
    from megatron_sail.demo import tiny_parts as parts_tool

    root = Path(root)
    parts = {}
    for part, rows, tied, size in (
        ("internvit", 0, True, 300),
        ("aimv2", 0, True, 300),
        ("qwen2", 512, True, 300),
        ("qwen3", 300, False, 300),
        ("qwen3_moe", 512, False, 300),
        ("siglip", 0, True, 300),
    ):
        parts[part] = parts_tool.make_part(
            root / part,
            parts_tool.TinyPartConfig(
                part=part, seed=len(parts), vocab_size=rows or 512, tokenizer_size=size, tied=tied
            ),
        )
    g = torch.Generator().manual_seed(5)
    projector = {
        "mlp1.0.weight": 1 + 0.1 * torch.randn(256, generator=g),
        "mlp1.0.bias": torch.randn(256, generator=g),
        "mlp1.1.weight": torch.randn(128, 256, generator=g),
        "mlp1.1.bias": torch.randn(128, generator=g),
        "mlp1.3.weight": torch.randn(128, 128, generator=g),
        "mlp1.3.bias": torch.randn(128, generator=g),
    }
    save_file(projector, str(root / "projector.safetensors"))
    report = {"projector_source": {k: float(v.flatten()[0]) for k, v in projector.items()}}
    for name, (vis, lm, _, tied, flags) in CASES.items():
        flags = [f.format(projector=root / "projector.safetensors") for f in flags]
        assert (
            c.main(
                [
                    "compose",
                    "--vision-hf",
                    str(parts[vis]),
                    "--language-hf",
                    str(parts[lm]),
                    "--out",
                    str(root / name),
                    *flags,
                ]
            )
            == 0
        )
        report[name] = _check(name, parts[vis], parts[lm], root / name, tied)
    assert (
        c.main(
            [
                "compose",
                "--vision-hf",
                str(parts["internvit"]),
                "--language-hf",
                str(parts["qwen2"]),
                "--out",
                str(root / "seed2"),
                "--seed",
                "2",
            ]
        )
        == 0
    )
    report["seed2"] = _check("seed2", parts["internvit"], parts["qwen2"], root / "seed2", True)["projector"]
    report["errors"] = _errors(root, parts)
    report["root"] = str(root)
    (root / "report.json").write_text(json.dumps(report, indent=1))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("compose")
    code = f"import test_convert_compose as t; t.run_all({str(root)!r})"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=400, env=subprocess_env()
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((root / "report.json").read_text())


@pytest.mark.parametrize("case", list(CASES))
def test_encoder_and_lm_tensors_are_the_sources_bit_for_bit(report, case):
    r = report[case]
    assert r["mismatch"] == []
    vis, lm, _, tied, _ = CASES[case]
    assert r["cfg"]["family"] == [vis, lm]
    assert r["cfg"]["odd_grid"] == ("pad" if "--odd-grid" in CASES[case][4] else "error")
    assert r["cfg"]["tied"] == tied
    assert {
        "metadata.json",
        "model_config.yaml",
        "processor.json",
        "manifest.json",
        "conversion.json",
        "tokenizer",
    } <= set(r["files"])


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_features_equal_the_references(report, case):
    r = report[case]
    assert r["logit_diff"] < 1e-4, r["logit_diff"]
    assert r["feature_diff"] < 1e-4, r["feature_diff"]
    assert r["feature_shape"] == [2, 16, 64]  # 32 px tiles, patch 8, class token dropped


@pytest.mark.parametrize("case", list(CASES))
def test_tokenizer_gets_the_template_tokens_with_the_recorded_ids(report, case):
    r = report[case]
    size = r["source_size"]
    # Qwen-like source: <|endoftext|>, <|im_start|>, <|im_end|> present; the three image tokens
    # follow in InternVL's order, and the model's <IMG_CONTEXT> id is the tokenizer's
    assert [r["tokens"][t] for t in ("<img>", "</img>", "<IMG_CONTEXT>")] == [size, size + 1, size + 2]
    assert r["tokens"]["<|im_end|>"] == size - 1
    assert r["cfg"]["ctx"] == size + 2
    assert r["same_text_ids"]
    assert r["data_tokenizer"]["added"] == [] and r["data_tokenizer"]["ctx"] == size + 2
    assert r["conversion"]["added_tokens"] == ["<img>", "</img>", "<IMG_CONTEXT>"]
    assert r["cfg"]["vocab"] >= r["data_tokenizer"]["vocab"]
    assert r["processor"]["tile_size"] == 32 and r["processor"]["tokens_per_tile"] == 4


def test_a_tokenizer_larger_than_the_embedding_grows_it_with_mean_rows(report):
    grown, plain = report["aimv2_qwen3"], report["vit_qwen2"]
    assert grown["cfg"]["vocab"] == 384  # 300 rows, 304 ids (+<video>) -> next multiple of 128
    assert grown["conversion"]["vocab_rows_added"] == 84
    assert grown["grown_rows_are_mean"] is True
    assert plain["cfg"]["vocab"] == 512 and plain["conversion"]["vocab_rows_added"] == 0
    assert plain["grown_rows_are_mean"] is None


def test_projector_is_seeded_megatron_init_or_the_given_tensors(report):
    fresh, other, given = report["vit_qwen2"]["projector"], report["seed2"], report["vit_moe"]["projector"]
    assert fresh["layer_norm.weight"]["mean"] == 1.0 and fresh["layer_norm.weight"]["std"] == 0.0
    for b in ("layer_norm.bias", "linear_1.bias", "linear_2.bias"):
        assert fresh[b]["mean"] == 0.0 and fresh[b]["std"] == 0.0
    assert abs(fresh["linear_1.weight"]["std"] - 0.02) < 0.002  # init_method_std
    assert abs(fresh["linear_2.weight"]["std"] - 0.01) < 0.001  # 0.02 / sqrt(2 * 2 LM layers)
    assert report["vit_qwen2"]["conversion"]["projector"] == {"init": "megatron", "seed": 1234}
    for w in ("linear_1.weight", "linear_2.weight"):
        assert other[w]["first"] != fresh[w]["first"]  # another seed, another init
    names = {
        "layer_norm.weight": "mlp1.0.weight",
        "layer_norm.bias": "mlp1.0.bias",
        "linear_1.weight": "mlp1.1.weight",
        "linear_1.bias": "mlp1.1.bias",
        "linear_2.weight": "mlp1.3.weight",
        "linear_2.bias": "mlp1.3.bias",
    }
    for ours, theirs in names.items():
        assert given[ours]["first"] == pytest.approx(report["projector_source"][theirs], abs=0)


def test_unsupported_folders_and_mismatches_are_refused_by_name(report):
    e = report["errors"]
    assert "vision model_type 'qwen2' is not supported" in e["vision_is_lm"]
    assert "intern_vit_6b" in e["vision_is_lm"] and "aimv2_vision_model" in e["vision_is_lm"]
    assert "language model_type 'intern_vit_6b' is not supported" in e["lm_is_vision"]
    assert "Qwen3MoeForCausalLM" in e["lm_is_vision"]
    assert "recipe 'tiny'" in e["recipe_mismatch"] and "vision.family" in e["recipe_mismatch"]
    assert "image size 448" in e["image_size"] and "image_size 32" in e["image_size"]
    assert not any(v for k, v in e.items() if k.endswith("_out_exists"))


def test_other_vision_spellings_read_to_the_same_tensors(tmp_path):
    """transformers Aimv2Model (vision_config + a text tower), Apple's remote-code AIMv2 (flat
    config, original names) and transformers InternVLVisionModel folders read into exactly the
    tensors the family maps expect, without the Megatron model (in-process, ~1 s)."""
    from safetensors.torch import save_file
    from transformers import Aimv2Config, Aimv2Model, InternVLVisionConfig, InternVLVisionModel

    from megatron_sail.convert import sailvl_layout, standalone
    from megatron_sail.convert.compose import ComposeConfig, _model_config
    from megatron_sail.convert.hf_internvl import apply_key_map
    from megatron_sail.demo import tiny_parts as parts_tool
    from megatron_sail.models.families import vision_family

    base = standalone.read_vision(
        parts_tool.make_part(tmp_path / "v", parts_tool.TinyPartConfig(part="aimv2"))
    )
    vcfg = base.hf_config.to_dict()
    full = Aimv2Model(
        Aimv2Config(
            vision_config=vcfg,
            text_config=dict(
                hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2
            ),
        )
    )
    sd = {k: v for k, v in full.state_dict().items()}
    sd.update({"vision_model." + k[len(standalone.VISION_PREFIX) :]: v for k, v in base.state.items()})
    full.load_state_dict(sd, strict=False)
    full.save_pretrained(str(tmp_path / "full"))
    apple = sailvl_layout.from_hf_state_dict(base.state)
    (tmp_path / "apple").mkdir()
    save_file(
        {k[len("vision_model.") :]: v.contiguous() for k, v in apple.items()},
        str(tmp_path / "apple" / "model.safetensors"),
    )
    (tmp_path / "apple" / "config.json").write_text(
        json.dumps(
            {
                "model_type": "aimv2",
                "architectures": ["AIMv2Model"],
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "image_size": 32,
                "patch_size": 8,
                "rms_norm_eps": 1e-5,
                "qkv_bias": False,
                "use_bias": False,
            }
        )
    )
    for folder, kind in ((tmp_path / "full", "aimv2"), (tmp_path / "apple", "aimv2")):
        part = standalone.read_vision(folder)
        assert part.source_type == kind and part.family == "aimv2"
        assert sorted(part.state) == sorted(base.state)
        assert all(torch.equal(part.state[k], base.state[k]) for k in base.state)
        assert standalone.vision_config(part, -1, 0.0) == standalone.vision_config(base, -1, 0.0)
    assert any(k.startswith("text_model.") for k in standalone.read_vision(tmp_path / "full").skipped)
    # transformers' InternVLVisionModel: the family's standalone map reads every tensor
    vit = InternVLVisionModel(
        InternVLVisionConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            image_size=[32, 32],
            patch_size=[8, 8],
            norm_type="layer_norm",
            use_mean_pooling=True,
        )
    )
    vit.save_pretrained(str(tmp_path / "ivl"))
    part = standalone.read_vision(tmp_path / "ivl")
    v = standalone.vision_config(part, -1, 0.0)
    km = vision_family(v.family).key_map(v, "vision_model.", standalone.VISION_PREFIX)
    assert km.hf_names() == set(part.state)
    assert len(apply_key_map(km, part.state)) > 0
    cfg = ComposeConfig(recipe="tiny")
    lm = standalone.read_language(parts_tool.make_part(tmp_path / "lm", parts_tool.TinyPartConfig()))
    assert _model_config(part, lm, cfg).vision.family == "internvit"


def test_one_alignment_step_trains_from_the_composed_checkpoint(report):
    """`train.py --recipe tiny --stage pretrain-alignment --init-from MC` on data preprocessed
    with MC/tokenizer: the recipe check, the data/tokenizer checks and one step pass (~13 s)."""
    root, mc = Path(report["root"]), Path(report["root"]) / "vit_qwen2"
    prep = [
        ("make_demo_data", ["--out", str(root / "raw"), "--samples", "4"]),
        (
            "preprocess_data",
            [
                "--input",
                str(root / "raw" / "train.jsonl"),
                "--tokenizer",
                str(mc / "tokenizer"),
                "--output-prefix",
                str(root / "train"),
                "--seq-length",
                "256",
                "--tile-size",
                "32",
                "--tokens-per-tile",
                "4",
                "--max-tiles",
                "4",
            ],
        ),
    ]
    code = f"for mod, argv in {prep!r}:\n    assert __import__(mod).main(argv) in (0, None)"
    for args in (
        ["-c", code],
        [
            "-m",
            "megatron_sail.train",
            "--recipe",
            "tiny",
            "--stage",
            "pretrain-alignment",
            "--data-path",
            str(root / "train"),
            "--init-from",
            str(mc),
            "--train-iters",
            "1",
            "--lr-decay-iters",
            "1",
            "--global-batch-size",
            "1",
            "--micro-batch-size",
            "1",
            "--seq-length",
            "256",
            "--eval-interval",
            "0",
            "--log-interval",
            "1",
            "--run-dir",
            str(root / "run"),
            "--save",
            str(root / "ckpt"),
        ],
    ):
        proc = subprocess.run(
            [sys.executable, *args],
            cwd=ROOT,
            env=subprocess_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "step 1/1" in proc.stdout + proc.stderr
    assert (root / "ckpt" / "iter_0000001" / "tokenizer").is_dir()


REAL = {  # config.json fields of the released parts (shapes as in SAIL-VL.md / config/model.py)
    "sail_2b": (
        {
            "model_type": "intern_vit_6b",
            "architectures": ["InternVisionModel"],
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "image_size": 448,
            "patch_size": 14,
            "qkv_bias": True,
            "qk_normalization": False,
            "norm_type": "layer_norm",
            "layer_norm_eps": 1e-6,
            "hidden_act": "gelu",
            "initializer_factor": 0.1,
            "drop_path_rate": 0.1,
        },
        (
            "qwen2",
            dict(
                hidden_size=1536,
                num_hidden_layers=28,
                num_attention_heads=12,
                num_key_value_heads=2,
                intermediate_size=8960,
                vocab_size=151936,
                rms_norm_eps=1e-6,
                rope_theta=1000000.0,
                max_position_embeddings=32768,
                tie_word_embeddings=True,
            ),
        ),
    ),
    "sail_vl2_2b": (
        {
            "model_type": "aimv2",
            "architectures": ["AIMv2Model"],
            "hidden_size": 1536,
            "intermediate_size": 4096,
            "num_hidden_layers": 24,
            "num_attention_heads": 12,
            "image_size": 448,
            "patch_size": 14,
            "rms_norm_eps": 1e-5,
            "qkv_bias": False,
            "use_bias": False,
        },
        (
            "qwen3",
            dict(
                hidden_size=2048,
                num_hidden_layers=28,
                num_attention_heads=16,
                num_key_value_heads=8,
                head_dim=128,
                intermediate_size=6144,
                vocab_size=151936,
                rms_norm_eps=1e-6,
                rope_theta=1000000.0,
                max_position_embeddings=40960,
                tie_word_embeddings=True,
                attention_bias=False,
            ),
        ),
    ),
}


@pytest.mark.parametrize("recipe", list(REAL))
def test_released_part_configs_compose_under_their_recipe(tmp_path, recipe):
    """InternViT-300M-448px + Qwen2.5-1.5B configs give sail_2b's model, AIMv2-Huge-448 (Apple's
    remote-code config) + Qwen3-1.7B sail_vl2_2b's (no weights: an empty safetensors file)."""
    from safetensors.torch import save_file
    from transformers import AutoConfig

    from megatron_sail.config.recipes import model_recipe
    from megatron_sail.convert import compose, standalone

    vis_cfg, (kind, text) = REAL[recipe]
    (tmp_path / "config.json").write_text(json.dumps(vis_cfg))
    save_file({}, str(tmp_path / "model.safetensors"))
    vis = standalone.read_vision(tmp_path)
    lm = standalone.LanguagePart(kind, AutoConfig.for_model(kind, **text), True, {})
    got = compose._model_config(vis, lm, compose.ComposeConfig(recipe=recipe))
    compose._check_recipe(got, model_recipe(recipe), recipe)
    assert got.tokens_per_tile() == 256
    assert got.vision.drop_path_rate == model_recipe(recipe).vision.drop_path_rate
    with pytest.raises(ValueError, match="vision.num_layers: recipe 24, folders 23"):
        vis_cfg = {**vis_cfg, "num_hidden_layers": 23}
        (tmp_path / "config.json").write_text(json.dumps(vis_cfg))
        bad = compose._model_config(
            standalone.read_vision(tmp_path), lm, compose.ComposeConfig(recipe=recipe)
        )
        compose._check_recipe(bad, model_recipe(recipe), recipe)
