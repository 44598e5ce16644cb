"""Post-training losses as pure functions of log-probabilities: preference (DPO / IPO / MPO)
and policy gradient (GRPO). The trainer computes the log-probabilities under any TP/PP layout
(posttrain/preference.py, posttrain/grpo_update.py); these functions only combine them."""
