"""SailVLModel: vision encoder + pixel-shuffle MLP projector + Megatron-Core GPTModel.

The encoder and the decoder's TransformerConfig come from their family specs
(``models/families``); this file names no family.

One instance is one pipeline stage (chunk): the ViT and projector exist only where
``pre_process`` is true, the output layer only where ``post_process`` is true. The LM always
runs packed (THD): a [B, S] batch is flattened to one sequence of B*S tokens whose segments
are given by ``cu_seqlens``, so attention never crosses a sample and RoPE restarts per sample.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_sail.config.model import LanguageConfig, ModelConfig
from megatron_sail.config.parallel import ParallelConfig
from megatron_sail.models import layer_specs
from megatron_sail.models.attention import packed_seq_params
from megatron_sail.models.families import language_family
from megatron_sail.models.projector import Projector
from megatron_sail.models.vit import ViTEncoder


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The SailVLModel inside DDP / Float16Module wrappers (each keeps the wrapped model in
    ``.module``); what training, checkpoints and generation reach through."""
    while hasattr(chunk, "module") and isinstance(chunk.module, torch.nn.Module):
        chunk = chunk.module
    return chunk


def language_transformer_config(
    lm: LanguageConfig, parallel: ParallelConfig, dtype: torch.dtype = torch.float32
) -> TransformerConfig:
    """Megatron TransformerConfig of the decoder, from its family spec, under the parallel layout."""
    return language_family(lm.family).transformer_config(lm, parallel, dtype)


def splice_positions(input_ids: torch.Tensor, image_token: int, n_features: int) -> torch.Tensor:
    """Flat positions of <IMG_CONTEXT> tokens, checked against the number of visual tokens."""
    pos = (input_ids.reshape(-1) == image_token).nonzero().squeeze(1)
    if pos.numel() != n_features:
        raise ValueError(
            f"image token count mismatch: {pos.numel()} <IMG_CONTEXT> tokens in the "
            f"batch but the tiles produce {n_features} visual tokens"
        )
    return pos


class SailVLModel(MegatronModule):
    """The SAIL-VL model (one pipeline stage of it).

    Args:
        config: composed model config.
        parallel: parallel layout (TP/SP/PP sizes); Megatron's groups must already exist.
        pre_process / post_process: first / last pipeline stage (chunk) flags.
        vp_stage: virtual pipeline chunk index (None without interleaving).
        dtype: parameter dtype.
        use_te: Transformer Engine spec (default: when TE and CUDA are available).
    """

    def __init__(
        self,
        config: ModelConfig,
        parallel: ParallelConfig | None = None,
        pre_process: bool = True,
        post_process: bool = True,
        vp_stage: int | None = None,
        dtype: torch.dtype = torch.float32,
        use_te: bool | None = None,
    ):
        parallel = parallel or ParallelConfig()
        lm_config = language_transformer_config(config.language, parallel, dtype)
        super().__init__(config=lm_config)
        self.model_config, self.parallel = config, parallel
        self.pre_process, self.post_process = pre_process, post_process
        use_te = layer_specs.te_available() if use_te is None else use_te
        lm = config.language
        if lm.vocab_size % parallel.tp:
            raise ValueError(f"vocab_size {lm.vocab_size} must be divisible by tp={parallel.tp}")
        if lm_config.qk_layernorm and config.vision.qk_norm and parallel.tp > 1:
            # Megatron's grad finalization sums every '*_layernorm' q/k weight over TP when the
            # model config has qk_layernorm: right for the LM's per-head norms, wrong for the
            # ViT's TP-sharded full-width ones.
            raise ValueError(
                "a ViT with qk_norm and an LM with per-head QK-norm cannot run at "
                f"tp={parallel.tp} (their QK-norm gradients reduce differently)"
            )
        self.vision_model = self.projector = None
        if pre_process:
            self.vision_model = ViTEncoder(config.vision, parallel, dtype, use_te)
            self.projector = Projector(config.projector, config.vision.hidden_size, lm.hidden_size, lm_config)
        self.language_model = GPTModel(
            config=lm_config,
            transformer_layer_spec=layer_specs.language_block_spec(lm_config, use_te, vp_stage),
            vocab_size=lm.vocab_size,
            max_sequence_length=lm.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=lm.tie_embeddings,
            position_embedding_type="rope",
            rotary_base=int(lm.rope_theta),
            vp_stage=vp_stage,
        )
        self.share_embeddings_and_output_weights = lm.tie_embeddings
        self.model_type = ModelType.encoder_or_decoder  # read by Megatron's pipeline schedules

    # ----------------------------------------------------------------- pipeline plumbing
    def set_input_tensor(self, input_tensor) -> None:
        """Receive the previous stage's activations (called by Megatron's schedules)."""
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.language_model.set_input_tensor(input_tensor)

    def shared_embedding_or_output_weight(self):
        """Tied word embedding (Megatron's DDP/finalize code asks the model for it)."""
        return self.language_model.shared_embedding_or_output_weight()

    # ----------------------------------------------------------------- forward
    def visual_tokens(self, tiles: torch.Tensor) -> torch.Tensor:
        """Projected visual tokens of all tiles, in order: [T * tokens_per_tile, d_llm]."""
        return self.projector(self.vision_model(tiles))

    def embed(self, input_ids: torch.Tensor, tiles: torch.Tensor | None) -> torch.Tensor:
        """LM input embeddings [s(/tp), 1, h] with visual tokens spliced in at <IMG_CONTEXT>.

        Under SP each rank holds a slice of the sequence; visual tokens are replicated, so each
        rank splices the ones falling in its slice, and their gradient is summed over TP.
        """
        flat = input_ids.reshape(1, -1)
        emb = self.language_model.embedding(input_ids=flat, position_ids=None)
        if tiles is None or tiles.size(0) == 0:
            if not torch.is_grad_enabled():  # generation: no gradient to anchor (every decode step)
                return emb
            return emb + self._unused_vision_grad_anchor(emb)
        feats = self.visual_tokens(tiles).to(emb.dtype)
        pos = splice_positions(flat, self.model_config.img_context_token_id, feats.size(0))
        if self.parallel.sequence_parallel:
            feats = tensor_parallel.copy_to_tensor_model_parallel_region(feats)
            local = emb.size(0)
            start = parallel_state.get_tensor_model_parallel_rank() * local
            keep = (pos >= start) & (pos < start + local)
            pos, feats = pos[keep] - start, feats[keep]
        emb = emb.clone()
        emb[pos, 0] = feats
        return emb

    def _unused_vision_grad_anchor(self, emb: torch.Tensor) -> torch.Tensor:
        """Zero-valued term touching every trainable ViT/projector weight (text-only batches).

        A text-only micro-batch would leave the encoder without gradients, which DDP-style
        gradient reduction does not tolerate; a single blank tile weighted by zero gives every
        parameter a (zero) gradient at the cost of one tile's forward/backward.
        """
        trainable = any(p.requires_grad for m in (self.vision_model, self.projector) for p in m.parameters())
        if not trainable or not torch.is_grad_enabled():
            return emb.new_zeros(())
        side = self.model_config.vision.image_size
        blank = emb.new_zeros(1, 3, side, side)
        return self.visual_tokens(blank).sum().to(emb.dtype) * 0.0

    def forward(
        self,
        input_ids: torch.Tensor,
        tiles: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        gather_logits: bool = True,
    ):
        """Per-token loss [B, S] when ``labels`` is given, else logits [B, S, V].

        input_ids / labels: [B, S]. tiles: [T, 3, H, W] (T may be 0). cu_seqlens: int32
        segment offsets flattened over the batch (default: one segment per row). There are no
        position ids: the decoder's only positions are RoPE's, and Megatron-Core's THD RoPE
        restarts them at every cu_seqlens boundary (each segment reads the table from 0), which
        is exactly "positions restart per packed sample". On stages without post_process the
        hidden states for the next stage are returned.
        """
        b, s = input_ids.shape
        if cu_seqlens is None:
            cu_seqlens = torch.arange(0, b * s + 1, s, dtype=torch.int32)
        if int(cu_seqlens[-1]) != b * s:
            raise ValueError(f"cu_seqlens ends at {int(cu_seqlens[-1])}, expected B*S={b * s}")
        psp = packed_seq_params(cu_seqlens.to(input_ids.device))
        decoder_input = self.embed(input_ids, tiles) if self.pre_process else None
        out = self.language_model(
            input_ids=input_ids.reshape(1, -1),
            position_ids=None,
            attention_mask=None,
            decoder_input=decoder_input,
            labels=None if labels is None else labels.reshape(1, -1),
            packed_seq_params=psp,
            runtime_gather_output=gather_logits if labels is None else None,
        )
        if not self.post_process:
            return out
        return out.reshape(b, s) if labels is not None else out.reshape(b, s, -1)

    # ----------------------------------------------------------------- training stages
    def freeze(self, vision: bool = False, projector: bool = False, language: bool = False) -> None:
        """Stop gradients for the chosen parts (True = frozen); the rest becomes trainable."""
        parts = [(self.vision_model, vision), (self.projector, projector), (self.language_model, language)]
        for module, frozen in parts:
            if module is not None:
                for p in module.parameters():
                    p.requires_grad_(not frozen)
