"""Post-training: stages dpo (DPO / IPO / MPO) and grpo (RL with verifiable rewards), their
rewards, and model soup. Above inference/ (the rollout engine) and eval/ (the answer matchers);
the losses themselves are training/losses/. Entry: ``python -m megatron_sail.train --stage dpo|grpo``
and tools/merge_checkpoints.py."""
