"""Next-token choice: greedy by default, temperature + nucleus (top-p) sampling when asked."""

from __future__ import annotations

import torch


def apply_min_tokens(
    logits: torch.Tensor, generated: int, min_new_tokens: int, stop_ids: torch.Tensor
) -> torch.Tensor:
    """Forbid the stop tokens until ``min_new_tokens`` tokens exist (transformers' rule)."""
    if generated >= min_new_tokens or stop_ids.numel() == 0:
        return logits
    logits = logits.clone()
    logits[:, stop_ids] = float("-inf")
    return logits


def next_tokens(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Token ids [B] from logits [B, V] (float32).

    temperature 0 is argmax (ties go to the lowest id, as torch.argmax and transformers do).
    Otherwise tokens are drawn from softmax(logits / temperature) restricted to the smallest
    set whose probability reaches ``top_p`` (the most likely token is always kept); the draw uses
    ``generator`` (on the logits' device: no host round trip) so that a seed fixes the answer.
    """
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(dim=-1) - sorted_p  # mass of the more likely tokens
        sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
