"""Benchmarks of the pipeline against the classic precompute loop; run with ``python -m bench``."""
