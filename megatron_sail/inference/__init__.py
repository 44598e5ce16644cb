"""Generation on the Megatron model: KV cache, sampling, batching, any TP/PP layout (docs/inference.md).

Names are imported on first use, so that ``megatron_sail.inference.config`` (plain dataclasses)
loads without torch and Megatron-Core: a command line can check its flags in milliseconds.
"""

import importlib

_WHERE = {
    "GenerationConfig": "config",
    "GenerationRequest": "config",
    "GenerationResult": "config",
    "Generator": "engine",
    "LoadConfig": "loading",
    "generator_from_model": "loading",
    "inspect_checkpoint": "loading",
    "load_generator": "loading",
    "ProcessorSettings": "prompts",
    "Prompt": "prompts",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    """Import the submodule that defines ``name`` when it is first asked for."""
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
