"""Complexity of SFT samples (docs/sft_curriculum.md): one score per sample, written to a
sidecar that preprocessing (``--select``) and the curriculum builder read.

samples.py reads the inputs tools/preprocess_data.py reads; sidecar.py writes and reads the
per-shard score files; heuristic.py, ifd.py and judge.py are the three scoring methods;
runner.py runs one method over the inputs, shard by shard, resumably."""
