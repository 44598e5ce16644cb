"""Rollouts for RL: the generation engine, plus the log-probability of every sampled token.

``RolloutGenerator`` is the ``Generator`` (KV cache, any TP/PP layout, temperature / top-p)
with two additions that GRPO needs: each sampled token's log-probability under the sampling
distribution ``softmax(logits / temperature)`` (before the top-p cut, as verl and TRL report it;
temperature 0 means 1 here), taken from the same float32 logits the token was drawn from; and
the stop token kept at the end of a completion that stopped (the policy chose it, so it is
trained). A completion is cut before a sampled image special token (<IMG_CONTEXT>, <img>,
</img>): the trainer's forward would splice an image there. Log-probabilities exist on the last pipeline stage (where the loss is computed);
other stages get an empty list.

The seam for an external rollout server (vLLM, SGLang) is ``Rollout``: anything that returns, for
each prompt, the prompt ids, the completion ids and their log-probs can stand in for
``RolloutGenerator.rollouts`` (docs/post_training.md: weight sync and what must match).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_sail.inference.engine import Generator
from megatron_sail.inference.prompts import Prompt


@dataclass
class Rollout:
    """One sampled completion."""

    prompt_ids: list[int]
    """Prompt ids, ending with the assistant header."""
    tiles: Optional[torch.Tensor]
    """The prompt's tiles (None on stages that do not embed)."""
    token_ids: list[int]
    """Completion ids; the stop token is the last one when the completion stopped."""
    logps: list[float]
    """Engine log-prob of each completion id at sampling time (last stage; [] elsewhere)."""
    text: str
    """Decoded completion (stop token excluded)."""
    finish_reason: str
    """'stop', 'length' or 'image_token' (cut before a sampled image special token: in the
    trainer's forward it would be taken for an image position)."""


class RolloutGenerator(Generator):
    """Generator that records the log-probabilities of the tokens it samples."""

    def rollouts(self, prompts: list[Prompt]) -> list[Rollout]:
        """Sample one completion per prompt (repeat a prompt G times for a group); collective
        over the model-parallel group like ``generate``."""
        self._records: list[tuple[list, Optional[tuple]]] = []
        results = self.generate_prompts(prompts)
        sp = self.tokenizer.special
        image_ids = {sp.img_context, sp.img_start, sp.img_end}
        out = []
        for p, r, (logps, stop) in zip(prompts, results, self._records):
            ids, lps, text, reason = list(r.token_ids), list(logps), r.text, r.finish_reason
            if stop is not None:  # the chosen stop token ends the completion
                ids.append(stop[0])
                lps.append(stop[1])
            cut = next((k for k, t in enumerate(ids) if t in image_ids), None)
            if cut is not None:  # an image token in the text would be spliced as an image
                ids, lps, reason = ids[:cut], lps[:cut], "image_token"
                text = self.tokenizer.decode(ids)
            out.append(Rollout(list(p.ids), p.tiles, ids, lps if self.last else [], text, reason))
        return out

    def _run(self, prompts, generator):
        """One batch of the engine, with the chosen tokens' log-probs gathered per step."""
        self._step_lps: list[torch.Tensor] = []
        self._prompts = len(prompts)  # decode steps may carry padding rows (SP): not recorded
        return super()._run(prompts, generator)

    def _choose(self, logits, generated, rows, generator):
        """The engine's choice, plus each row's log-prob of its chosen token (kept on the device)."""
        tokens = super()._choose(logits, generated, rows, generator)
        if logits is not None:
            t = self.cfg.temperature if self.cfg.temperature > 0 else 1.0
            lp = torch.log_softmax(logits.float() / t, dim=-1)
            self._step_lps.append(lp.gather(1, tokens[: lp.size(0), None])[: self._prompts, 0])
        return tokens

    def _results(self, prompts, state):
        """The engine's results; each row's accepted tokens' log-probs and its stop token (with
        its log-prob) recorded for ``rollouts``."""
        results = super()._results(prompts, state)
        steps = torch.stack(self._step_lps, 1).tolist() if self._step_lps else []
        for i, (ids, _reason, stop) in enumerate(state.rows()):
            row = steps[i] if i < len(steps) else []
            lp = row[len(ids)] if len(ids) < len(row) else 0.0
            self._records.append((row[: len(ids)], None if stop is None else (stop, lp)))
        return results
