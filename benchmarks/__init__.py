"""Benchmark suites of bnn_fast; see benchmarks/README.md. Run one as `python -m benchmarks.<suite>`."""
