"""Instruction-Following Difficulty (``--method ifd``; Li et al., 2023, "From Quantity to
Quality"), through our own model and checkpoint loading (any checkpoint generate can load).

For a sample with answers A (every assistant turn) and context Q (system prompt, images and
questions):

    CE(A|Q) = mean cross-entropy of the answer tokens in the full rendered conversation
              (exactly the tokens the SFT loss trains: each answer and its <|im_end|>)
    CE(A)   = mean cross-entropy of the same tokens with each answer rendered alone as an
              assistant turn: ``<|im_start|>assistant\\n`` + answer + ``<|im_end|>`` (no
              system prompt, no image, no question)
    IFD     = PPL(A|Q) / PPL(A) = exp(CE(A|Q) - CE(A))

IFD near 1 means the image and question barely help predict the answer (hard, or noisy);
small IFD means the answer follows from them (easy for this model). The two passes of many
samples are packed into one forward (the training forward: THD segments, any TP/PP; the
scores come from the last pipeline stage and are broadcast to every rank)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from megatron_sail.curate.complexity.samples import Sample


@dataclass(frozen=True)
class IfdConfig:
    """Reference model and batching of the IFD passes."""

    checkpoint: str
    """Training checkpoint, converted Megatron checkpoint or HF folder (what generate loads)."""
    max_tiles: Optional[int] = None
    """Tiles per image; None: what the checkpoint was trained with."""
    max_batch_tokens: int = 8192
    """Tokens per packed forward (both passes of a sample count; one sample always fits)."""
    tp: Optional[int] = None
    """Tensor-parallel size (under torchrun); None: 1 or the groups already set up."""
    pp: Optional[int] = None
    """Pipeline-parallel size (under torchrun)."""
    dtype: Optional[str] = None
    """float32, bfloat16 or float16; None: float32 on CPU, bfloat16 on GPU."""


@dataclass
class Encoded:
    """Both passes of one sample as token ids."""

    segments: list
    """[(ids int64 array, positions whose next token is scored)]; segment 0 is the full
    conversation, the rest are the answers alone."""
    tiles: Optional[torch.Tensor]
    """Tiles of the conversation's images (None on stages without the ViT or no images)."""

    @property
    def tokens(self) -> int:
        return sum(len(ids) for ids, _ in self.segments)


class IfdScorer:
    """Loads the reference model once; ``score`` returns one result (or exception) per sample."""

    def __init__(self, cfg: IfdConfig):
        from megatron_sail.inference import GenerationConfig, LoadConfig, inspect_checkpoint, load_generator

        tiles = cfg.max_tiles or inspect_checkpoint(cfg.checkpoint).settings.max_tiles
        self.cfg = cfg
        self.gen = load_generator(
            cfg.checkpoint,
            GenerationConfig(max_tiles=tiles, batch_size=1),
            LoadConfig(tp=cfg.tp, pp=cfg.pp, dtype=cfg.dtype),
        )
        self.builder = self.gen.prompts

    @property
    def writer(self) -> bool:
        """Whether this rank writes the sidecar (rank 0)."""
        return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0

    def encode(self, sample: Sample) -> Encoded:
        """Token ids of the two passes; an unreadable image or bad turns raise (a reject)."""
        from megatron_sail.data.template import normalize_turns
        from megatron_sail.data.tiling import find_grid, num_tiles
        from megatron_sail.inference.prompts import image_size

        b = self.builder
        turns = normalize_turns(sample.turns, len(sample.images), b.template_cfg)
        names = [f"{sample.source} {sample.key} image {k}" for k in range(len(sample.images))]
        sizes = [image_size(d, n) for d, n in zip(sample.images, names)]
        grids = [find_grid(w, h, b.tiling) for w, h in sizes]
        counts = [num_tiles(g, b.tiling.thumbnail) * b.tiling.tokens_per_tile for g in grids]
        ids, mask = b.template.render(turns, counts)
        segments = [(ids.astype(np.int64), np.nonzero(mask)[0])]
        for role, text in turns:
            if role == "assistant":
                a_ids, a_mask = b.template.render([("assistant", text)], [])
                segments.append((a_ids.astype(np.int64), np.nonzero(a_mask)[0]))
        cond = ids[segments[0][1] + 1]
        alone = np.concatenate([s_ids[s_pos + 1] for s_ids, s_pos in segments[1:]])
        if not np.array_equal(cond, alone):  # a template whose answers tokenize differently in context
            raise ValueError("answer tokens differ between the conversation and the answers alone")
        tiles = None
        if self.gen.first and sample.images:
            tiles = b._tiles(list(zip(sample.images, names)), grids, sizes)
        return Encoded(segments, tiles)

    def score(self, samples: list[Sample]) -> list:
        """{'score': IFD, 'ce_conditioned', 'ce_answer_only', 'answer_tokens'} per sample, or
        the exception that made it a reject."""
        encoded: list = []
        for s in samples:
            try:
                encoded.append(self.encode(s))
            except Exception as e:  # noqa: BLE001 - a reject, named by the runner
                encoded.append(e)
        ok = [i for i, e in enumerate(encoded) if isinstance(e, Encoded)]
        out: list = list(encoded)
        batch: list[int] = []
        for i in ok:
            if (
                batch
                and sum(encoded[j].tokens for j in batch) + encoded[i].tokens > self.cfg.max_batch_tokens
            ):
                self._run(batch, encoded, out)
                batch = []
            batch.append(i)
        if batch:
            self._run(batch, encoded, out)
        return out

    def _run(self, batch: list[int], encoded: list, out: list) -> None:
        """One packed forward of the batch's passes; fills ``out`` for its samples."""
        sums = self._losses([encoded[i] for i in batch])
        for k, i in enumerate(batch):
            cond_sum, cond_n, alone_sum, alone_n = sums[k].tolist()
            ce_c, ce_a = cond_sum / cond_n, alone_sum / alone_n
            out[i] = {
                "score": math.exp(ce_c - ce_a),
                "ce_conditioned": ce_c,
                "ce_answer_only": ce_a,
                "answer_tokens": int(cond_n),
            }

    def _losses(self, batch: list[Encoded]) -> torch.Tensor:
        """[n, 4] float64: (sum CE, count) of the conditioned and the answer-only pass per sample."""
        from megatron.core import parallel_state

        from megatron_sail.compat.ddp import pause_param_gather_hooks, resume_param_gather_hooks
        from megatron_sail.models.attention import packed_seq_params

        g = self.gen
        ids, bounds, scored, owner = [], [0], [], []
        for n, enc in enumerate(batch):
            for seg, (seg_ids, pos) in enumerate(enc.segments):
                start = bounds[-1]
                ids.extend(int(t) for t in seg_ids)
                bounds.append(start + len(seg_ids))
                scored.extend(start + int(p) for p in pos)
                owner.extend([2 * n + (0 if seg == 0 else 1)] * len(pos))
        pad = (-len(ids)) % g.tp if g.sequence_parallel else 0
        if pad:  # SP splits the sequence over TP: pad with one extra segment
            ids += [self.gen.tokenizer.special.pad] * pad
            bounds.append(bounds[-1] + pad)
        result = torch.zeros(len(batch), 4, dtype=torch.float64, device=g.device)
        modes = [c.training for c in g.wrapped]
        hooked = pause_param_gather_hooks(g.wrapped)
        try:
            for c in g.wrapped:
                c.eval()
            with torch.no_grad():
                psp = packed_seq_params(torch.tensor(bounds, dtype=torch.int32, device=g.device))
                parts = [e.tiles for e in batch if e.tiles is not None and e.tiles.size(0)]
                tiles = torch.cat(parts).to(g.device, g.dtype) if parts and g.first else None
                rope = g.lms[0].rotary_pos_emb(psp.max_seqlen_q, packed_seq=True)
                ids_t = torch.tensor(ids, dtype=torch.long, device=g.device)[None]
                hidden = g._stages(ids_t, tiles, rope, psp)
                if hidden is not None:
                    pos = torch.tensor(scored, dtype=torch.long, device=g.device)
                    who = torch.tensor(owner, dtype=torch.long, device=g.device)
                    for lo in range(0, len(scored), 1024):  # bounded [P, vocab] logits
                        p = pos[lo : lo + 1024]
                        ce = F.cross_entropy(g._logits(hidden[p, 0]), ids_t[0, p + 1], reduction="none")
                        w = who[lo : lo + 1024]
                        flat = result.view(-1)  # column 2 * pass: sums, 2 * pass + 1: counts
                        col = (w % 2) * 2 + (w // 2) * 4
                        flat.index_add_(0, col, ce.double())
                        flat.index_add_(0, col + 1, torch.ones_like(ce, dtype=torch.float64))
        finally:
            for c, mode in zip(g.wrapped, modes):
                c.train(mode)
            for lm in g.lms:
                lm.set_input_tensor(None)
            resume_param_gather_hooks(hooked)
        if g.pp > 1:  # the last stage holds the losses
            torch.distributed.broadcast(
                result,
                src=parallel_state.get_pipeline_model_parallel_last_rank(),
                group=parallel_state.get_pipeline_model_parallel_group(),
            )
        return result.cpu()
