"""Captions from our own checkpoints through issue 9's generation (inference/)."""

from __future__ import annotations

from megatron_sail.curate.backends.base import Backend, BackendConfig, CaptionRequest, CaptionResult, per_item


class MegatronBackend(Backend):
    """load_generator on a training checkpoint, a converted Megatron checkpoint or an HF folder."""

    name = "megatron"

    def __init__(self, cfg: BackendConfig):
        super().__init__(cfg)
        from megatron_sail.inference import GenerationConfig, LoadConfig, load_generator

        gen_cfg = GenerationConfig(
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            seed=cfg.seed,
            max_tiles=cfg.max_tiles,
            batch_size=cfg.batch_size,
        )
        self.generator = load_generator(cfg.model, gen_cfg, LoadConfig(dtype=cfg.dtype))

    def caption(self, requests: list[CaptionRequest]) -> list[CaptionResult]:
        return per_item(self._generate, requests)

    def _generate(self, requests: list[CaptionRequest]) -> list[CaptionResult]:
        from megatron_sail.inference import GenerationRequest

        results = self.generator.generate([GenerationRequest(r.prompt, [r.image]) for r in requests])
        return [CaptionResult(res.text, res.finish_reason, None, len(res.token_ids)) for res in results]
