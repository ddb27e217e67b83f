"""Shared pytest configuration.

XLA_FLAGS must be set before JAX initialises its backends, so it is set here, at import time of
the test session: every test sees 8 CPU devices (the pmap tests need them; single-device tests
pick ``jax.devices()[:1]``).
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
