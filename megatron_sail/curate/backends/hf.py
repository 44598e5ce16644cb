"""Captions from a Hugging Face folder with transformers' own model and ``generate``.

transformers 5's InternVLProcessor needs torchvision, which does not import beside the pinned
CPU torch; the prompt is therefore built by our PromptBuilder (the ChatML template, InternVL's
tile grid and normalization: the ids and pixels the processor would give, docs/conversion.md)
and only the model and its ``generate`` come from transformers.
"""

from __future__ import annotations

from megatron_sail.curate.backends.base import Backend, BackendConfig, CaptionRequest, CaptionResult, per_item


class HFBackend(Backend):
    """AutoModelForImageTextToText on an export (transformers InternVL layout)."""

    name = "hf"

    def __init__(self, cfg: BackendConfig):
        super().__init__(cfg)
        import torch
        from transformers import AutoModelForImageTextToText

        from megatron_sail.data.tokenizer import load_tokenizer
        from megatron_sail.inference import inspect_checkpoint
        from megatron_sail.inference.prompts import PromptBuilder

        ckpt = inspect_checkpoint(cfg.model)
        if ckpt.kind != "hf" or ckpt.tokenizer_path is None:
            raise ValueError(f"--backend hf: {cfg.model} is not a Hugging Face folder with a tokenizer")
        self.tok = load_tokenizer(str(ckpt.tokenizer_path))
        self.builder = PromptBuilder(self.tok, ckpt.settings, cfg.max_tiles)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = (
            getattr(torch, cfg.dtype)
            if cfg.dtype
            else (torch.bfloat16 if self.device == "cuda" else torch.float32)
        )
        self.model = (
            AutoModelForImageTextToText.from_pretrained(cfg.model, dtype=dtype).to(self.device).eval()
        )
        self.dtype = dtype
        sp = self.tok.special
        self.stop_ids = [int(sp.im_end), int(sp.pad)]

    def caption(self, requests: list[CaptionRequest]) -> list[CaptionResult]:
        out = []
        for start in range(0, len(requests), self.cfg.batch_size):
            out += per_item(self._generate, requests[start : start + self.cfg.batch_size])
        return out

    def _generate(self, requests: list[CaptionRequest]) -> list[CaptionResult]:
        """One left-padded batch through ``generate``."""
        import torch

        from megatron_sail.inference import GenerationRequest

        prompts = [
            self.builder.build(GenerationRequest(r.prompt, [r.image]), self.cfg.max_new_tokens, i)
            for i, r in enumerate(requests)
        ]
        width = max(len(p.ids) for p in prompts)
        ids = torch.full((len(prompts), width), self.stop_ids[1], dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(prompts):
            ids[row, width - len(p.ids) :] = torch.tensor(p.ids)
            mask[row, width - len(p.ids) :] = 1
        pixels = torch.cat([p.tiles for p in prompts]).to(self.device, self.dtype)
        sample = self.cfg.temperature > 0
        kw = (
            {"do_sample": True, "temperature": self.cfg.temperature, "top_p": self.cfg.top_p}
            if sample
            else {"do_sample": False}
        )
        if sample:
            torch.manual_seed(self.cfg.seed)
        with torch.no_grad():
            seq = self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                pixel_values=pixels,
                max_new_tokens=self.cfg.max_new_tokens,
                eos_token_id=self.stop_ids,
                pad_token_id=self.stop_ids[1],
                **kw,
            )
        results = []
        for row in seq[:, width:].tolist():
            stop = next((k for k, t in enumerate(row) if t in self.stop_ids), None)
            new = row if stop is None else row[:stop]
            results.append(
                CaptionResult(self.tok.decode(new), "length" if stop is None else "stop", None, len(new))
            )
        return results
