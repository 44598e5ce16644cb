"""transformers' InternVLForConditionalGeneration as a training-step runner for the timing of
bench/training_step.py (benchmarks/hf_reference.py is its command line): random weights of a
recipe's shape, packed rows passed as restarting position_ids."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    import transformers


def hf_config(model) -> "transformers.InternVLConfig":
    """transformers' InternVLConfig with the shape of our ``config.model.ModelConfig``."""
    from transformers import InternVLConfig

    v, lm = model.vision, model.language
    return InternVLConfig(
        vision_config={
            "hidden_size": v.hidden_size,
            "num_hidden_layers": v.num_layers,
            "num_attention_heads": v.num_heads,
            "intermediate_size": v.ffn_hidden_size,
            "image_size": [v.image_size] * 2,
            "patch_size": [v.patch_size] * 2,
            "attention_bias": v.qkv_bias,
            "use_qk_norm": v.qk_norm,
            "norm_type": v.norm_type,
            "layer_norm_eps": v.norm_eps,
            "layer_scale_init_value": v.layer_scale_init,
            "hidden_act": "gelu",
            "use_mean_pooling": True,
        },
        text_config={
            "model_type": "qwen2",
            "hidden_size": lm.hidden_size,
            "num_hidden_layers": lm.num_layers,
            "num_attention_heads": lm.num_heads,
            "num_key_value_heads": lm.num_kv_heads,
            "intermediate_size": lm.ffn_hidden_size,
            "vocab_size": lm.vocab_size,
            "rms_norm_eps": lm.norm_eps,
            "max_position_embeddings": lm.max_position_embeddings,
            "tie_word_embeddings": lm.tie_embeddings,
            "rope_parameters": {"rope_type": "default", "rope_theta": lm.rope_theta},
        },
        image_token_id=model.img_context_token_id,
        image_seq_length=model.tokens_per_tile(),
        downsample_ratio=model.projector.downsample_ratio,
        vision_feature_layer=v.select_layer,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=lm.tie_embeddings,
    )


def restarting_positions(cu_seqlens: torch.Tensor, rows: int, n: int) -> torch.Tensor:
    """[rows, n] positions restarting at 0 at every cu_seqlens boundary: how transformers is
    told about packed samples (our model needs none, its RoPE restarts per segment)."""
    flat = torch.arange(rows * n, device=cu_seqlens.device)
    starts = cu_seqlens[:-1].long()
    segment = torch.searchsorted(starts, flat, right=True) - 1
    return (flat - starts[segment]).view(rows, n)


class HFRunner:
    """One transformers InternVL model + AdamW, stepping on the shared synthetic micro-batches."""

    def __init__(self, model_cfg, dev: torch.device, seed: int):
        from transformers import InternVLForConditionalGeneration

        torch.manual_seed(seed)
        gpu = dev.type == "cuda"
        self.dtype = torch.bfloat16 if gpu else torch.float32
        cfg = hf_config(model_cfg)
        cfg._attn_implementation = "sdpa"
        self.model = InternVLForConditionalGeneration(cfg).to(device=dev, dtype=self.dtype)
        self.model.train()
        self.device = dev
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=1e-5, weight_decay=0.05, fused=gpu, foreach=None if gpu else True
        )
        inner = self.model.model
        self.vision, self.projector = inner.vision_tower, inner.multi_modal_projector

    def inputs(self, batch) -> dict:
        """HF keyword arguments for one MicroBatch (labels -100 where our loss mask is 0)."""
        b = batch.to(self.device, non_blocking=True)
        labels = torch.full_like(b.tokens, -100)
        labels[:, 1:] = torch.where(b.loss_mask[:, :-1] > 0, b.tokens[:, 1:], -100)
        packed = b.cu_seqlens.numel() > b.tokens.shape[0] + 1
        return {
            "input_ids": b.tokens,
            "labels": labels,
            "pixel_values": b.tiles.to(self.dtype) if b.num_tiles else None,
            "position_ids": restarting_positions(b.cu_seqlens, *b.tokens.shape) if packed else None,
        }

    def train_step(self, inputs: list[dict], sw) -> torch.Tensor:
        """Forward/backward over the micro-batches (loss averaged), clip to 1.0 as our trainer
        does, AdamW update; times 'fwd_bwd' and 'optimizer' into ``sw``. Returns the loss."""
        total = 0.0
        with sw.section("fwd_bwd"):
            for inp in inputs:
                loss = self.model(**inp).loss / len(inputs)
                loss.backward()
                total = total + loss.detach()
        with sw.section("optimizer"):
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return total

    def peak_memory(self) -> int:
        """Peak memory of the run so far."""
        from megatron_sail.training.metrics import peak_memory_bytes

        return peak_memory_bytes()
