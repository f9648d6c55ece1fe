"""Throughput and quality harnesses of peel_jax (``python -m benchmarks.NAME``); results in benchmarks/RESULTS.md."""
