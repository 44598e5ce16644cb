"""Compose a SAIL-VL starting checkpoint from a separately released encoder and LLM.

SAIL-VL's first stage (pretrain-alignment) trains only the projector on top of a pretrained
vision encoder and a pretrained LLM (SAIL-VL-2B: InternViT-300M-448px + Qwen2.5-1.5B-Instruct).
``compose`` writes that starting point as a Megatron-Core dist checkpoint, the same folder
``hf-to-mcore`` writes (``model_config.yaml``, ``tokenizer/``, ``processor.json``,
``conversion.json``, ``manifest.json``), so ``train.py --init-from MC`` loads it:

* encoder and LM tensors come from the two folders through the families' key maps
  (``standalone.py`` reads the folders), bit for bit (fp32 holds bf16 exactly);
* the projector is initialized the way a fresh run initializes our ``Projector``: Megatron-Core's
  init under ``torch.manual_seed(seed)`` + ``model_parallel_cuda_manual_seed(seed)``
  (LayerNorm weight 1 / bias 0, linear_1 ~ N(0, 0.02), linear_2 ~ N(0, 0.02 / sqrt(2 x LM
  layers)), biases 0), or copied from ``projector_from`` (any checkpoint with ``mlp1.*`` or
  ``multi_modal_projector.*`` tensors of the right shapes);
* the tokenizer (the LLM's or ``tokenizer``) gets the template's missing special tokens in
  data/tokenizer.py's order (Qwen2.5/Qwen3 lack only ``<img>``, ``</img>``, ``<IMG_CONTEXT>``,
  which then get InternVL's ids 151665-151667; ``<video>`` follows, as in every checkpoint
  tokenizer we write), and ``img_context_token_id`` is read from it;
* when the tokenizer has more ids than the LLM has embedding rows, the embedding (and an untied
  output layer) grows to the next multiple of ``vocab_multiple`` (default 128: divisible by any
  power-of-two TP up to 128); each new row is the mean of the existing rows.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from megatron_sail.checkpoint import dcp, integrity
from megatron_sail.checkpoint.from_checkpoint import SHAPE_FIELDS, model_differences
from megatron_sail.checkpoint.layout import CONVERSION_FILE, TOKENIZER_DIR, UNUSED_FILE, write_model_config
from megatron_sail.checkpoint.processor import ProcessorSettings
from megatron_sail.checkpoint.tokenizer import load_hf_tokenizer, save_tokenizer
from megatron_sail.config.model import ModelConfig, ProjectorConfig
from megatron_sail.config.parallel import ParallelConfig
from megatron_sail.config.recipes import RECIPES, model_recipe
from megatron_sail.convert import checkpoint, hf_io, standalone
from megatron_sail.convert.hf_internvl import apply_key_map
from megatron_sail.models.families import language_family, vision_family

EMBED = "language_model.embedding.word_embeddings.weight"
OUTPUT = "language_model.output_layer.weight"
PROJECTOR_NAMES = {
    "mlp1.0.": "layer_norm.",
    "mlp1.1.": "linear_1.",
    "mlp1.3.": "linear_2.",
    "model.multi_modal_projector.": "",
    "multi_modal_projector.": "",
}
"""Projector tensor prefixes of InternVL-chat / transformers checkpoints -> ours (after 'projector.')."""


@dataclass(frozen=True)
class ComposeConfig:
    """Options of ``compose`` (None: from the recipe, else the default named here)."""

    recipe: Optional[str] = None
    """Model recipe (config/recipes.py RECIPES) giving select_layer, downsample ratio, image size
    and drop path, and whose weight shapes (vocabulary rows included) the composed model must
    have, so that `train.py --recipe NAME --init-from MC` accepts it."""
    select_layer: Optional[int] = None
    """Encoder layer feeding the projector (default: the recipe's, else -1)."""
    downsample_ratio: Optional[float] = None
    """Pixel-shuffle ratio (default: the recipe's, else 0.5)."""
    odd_grid: Optional[str] = None
    """Patch grids the merge does not divide: 'error' or 'pad' (default: the recipe's, else
    'error'; ProjectorConfig.odd_grid)."""
    image_size: Optional[int] = None
    """Expected tile size; must equal the encoder's config image_size (checked, not changed)."""
    drop_path_rate: Optional[float] = None
    """Encoder stochastic depth while training (default: the recipe's, else 0)."""
    seed: int = 1234
    """Seed of the projector's initialization (the trainer's default seed)."""
    tokenizer: Optional[str] = None
    """Tokenizer (tokenizer.json or folder) instead of the LLM folder's own."""
    vocab_multiple: int = 128
    """Grown embedding row counts are rounded up to a multiple of this."""
    projector_from: Optional[str] = None
    """Checkpoint folder or .safetensors file whose projector tensors to use instead of a fresh init."""
    overwrite: bool = False
    """Replace a non-empty output folder."""


def compose(
    vision_hf: str | os.PathLike,
    language_hf: str | os.PathLike,
    out_dir: str | os.PathLike,
    cfg: ComposeConfig = ComposeConfig(),
) -> Path:
    """Write the composed dist checkpoint to ``out_dir`` (atomically)."""
    from megatron_sail.data.tokenizer import load_tokenizer

    for src, flag in ((vision_hf, "--vision-hf"), (language_hf, "--language-hf")):
        checkpoint._check_not_source(src, out_dir, flag)
    checkpoint._check_empty(out_dir, cfg.overwrite)
    vis, lm = standalone.read_vision(vision_hf), standalone.read_language(language_hf)
    tok_src = _tokenizer_source(language_hf, cfg.tokenizer)
    model_config = _model_config(vis, lm, cfg)
    with hf_io.atomic_dir(out_dir, overwrite=cfg.overwrite) as tmp:
        save_tokenizer(tok_src, tmp / TOKENIZER_DIR)
        tok = load_tokenizer(str(tmp / TOKENIZER_DIR))
        model_config.img_context_token_id = tok.special.img_context
        ours, unused = _our_tensors(vis, lm, model_config)
        grown = _grow_vocab(ours, model_config, tok.vocab_size, cfg.vocab_multiple)
        if cfg.recipe:
            _check_recipe(model_config, _recipe(cfg.recipe), cfg.recipe)
        model = _build(model_config, cfg.seed)
        projector = (
            _projector_from(cfg.projector_from, model)
            if cfg.projector_from
            else {
                k: v
                for k, v in model.state_dict().items()
                if k.startswith("projector.") and not k.endswith("_extra_state")
            }
        )
        checkpoint._load_full_state(model, {**ours, **projector})
        dcp.save_sharded(dcp.model_sharded_state_dict([model]), tmp)
        if unused:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in unused.items()}, str(tmp / UNUSED_FILE))
        write_model_config(tmp, model_config)
        dtypes = {k: str(v.dtype).removeprefix("torch.") for k, v in {**vis.state, **lm.state}.items()}
        (tmp / CONVERSION_FILE).write_text(
            json.dumps(
                {
                    "source": {
                        "vision": str(vision_hf),
                        "language": str(language_hf),
                        "tokenizer": str(tok_src),
                    },
                    "source_layout": "compose",
                    "vision_model_type": vis.source_type,
                    "projector": (
                        {"from": str(cfg.projector_from)}
                        if cfg.projector_from
                        else {"init": "megatron", "seed": cfg.seed}
                    ),
                    "added_tokens": _added(tok_src, tok),
                    "vocab_rows_added": grown,
                    "skipped_source_tensors": vis.skipped,
                    "hf_dtypes": dtypes,
                },
                indent=2,
            )
            + "\n"
        )
        tile = model_config.vision.image_size
        ProcessorSettings(tile_size=tile, tokens_per_tile=model_config.tokens_per_tile(tile)).write(tmp)
        integrity.write_manifest(str(tmp))  # last: sizes + SHA-256 of every file above
    return Path(out_dir)


def _tokenizer_source(language_hf, tokenizer: Optional[str]) -> Path:
    """--tokenizer, else the LLM folder (which then must hold tokenizer files)."""
    if tokenizer:
        if not Path(tokenizer).exists():
            raise FileNotFoundError(f"--tokenizer {tokenizer}: not found")
        return Path(tokenizer)
    folder = Path(language_hf)
    if not any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")):
        raise FileNotFoundError(f"{folder}: no tokenizer.json / tokenizer_config.json; pass --tokenizer")
    return folder


def _added(tok_src: Path, tok) -> list[str]:
    """Special tokens the source tokenizer lacked (compose added them, in this order)."""
    from megatron_sail.data.tokenizer import SPECIAL_TOKENS

    vocab = load_hf_tokenizer(tok_src).get_vocab()
    return [t for t in SPECIAL_TOKENS if t not in vocab]


def _model_config(vis: standalone.VisionPart, lm: standalone.LanguagePart, cfg: ComposeConfig) -> ModelConfig:
    """Encoder + LM configs from the folders, the rest from the flags or the recipe; the
    geometry and (with a recipe) every weight shape checked."""
    recipe = _recipe(cfg.recipe)

    def pick(flag, path: str, default):
        if flag is not None:
            return flag
        if recipe is None:
            return default
        obj = recipe
        for part in path.split("."):
            obj = getattr(obj, part)
        return obj

    vision = standalone.vision_config(
        vis,
        pick(cfg.select_layer, "vision.select_layer", -1),
        pick(cfg.drop_path_rate, "vision.drop_path_rate", 0.0),
    )
    want = pick(cfg.image_size, "vision.image_size", vision.image_size)
    if want != vision.image_size:
        origin = "--image-size" if cfg.image_size else f"recipe {cfg.recipe}"
        raise ValueError(
            f"image size {want} ({origin}) "
            f"but the encoder's config has image_size {vision.image_size} (its position "
            "table's size); pick the encoder trained at that size"
        )
    language = language_family(lm.family).from_hf_config(lm.hf_config, tied=lm.tied)
    projector = ProjectorConfig(
        downsample_ratio=float(pick(cfg.downsample_ratio, "projector.downsample_ratio", 0.5)),
        odd_grid=pick(cfg.odd_grid, "projector.odd_grid", "error"),
    )
    out = ModelConfig(vision=vision, projector=projector, language=language)
    try:
        out.tokens_per_tile()
    except ValueError as e:
        raise ValueError(
            f"encoder image_size {vision.image_size} / patch_size {vision.patch_size} "
            f"with downsample ratio {projector.downsample_ratio}: {e}"
        ) from e
    return out


def _recipe(name: Optional[str]) -> Optional[ModelConfig]:
    """The named recipe's model (a clear error for unknown names)."""
    if name is None:
        return None
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known: {sorted(RECIPES)}")
    return model_recipe(name)


def _check_recipe(ours: ModelConfig, recipe: ModelConfig, name: str) -> None:
    """Every weight-shaping field of the composed model (vocabulary rows after any growth
    included) equals the recipe's, as ``train.py --recipe NAME --init-from`` checks."""
    diffs = [d for d in model_differences(recipe, ours) if d[0].rsplit(".", 1)[-1] in SHAPE_FIELDS]
    if diffs:
        text = "; ".join(f"{k}: recipe {a!r}, folders {b!r}" for k, a, b in diffs)
        raise ValueError(
            f"the encoder and LLM folders do not have recipe {name!r}'s shapes: {text}. "
            "Leave out --recipe (set --select-layer / --downsample-ratio) to compose "
            "them anyway, and train with --use-checkpoint-args (or without --recipe)"
        )


def _our_tensors(
    vis: standalone.VisionPart, lm: standalone.LanguagePart, model_config: ModelConfig
) -> tuple[dict, dict]:
    """Our encoder + LM tensors (full, TP=1) and the encoder tensors past select_layer."""
    v, lang = model_config.vision, model_config.language
    vfam = vision_family(v.family)
    vmap = vfam.key_map(v, "vision_model.", standalone.VISION_PREFIX)
    lmap = language_family(lang.family).key_map(
        lang, "language_model.", standalone.LM_PREFIX, standalone.LM_HEAD
    )
    used_v, used_l = vmap.hf_names(), lmap.hf_names()
    unused = {
        k: t
        for k, t in vis.state.items()
        if k not in used_v and vfam.unused_hf(v, standalone.VISION_PREFIX, k)
    }
    unknown = [k for k in vis.state if k not in used_v and k not in unused]
    unknown += [k for k in lm.state if k not in used_l]
    if unknown:
        raise ValueError(f"source tensors with no place in the model: {sorted(unknown)[:8]}")
    try:
        return {**apply_key_map(vmap, vis.state), **apply_key_map(lmap, lm.state)}, unused
    except KeyError as e:
        raise ValueError(f"the encoder or LLM folder lacks a tensor its config implies: {e}") from e


def _grow_vocab(ours: dict, model_config: ModelConfig, needed: int, multiple: int) -> int:
    """Grow the embedding (and untied output) rows to cover ``needed`` ids; new rows = the mean
    of the existing rows (a neutral start for tokens the LLM never saw). Returns rows added."""
    lm = model_config.language
    if needed <= lm.vocab_size:
        return 0
    rows = -(-needed // multiple) * multiple
    for key in (EMBED,) + (() if lm.tie_embeddings else (OUTPUT,)):
        t = ours[key]
        mean = t.double().mean(0, keepdim=True).to(t.dtype)
        ours[key] = torch.cat([t, mean.expand(rows - t.shape[0], -1)], 0)
    added, lm.vocab_size = rows - lm.vocab_size, rows
    print(
        f"note: tokenizer has {needed} ids, the LLM {rows - added} embedding rows: grown to "
        f"{rows} (multiple of {multiple}), new rows = mean of the existing rows"
    )
    return added


def _build(model_config: ModelConfig, seed: int) -> torch.nn.Module:
    """SailVLModel at TP=1/PP=1 (fp32, local spec), initialized under ``seed`` as a training
    run initializes it (platform.distributed.initialize seeds the CPU and TP RNGs)."""
    import torch.distributed as dist

    from megatron_sail.platform import distributed

    if dist.is_initialized() and dist.get_world_size() != 1:
        raise RuntimeError("compose runs in a single process (no torchrun)")
    distributed.initialize(ParallelConfig(), seed=seed)
    [model] = checkpoint.build_model_chunks(model_config, ParallelConfig(), use_te=False)
    return model


def _projector_from(path: str, model: torch.nn.Module) -> dict:
    """Projector tensors of another checkpoint (InternVL-chat ``mlp1.*`` or transformers'
    ``multi_modal_projector.*``), checked against the model's shapes."""
    from safetensors.torch import load_file

    p = Path(path)
    state = dict(load_file(str(p))) if p.is_file() else hf_io.read_state_dict(p)
    want = {
        k: v
        for k, v in model.state_dict().items()
        if k.startswith("projector.") and not k.endswith("_extra_state")
    }
    out = {}
    for key, value in state.items():
        for prefix, ours in PROJECTOR_NAMES.items():
            if key.startswith(prefix):
                out["projector." + ours + key[len(prefix) :]] = value
                break
    missing = sorted(set(want) - set(out))
    if missing:
        raise ValueError(
            f"--projector-from {path}: no projector tensors {missing[:4]} "
            "(expected mlp1.{0,1,3}.* or multi_modal_projector.*)"
        )
    for key, t in want.items():
        if tuple(out[key].shape) != tuple(t.shape):
            raise ValueError(
                f"--projector-from {path}: {key} has shape {tuple(out[key].shape)}, "
                f"the composed model needs {tuple(t.shape)}"
            )
    return {k: out[k].to(want[k].dtype) for k in want}
