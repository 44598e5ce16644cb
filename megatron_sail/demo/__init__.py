"""Synthetic demo data, the unlabeled demo pool and the held-out demo benchmarks (examples, tests)."""
