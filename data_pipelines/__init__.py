"""Turning TenSet / Ansor measure records into datasets for tlp-jax (no TVM needed)."""
