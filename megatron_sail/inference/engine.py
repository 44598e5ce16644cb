"""Generator: batched autoregressive decoding on the Megatron model, any TP/PP(/VPP) layout.

One batch = one packed prefill (all prompts in a single THD sequence, one segment each, exactly
the training forward) followed by one decode step per new token, in which every prompt
contributes one token (laid out as a length-B sequence) that attends to its own KV cache
(kv_cache.py). Pipeline stages pass activations with plain point-to-point sends in stage order
(with virtual chunks, rank r's chunk c feeds rank r+1's chunk c, the last rank's chunk c feeds
rank 0's chunk c+1); the last stage picks the next tokens and broadcasts them to all stages.
Every rank calls ``generate`` with the same requests and gets the same results.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel

from megatron_sail.compat.ddp import pause_param_gather_hooks, resume_param_gather_hooks
from megatron_sail.config.model import ModelConfig
from megatron_sail.data.tokenizer import Tokenizer
from megatron_sail.inference.config import GenerationConfig, GenerationRequest, GenerationResult
from megatron_sail.inference.decode_state import DecodeState
from megatron_sail.inference.kv_cache import CacheStep, KVCache, RopeTable, cached_attention
from megatron_sail.inference.plain_layers import plain_layers, swappable
from megatron_sail.inference.prompts import ProcessorSettings, Prompt, PromptBuilder
from megatron_sail.inference.sampling import apply_min_tokens, next_tokens
from megatron_sail.models.attention import packed_seq_params
from megatron_sail.models.sail_vl import unwrap
from megatron_sail.platform import onednn_linear
from megatron_sail.platform.distributed import device as model_device

GPU_SYNC_EVERY = 16
"""Decode steps between two checks (device-to-host reads) of whether a row still runs, on GPUs:
at most this many steps too many once every row ended, none waited for meanwhile."""


class Generator:
    """Decodes answers with the given model chunks (this rank's pipeline stages, in order)."""

    def __init__(
        self,
        chunks: list,
        model_config: ModelConfig,
        tokenizer: Tokenizer,
        settings: ProcessorSettings,
        cfg: GenerationConfig,
    ):
        self.wrapped = list(chunks)
        self.chunks = [unwrap(c) for c in chunks]
        self.lms = [c.language_model for c in self.chunks]
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.settings = settings
        self.cfg = cfg
        self.prompts = PromptBuilder(
            tokenizer, settings, cfg.max_tiles, cfg.system, model_config.language.max_position_embeddings
        )
        sp = tokenizer.special
        stops = cfg.stop_token_ids if cfg.stop_token_ids is not None else (sp.im_end, sp.pad)
        self.stop_ids = tuple(int(s) for s in stops)
        self._stop_tensor: Optional[torch.Tensor] = None
        """``stop_ids`` as a tensor on the logits' device (made on first use)."""
        lm_cfg = self.lms[0].config
        self.hidden = lm_cfg.hidden_size
        self.dtype = lm_cfg.params_dtype
        self.sequence_parallel = bool(lm_cfg.sequence_parallel)
        self.tp = parallel_state.get_tensor_model_parallel_world_size()
        self.pp = parallel_state.get_pipeline_model_parallel_world_size()
        self.ep = parallel_state.get_expert_model_parallel_world_size()
        self.device = model_device()
        self.sync_every = 1 if self.device.type == "cpu" else GPU_SYNC_EVERY
        """Decode steps between checks whether a row still runs (a read back from the device);
        on CPU that read is free, so every step (never a step too many)."""
        self._modules = [list(c.modules()) for c in self.wrapped]
        """Every module of each chunk, listed once (a module walk per call is not free)."""
        self._swappable = swappable(self.chunks) if self.tp == 1 else []
        """The TP=1 parallel layers that run as plain torch calls while generating."""
        self._linear = onednn_linear.linear if cfg.onednn_linear else F.linear
        """The product of the swapped layers and the LM head (fp32 on CPU: oneDNN's is 1.5-2x
        MKL's, see platform/onednn_linear.py)."""
        self.first = self.chunks[0].pre_process
        self.last = self.chunks[-1].post_process
        self.stats = {
            "prompt_tokens": 0,
            "generated_tokens": 0,
            "prefill_s": 0.0,
            "decode_s": 0.0,
            "decode_steps": 0,
        }
        """Counters over the generator's life (the benchmark script reads them)."""

    # ------------------------------------------------------------------ public API
    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Answers to the requests, in order (collective under TP/PP)."""
        prompts = [
            self.prompts.build(r, self.cfg.max_new_tokens, i, with_tiles=self.first)
            for i, r in enumerate(requests)
        ]
        return self.generate_prompts(prompts)

    def generate_prompts(
        self, prompts: list[Prompt], on_batch: Optional[Callable[[int], None]] = None
    ) -> list[GenerationResult]:
        """Answers to prepared prompts (ids + tiles), ``batch_size`` prompts at a time;
        ``on_batch(n)`` is told after each batch how many prompts it answered (progress)."""
        modes = [c.training for c in self.wrapped]
        # train()/eval() walk every module with setattr (about 1 ms per call of a tiny model,
        # a tenth of a short generation): only switch chunks that have a module in training.
        switched = [c for c, mods in zip(self.wrapped, self._modules) if any(m.training for m in mods)]
        generator = torch.Generator(self.device).manual_seed(self.cfg.seed)  # draws stay on the device
        results: list[GenerationResult] = []
        hooked = pause_param_gather_hooks(self.wrapped)
        try:
            for c in switched:
                c.eval()
            with torch.no_grad(), plain_layers(self._swappable, self._linear):
                for start in range(0, len(prompts), self.cfg.batch_size):
                    batch = self._batch(prompts[start : start + self.cfg.batch_size], generator)
                    results += batch
                    if on_batch is not None:
                        on_batch(len(batch))
        finally:
            for c, mode in zip(self.wrapped, modes):
                if any(c is x for x in switched):  # the others were left as they were
                    c.train(mode)
            for lm in self.lms:
                lm.set_input_tensor(None)
            resume_param_gather_hooks(hooked)
        return results

    # ------------------------------------------------------------------ one batch
    def _batch(self, prompts: list[Prompt], generator: torch.Generator) -> list[GenerationResult]:
        """Prefill the batch, then decode until every prompt stopped or ran out of budget."""
        state = self._run(prompts, generator)
        return self._results(prompts, state)

    def _run(self, prompts: list[Prompt], generator: torch.Generator) -> DecodeState:
        """The prefill and the decode steps of one batch; the device-side state they left.

        The loop reads nothing back from the device except whether a row still runs, and that
        only every ``sync_every`` steps (a GPU runs ahead meanwhile; on CPU a read is free, so
        it asks every step and never decodes a step too many)."""
        n = len(prompts)
        rows = self._padded(n)
        lens = [len(p.ids) for p in prompts]
        budgets = [max(0, p.max_new_tokens) for p in prompts]
        max_len = max(length + b for length, b in zip(lens, budgets)) + 1
        cache = KVCache(rows, max_len, self._rope_table(max_len))
        state = DecodeState(lens, budgets, rows, self.stop_ids, self.cfg.min_new_tokens, self.device)
        with cached_attention(self.lms, cache):
            t0 = time.perf_counter()
            logits = self._prefill(prompts, cache)
            state.accept(self._choose(logits, 0, rows, generator), 0)
            self.stats["prefill_s"] += time.perf_counter() - t0
            self.stats["prompt_tokens"] += sum(lens)
            t0 = time.perf_counter()
            for step in range(1, state.width):
                if step % self.sync_every == 0 and not state.running():
                    break
                logits = self._decode(state, cache)
                state.accept(self._choose(logits, step, rows, generator), step)
                self.stats["decode_steps"] += 1
            self.stats["decode_s"] += time.perf_counter() - t0
        return state

    def _results(self, prompts: list[Prompt], state: DecodeState) -> list[GenerationResult]:
        """The batch's answers, read back from the device once."""
        results = []
        for p, (ids, reason, _stop) in zip(prompts, state.rows()):
            results.append(GenerationResult(self.tokenizer.decode(ids), ids, list(p.ids), reason))
            self.stats["generated_tokens"] += len(ids)
        return results

    def _padded(self, n: int) -> int:
        """Rows per decode step: the batch, rounded up to a multiple of TP under SP."""
        return math.ceil(n / self.tp) * self.tp if self.sequence_parallel else n

    # ------------------------------------------------------------------ forward passes
    def _prefill(self, prompts: list[Prompt], cache: KVCache) -> Optional[torch.Tensor]:
        """Packed forward of all prompts; logits [B, V] of each prompt's last token (last stage)."""
        ids = [i for p in prompts for i in p.ids]
        bounds = [0]
        for p in prompts:
            bounds.append(bounds[-1] + len(p.ids))
        pad = (-len(ids)) % self.tp if self.sequence_parallel else 0
        if pad:  # SP splits the sequence over TP: pad with one extra segment
            ids += [self.tokenizer.special.pad] * pad
            bounds.append(bounds[-1] + pad)
        cu = torch.tensor(bounds, dtype=torch.int32, device=self.device)
        psp = packed_seq_params(cu)
        tiles = None
        if self.first:
            parts = [p.tiles for p in prompts if p.tiles is not None and p.tiles.size(0)]
            tiles = torch.cat(parts).to(self.device, self.dtype) if parts else None
        cache.step = CacheStep("prefill", bounds=psp.bounds, rows=len(prompts))
        rope = self.lms[0].rotary_pos_emb(psp.max_seqlen_q, packed_seq=True)
        ids_t = torch.tensor(ids, dtype=torch.long, device=self.device)[None]
        hidden = self._stages(ids_t, tiles, rope, psp)
        if hidden is None:
            return None
        last = torch.tensor([b - 1 for b in bounds[1 : len(prompts) + 1]], device=self.device)
        return self._logits(hidden[last, 0])

    def _rope_table(self, max_len: int) -> Optional[RopeTable]:
        """cos/sin of every position up to ``max_len``, applied by the cache in decode steps;
        None where Megatron must apply RoPE itself (interleaved, multi-latent, YaRN or mRoPE)."""
        lm = self.lms[0]
        config = lm.config
        plain = (
            getattr(lm, "position_embedding_type", None) == "rope"
            and type(lm.rotary_pos_emb).__name__ == "RotaryEmbedding"
            and not config.rotary_interleaved
            and not config.multi_latent_attention
            and getattr(config, "mrope_section", None) is None
        )
        return RopeTable(lm.rotary_pos_emb(max_len), self.dtype) if plain else None

    def _decode(self, state: DecodeState, cache: KVCache) -> Optional[torch.Tensor]:
        """One token per row (each row's last token, at its position); logits [rows, V] on the
        last stage. A fixed-shape computation on the device from inputs already there (the
        tokens, positions, mask, RoPE rows, cache writes, attention over the whole cache)."""
        pos = state.positions()
        cache.decode_step(pos)
        rope = None if cache.rope is not None else self.lms[0].rotary_pos_emb(cache.max_len)[pos]
        ids_t = state.tokens[None]
        hidden = self._stages(ids_t, None, rope, None)
        return None if hidden is None else self._logits(hidden[:, 0])

    def _stages(self, ids: torch.Tensor, tiles, rope, psp) -> Optional[torch.Tensor]:
        """Run this rank's chunks in pipeline order; the last stage's final hidden states [N, 1, h]."""
        tokens = ids.size(1)
        local = tokens // self.tp if self.sequence_parallel else tokens
        out = None
        for chunk, lm in zip(self.chunks, self.lms):
            if chunk.pre_process:
                x = chunk.embed(ids, tiles)
            else:
                x = torch.empty(local, 1, self.hidden, dtype=self.dtype, device=self.device)
                dist.recv(x, src=parallel_state.get_pipeline_model_parallel_prev_rank())
                lm.set_input_tensor(x)
            y = lm.decoder(hidden_states=x, attention_mask=None, rotary_pos_emb=rope, packed_seq_params=psp)
            if chunk.post_process:
                out = y
            else:
                dist.send(y.contiguous(), dst=parallel_state.get_pipeline_model_parallel_next_rank())
        if out is not None and self.sequence_parallel:
            out = tensor_parallel.gather_from_sequence_parallel_region(out, tensor_parallel_output_grad=False)
        return out

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary float32 logits [n, V] of final hidden states [n, h] (TP-gathered)."""
        lm = self.lms[-1]
        weight = (
            lm.shared_embedding_or_output_weight()
            if lm.share_embeddings_and_output_weights
            else lm.output_layer.weight
        )
        logits = self._linear(hidden, weight)
        if self.tp > 1:
            logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
        return logits.float()

    # ------------------------------------------------------------------ token choice
    def _choose(
        self, logits: Optional[torch.Tensor], generated: int, rows: int, generator: torch.Generator
    ) -> torch.Tensor:
        """Next token of every row [rows] (on the device), chosen on the last stage and shared
        with every rank; ``generated`` is how many tokens the running rows have."""
        if self.last:
            if (
                self._stop_tensor is None or self._stop_tensor.device != logits.device
            ):  # built once, not per token
                self._stop_tensor = torch.tensor(self.stop_ids, dtype=torch.long, device=logits.device)
            logits = apply_min_tokens(logits, generated, self.cfg.min_new_tokens, self._stop_tensor)
            chosen = next_tokens(logits, self.cfg.temperature, self.cfg.top_p, generator)
            if self.tp == self.pp == self.ep == 1 and chosen.size(0) == rows:  # nothing to share
                return chosen
        tokens = torch.zeros(rows, dtype=torch.long, device=self.device)
        if self.last:
            tokens[: chosen.size(0)].copy_(chosen)
        if self.tp > 1:  # sampling is seeded identically, but TP rank 0's draw is the one kept
            dist.broadcast(
                tokens,
                src=parallel_state.get_tensor_model_parallel_src_rank(),
                group=parallel_state.get_tensor_model_parallel_group(),
            )
        if self.pp > 1:
            dist.broadcast(
                tokens,
                src=parallel_state.get_pipeline_model_parallel_last_rank(),
                group=parallel_state.get_pipeline_model_parallel_group(),
            )
        if self.ep > 1:  # EP ranks are replicas that must decode in lockstep (expert all-to-alls):
            # a last-bit logit difference between them must not let their answers (and lengths) part
            group = parallel_state.get_expert_model_parallel_group()
            dist.broadcast(tokens, src=dist.get_global_rank(group, 0), group=group)
        return tokens
