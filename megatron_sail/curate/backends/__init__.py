"""Captioning backends: megatron (our checkpoints), hf (transformers), vllm, openai (HTTP)."""

from megatron_sail.curate.backends.base import BACKENDS, Backend, BackendConfig, CaptionRequest, CaptionResult


def make_backend(cfg: BackendConfig) -> Backend:
    """The backend ``cfg.backend`` names, loaded (imports are lazy: vllm is optional)."""
    if cfg.backend == "megatron":
        from megatron_sail.curate.backends.megatron import MegatronBackend

        return MegatronBackend(cfg)
    if cfg.backend == "hf":
        from megatron_sail.curate.backends.hf import HFBackend

        return HFBackend(cfg)
    if cfg.backend == "vllm":
        from megatron_sail.curate.backends.vllm import VLLMBackend

        return VLLMBackend(cfg)
    from megatron_sail.curate.backends.openai import OpenAIBackend

    return OpenAIBackend(cfg)


__all__ = ["BACKENDS", "Backend", "BackendConfig", "CaptionRequest", "CaptionResult", "make_backend"]
