"""Benchmarks of tlp-jax. Run each from the repository root as ``python -m bench.<script>``."""
