"""What the benchmark and machine-check entry points run (tools/benchmark.py, benchmarks/
hf_reference.py, tools/bench_data_scale.py, tools/gpu_check.py, tools/compare_logits.py): the
reusable part, importable by tests; the tools keep only their command lines."""
