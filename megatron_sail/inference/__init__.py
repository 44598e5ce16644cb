"""Generation on the Megatron model: KV cache, sampling, batching, any TP/PP layout (docs/inference.md)."""
from megatron_sail.inference.config import GenerationConfig, GenerationRequest, GenerationResult
from megatron_sail.inference.engine import Generator
from megatron_sail.inference.loading import LoadConfig, generator_from_model, inspect_checkpoint, load_generator
from megatron_sail.inference.prompts import ProcessorSettings, Prompt

__all__ = ["GenerationConfig", "GenerationRequest", "GenerationResult", "Generator", "LoadConfig",
           "ProcessorSettings", "Prompt", "generator_from_model", "inspect_checkpoint", "load_generator"]
