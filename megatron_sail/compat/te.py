"""Whether Transformer Engine can run here: it imports only with CUDA libraries present, and
its kernels need a CUDA device (an import alone does not prove one). The model's layer specs
ask this when no caller chose between the TE and the local spec."""

from __future__ import annotations

import torch


def te_available() -> bool:
    """Whether Transformer Engine imports and a CUDA device is present."""
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # ImportError, or a CUDA load failure on CPU machines
        return False
    return torch.cuda.is_available()
