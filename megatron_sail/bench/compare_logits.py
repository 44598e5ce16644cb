"""Logits of transformers' InternVL and of our Megatron SailVLModel on the same inputs: the check
behind tools/compare_logits.py, which users run to trust a conversion (its docstring says how).

Each image is tiled dynamically at the checkpoint's tile size (InternVL's grid rule + the PIL image
pipeline, thumbnail included); with no image a generated picture is used. The prompt follows
SAIL-VL's ChatML template with ``<img><IMG_CONTEXT>*n</img>`` per image. Without tokenizer files
the text becomes a deterministic id sequence and the image-context id comes from the config. For
SAIL-VL2 'sailvl' checkpoints, whose AIMv2 tower InternVL cannot hold, the reference is
transformers' Aimv2VisionModel + InternVL's pixel shuffle and projector + the causal LM."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

DEFAULT_ATOL = {torch.float32: 1e-3, torch.bfloat16: 1.0}
"""fp32 (CPU): conversions are exact, only kernel order differs; bf16 (GPU): rounding at every
layer of a real-size model moves logits by up to a few tenths, while a wrong mapping moves them by
whole units."""


SYSTEM_PROMPT = "You are a helpful assistant."


@dataclass
class Inputs:
    """One sample in both models' terms."""

    input_ids: torch.Tensor
    """[S] int64 token ids with the image-context runs."""
    tiles: torch.Tensor
    """[T, 3, S, S] float32 normalized tiles, images in order."""
    description: str
    """What was fed (for the log)."""


def generated_image(width: int, height: int) -> bytes:
    """A deterministic picture with structure at every scale (gradients, stripes, a disc), PNG."""
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = 127 + 127 * np.sin(x / 17.0)
    g = 255 * y / max(height - 1, 1)
    b = np.where((x - width / 3) ** 2 + (y - height / 2) ** 2 < (height / 4) ** 2, 230, 40)
    img = np.stack([r, g, b], -1).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def image_tiles(
    images: list[tuple[str, bytes]], tile_size: int, max_tiles: int
) -> tuple[torch.Tensor, list[int]]:
    """Tile each image with InternVL's dynamic rule; return (tiles, tiles per image)."""
    from PIL import Image

    from megatron_sail.config.images import ImageConfig, TilingConfig
    from megatron_sail.data.images.pil import PilPipeline
    from megatron_sail.data.records import ImageRecord
    from megatron_sail.data.tiling import find_grid

    tiling = TilingConfig(tile_size=tile_size, max_tiles=max_tiles)
    records = []
    for source, data in images:
        try:
            size = Image.open(io.BytesIO(data)).size
        except Exception as e:
            raise ValueError(f"{source}: cannot read image ({e})") from e
        grid = find_grid(size[0], size[1], tiling)
        records.append(ImageRecord(data=data, grid=grid, thumbnail=True, size=size, sample=0, source=source))
    pipeline = PilPipeline(ImageConfig(backend="pil", tile_size=tile_size, threads=1))
    tiles, ok = pipeline.tiles(records)
    for rec, good in zip(records, ok):
        if not good:
            raise ValueError(f"{rec.source}: image failed to decode")
    return tiles, [r.num_tiles for r in records]


def load_tokenizer(*folders: Path):
    """transformers tokenizer from the first folder holding tokenizer files, else None."""
    from transformers import AutoTokenizer

    for folder in folders:
        if (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
            return AutoTokenizer.from_pretrained(str(folder))
    return None


def prompt_ids(tokenizer, prompt: str, image_runs: list[int], img_ctx_id: int, vocab: int) -> list[int]:
    """Token ids of the ChatML prompt; a deterministic id sequence when there is no tokenizer."""
    from megatron_sail.convert.internvl_chat import IMG_CONTEXT

    if tokenizer is not None:
        images = "".join(f"<img>{IMG_CONTEXT * n}</img>\n" for n in image_runs)
        text = (
            f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{images}{prompt}"
            f"<|im_end|>\n<|im_start|>assistant\n"
        )
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if sum(i == img_ctx_id for i in ids) != sum(image_runs):
            raise ValueError(f"tokenizer does not map {IMG_CONTEXT} to the config's id {img_ctx_id}")
        if max(ids) >= vocab:
            raise ValueError(f"tokenizer gives id {max(ids)} but the model's vocabulary has {vocab} rows")
        return ids
    text = [b for b in prompt.encode()]

    def tid(x: int) -> int:
        t = x % vocab
        return t if t != img_ctx_id else (t + 1) % vocab

    ids = [tid(7 * i + 3) for i in range(6)]
    for n in image_runs:
        ids += [tid(11)] + [img_ctx_id] * n + [tid(12)]
    return ids + [tid(b) for b in text] + [tid(5), tid(6)]


def build_inputs(args, model_config, hf_dir: Path, mcore_dir: Path) -> Inputs:
    """Images + prompt -> ids and tiles, identical on every rank (deterministic)."""
    from megatron_sail.checkpoint.layout import TOKENIZER_DIR

    size = model_config.vision.image_size
    images = [(p, Path(p).read_bytes()) for p in args.image] or [
        ("generated", generated_image(int(size * 2.6), int(size * 1.4)))
    ]
    tiles, counts = image_tiles(images, size, args.max_tiles)
    per_tile = model_config.tokens_per_tile()
    tok = load_tokenizer(hf_dir, mcore_dir / TOKENIZER_DIR)
    lm = model_config.language
    ids = prompt_ids(
        tok, args.prompt, [n * per_tile for n in counts], model_config.img_context_token_id, lm.vocab_size
    )
    desc = (
        f"{len(images)} image(s), tiles {counts} of {size}px, {len(ids)} tokens, "
        f"{'tokenizer' if tok is not None else 'synthetic ids (no tokenizer)'}"
    )
    return Inputs(torch.tensor(ids, dtype=torch.long), tiles, desc)


def reference_logits(hf_dir: Path, inputs: Inputs, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """transformers InternVLForConditionalGeneration logits [S, V] (either checkpoint layout)."""
    from transformers import InternVLForConditionalGeneration

    from megatron_sail.convert.checkpoint import read_hf_checkpoint, transformers_config
    from megatron_sail.convert.hf_internvl import from_hf_config, to_transformers_params

    hf = read_hf_checkpoint(hf_dir)
    if hf.model_config is not None:  # SAIL-VL2 'sailvl' (AIMv2): no transformers VLM class
        return composed_reference_logits(hf, inputs, dtype, device)
    config = transformers_config(hf.config)
    with torch.device(device):
        model = InternVLForConditionalGeneration(config).to(dtype)
    state = to_transformers_params(hf.state, from_hf_config(config))  # e.g. experts fused in memory
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = bool(config.tie_word_embeddings)
    if unexpected or [k for k in missing if not (tied and k == "lm_head.weight")]:
        raise ValueError(
            f"{hf_dir}: state dict does not fit InternVL: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    if tied:
        model.tie_weights()
    model.eval()
    with torch.no_grad():
        out = model(
            input_ids=inputs.input_ids[None].to(device), pixel_values=inputs.tiles.to(device, dtype)
        ).logits
    return out[0].float()


def _load_part(module, state: dict, renames: dict[str, str], tied: bool = False) -> None:
    """Load the tensors under each ``renames`` prefix of a module-key state dict (the prefix
    replaced by its value) into one transformers module; every weight must be found, except a
    tied ``lm_head.weight``."""
    part = {
        into + k[len(prefix) :]: v
        for prefix, into in renames.items()
        for k, v in state.items()
        if k.startswith(prefix)
    }
    missing, unexpected = module.load_state_dict(part, strict=False)
    if unexpected or [k for k in missing if not (tied and k == "lm_head.weight")]:
        raise ValueError(f"{sorted(renames)}: missing {missing[:5]}, unexpected {unexpected[:5]}")


def composed_reference_logits(hf, inputs: Inputs, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """transformers' parts, composed as InternVL composes them (``composed_reference``), for a
    VLM whose vision tower InternVL cannot hold (AIMv2): logits [S, V]."""
    embed, lm = composed_reference(hf, dtype, device)
    with torch.no_grad():
        return lm(inputs_embeds=embed(inputs.input_ids[None].to(device), inputs.tiles)).logits[0].float()


def composed_reference(hf, dtype: torch.dtype, device: torch.device):
    """``(embed, lm)`` built from transformers' parts: ``Aimv2VisionModel`` (last_hidden_state,
    or the hidden state of ``select_layer``, all patch tokens) -> InternVL's pixel shuffle and
    ``InternVLMultiModalProjector`` -> the features replace the <IMG_CONTEXT> embeddings
    (``embed(ids [1, S], tiles) -> inputs_embeds [1, S, h]``) -> the family's causal LM
    (``lm``, an ``AutoModelForCausalLM``; its ``generate(inputs_embeds=...)`` is the generation
    reference)."""
    from transformers import (
        Aimv2VisionConfig,
        Aimv2VisionModel,
        AutoConfig,
        AutoModelForCausalLM,
        InternVLConfig,
    )
    from transformers.models.internvl.modeling_internvl import (
        InternVLModel,
        InternVLMultiModalProjector,
    )

    from megatron_sail.convert.hf_internvl import to_transformers_params
    from megatron_sail.models.families import language_family, vision_family

    cfg = hf.model_config
    state = to_transformers_params(hf.state, cfg)
    vcfg = {
        k: v for k, v in vision_family(cfg.vision.family).hf_config(cfg.vision).items() if k != "model_type"
    }
    tcfg = dict(language_family(cfg.language.family).hf_config(cfg.language))
    text = AutoConfig.for_model(tcfg.pop("model_type"), **tcfg)
    with torch.device(device):
        vision = Aimv2VisionModel(Aimv2VisionConfig(**vcfg, attn_implementation="eager")).to(dtype)
        projector = InternVLMultiModalProjector(
            InternVLConfig(
                vision_config={"hidden_size": cfg.vision.hidden_size},
                text_config=text.to_dict(),
                downsample_ratio=cfg.projector.downsample_ratio,
                projector_hidden_act="gelu",
            )
        ).to(dtype)
        lm = AutoModelForCausalLM.from_config(text).to(dtype)
    tied = cfg.language.tie_embeddings
    _load_part(vision, state, {"model.vision_tower.": ""})
    _load_part(projector, state, {"model.multi_modal_projector.": ""})
    head = {} if tied else {"lm_head.": "lm_head."}
    _load_part(lm, state, {"model.language_model.": "model.", **head}, tied=tied)
    if tied:
        lm.tie_weights()
    for m in (vision, projector, lm):
        m.eval()

    @torch.no_grad()
    def embed(ids: torch.Tensor, tiles) -> torch.Tensor:
        embeds = lm.get_input_embeddings()(ids)
        if tiles is None or not tiles.size(0):
            return embeds
        out = vision(pixel_values=tiles.to(device, dtype), output_hidden_states=True)
        layer = cfg.vision.select_layer
        feats = out.last_hidden_state if layer == -1 else out.hidden_states[layer]
        side = int(feats.shape[1] ** 0.5)
        feats = feats.contiguous().reshape(feats.shape[0], side, side, -1)
        # InternVLModel.pixel_shuffle uses no model state: transformers' own v2 shuffle, unbound
        feats = InternVLModel.pixel_shuffle(None, feats, scale_factor=cfg.projector.downsample_ratio)
        feats = projector(feats.reshape(feats.shape[0], -1, feats.shape[-1]))
        mask = ids == cfg.img_context_token_id
        embeds[mask] = feats.reshape(-1, feats.shape[-1]).to(embeds.dtype)
        return embeds

    return embed, lm


def our_logits(chunks: list, inputs: Inputs, device: torch.device) -> torch.Tensor | None:
    """Our model's logits [S, V] on the last pipeline stage (None on other stages)."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    ids = inputs.input_ids[None].to(device)
    dtype = next(chunks[0].parameters()).dtype
    tiles = inputs.tiles.to(device, dtype)

    def forward_step(_data, model):
        out = model(ids, tiles=tiles)
        return out, lambda output, non_loss_data=False: output.detach()

    with torch.no_grad():
        if parallel_state.get_pipeline_model_parallel_world_size() == 1:
            return chunks[0](ids, tiles=tiles)[0].float()
        res = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter([None]),
            model=chunks,
            num_microbatches=1,
            seq_length=ids.size(1),
            micro_batch_size=1,
            forward_only=True,
            collect_non_loss_data=True,
        )
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return res[0][0].float()


def gather_to_rank0(
    logits: torch.Tensor | None, shape: tuple[int, int], device: torch.device
) -> torch.Tensor | None:
    """Send the last stage's logits (TP rank 0 of rank 0's pipeline) to global rank 0."""
    from megatron.core import parallel_state

    src = torch.tensor([parallel_state.get_pipeline_model_parallel_last_rank()], device=device)
    dist.broadcast(src, src=0)  # rank 0's view decides which rank sends
    src, rank = int(src.item()), dist.get_rank()
    if src == 0:
        return logits if rank == 0 else None
    if rank == src:
        dist.send(logits.contiguous(), dst=0)
    elif rank == 0:
        buf = torch.empty(shape, dtype=torch.float32, device=device)
        dist.recv(buf, src=src)
        return buf
    return None
