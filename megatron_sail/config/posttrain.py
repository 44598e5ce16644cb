"""Settings of the post-training stages ``dpo`` and ``grpo`` (posttrain/stage.py, posttrain/run.py).

For these stages ``--data-path`` names JSONL files (and, for grpo, VLMEvalKit TSVs) that are
tokenized when the run starts, with the tokenizer and processor settings of the starting
checkpoint, instead of packed indexed prefixes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass(frozen=True)
class PostTrainConfig:
    """Flags of the preference (dpo) and RL (grpo) stages."""

    # ---------------------------------------------------------------- data
    image_root: Optional[str] = None
    """Folder relative image paths resolve against (default: each data file's folder)."""
    # ---------------------------------------------------------------- dpo
    pref_loss: str = "dpo"
    """dpo, ipo or mpo (training/losses/preference.py)."""
    dpo_beta: float = 0.1
    """DPO's beta (IPO's tau)."""
    mpo_weights: list[float] = field(default_factory=lambda: [0.8, 0.2, 1.0])
    """MPO weights of the DPO, BCO pair and LM terms (InternVL's defaults)."""
    ref_load: Optional[str] = None
    """Checkpoint of the frozen reference model (default: the starting checkpoint)."""
    ref_logps: Optional[str] = None
    """Sidecar of precomputed reference log-probs (tools/precompute_ref_logps.py)."""
    # ---------------------------------------------------------------- grpo
    num_generations: int = 4
    """Completions sampled per prompt (the group size G)."""
    max_new_tokens: int = 64
    """Longest completion."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts."""
    top_p: float = 1.0
    """Nucleus sampling of the rollouts."""
    clip_eps: float = 0.2
    """PPO clip range of the per-token ratio."""
    kl_coef: float = 0.0
    """Weight of the k3 KL to the reference (0: no reference model is built)."""
    loss_level: str = "token"
    """token or sequence averaging of the GRPO loss."""
    ppo_epochs: int = 1
    """Optimizer steps per rollout batch (each over the whole batch)."""
    rewards: list[str] = field(default_factory=lambda: ["accuracy"])
    """Reward functions: accuracy, format, boxed, length, judge, or module:function."""
    reward_weights: list[float] = field(default_factory=list)
    """Weight of each reward (default 1 each); the total reward is the weighted sum."""
    length_target: int = 0
    """Length penalty: tokens beyond this cost length_penalty each (0: the max_new_tokens)."""
    length_penalty: float = 0.01
    """Penalty per token beyond length_target (the 'length' reward)."""
    judge_url: Optional[str] = None
    """OpenAI-compatible endpoint of the 'judge' reward (e.g. http://host:8000/v1)."""
    judge_model: Optional[str] = None
    """Model name sent to the judge endpoint."""
    prompt_suffix: str = ""
    """Appended to every GRPO prompt (e.g. SAIL-VL2's CoT instruction asking for <think> and
    \\boxed{})."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Refuse values no post-training stage can run with; run again after flags set fields."""
        if self.pref_loss not in ("dpo", "ipo", "mpo"):
            raise ValueError(f"--pref-loss {self.pref_loss!r}: expected dpo, ipo or mpo")
        if len(self.mpo_weights) != 3:
            raise ValueError(f"--mpo-weights {self.mpo_weights}: expected 3 weights (DPO, BCO, LM)")
        if self.num_generations < 2:
            raise ValueError(
                f"--num-generations {self.num_generations}: GRPO needs >= 2 "
                "completions per prompt (group-normalized advantages)"
            )
        if self.ppo_epochs < 1 or self.max_new_tokens < 1:
            raise ValueError(
                f"--ppo-epochs {self.ppo_epochs} and --max-new-tokens {self.max_new_tokens} must be >= 1"
            )
        if self.loss_level not in ("token", "sequence"):
            raise ValueError(f"--grpo-loss-level {self.loss_level!r}: expected token or sequence")
        if self.reward_weights and len(self.reward_weights) != len(self.rewards):
            raise ValueError(
                f"--reward-weights: {len(self.reward_weights)} weights for {len(self.rewards)} rewards"
            )
