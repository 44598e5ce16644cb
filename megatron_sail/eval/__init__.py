"""Benchmark evaluation: VLMEvalKit-format readers, per-benchmark prompts and scoring rules,
the evaluation runner (with a response cache), the in-training hook and the data-scaling fit."""
