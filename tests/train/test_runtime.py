"""tlp_jax.train.runtime: the XLA flag that makes GPU runs reproducible across processes."""

import logging
import subprocess
import sys

from configs import default
from tlp_jax.train import runtime


def test_enable_adds_the_flag_once_and_keeps_other_flags():
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  assert not runtime.deterministic_gpu_ops_enabled(env)
  assert runtime.enable_deterministic_gpu_ops(env)
  assert env["XLA_FLAGS"] == (
    "--xla_force_host_platform_device_count=8 --xla_gpu_deterministic_ops=true"
  )
  assert runtime.deterministic_gpu_ops_enabled(env)
  assert not runtime.enable_deterministic_gpu_ops(env)  # already there: unchanged
  assert env["XLA_FLAGS"].count("deterministic") == 1


def test_an_explicit_setting_is_respected():
  env = {"XLA_FLAGS": "--xla_gpu_deterministic_ops=false"}
  assert not runtime.enable_deterministic_gpu_ops(env)
  assert env["XLA_FLAGS"] == "--xla_gpu_deterministic_ops=false"
  assert not runtime.deterministic_gpu_ops_enabled(env)
  empty: dict = {}
  assert runtime.enable_deterministic_gpu_ops(empty)
  assert empty["XLA_FLAGS"] == runtime.DETERMINISTIC_GPU_FLAG


def test_apply_config_follows_the_config(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "")
  config = default.get_config()
  config.deterministic_gpu_ops = False
  runtime.apply_config(config)
  assert not runtime.deterministic_gpu_ops_enabled()
  config.deterministic_gpu_ops = True
  runtime.apply_config(config)
  assert runtime.deterministic_gpu_ops_enabled()


def test_flag_is_accepted_by_jax_on_this_backend_and_runtime_imports_no_jax():
  code = (
    "import sys; from tlp_jax.train import runtime; assert 'jax' not in sys.modules; "
    "runtime.enable_deterministic_gpu_ops(); import jax.numpy as jnp; "
    "print(float(jnp.arange(4.0).sum()))"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "6.0"


def test_backend_probe_info_is_silenced_warnings_kept(caplog):
  logger = logging.getLogger("jax._src.xla_bridge")
  runtime.quiet_backend_probe_logs()
  runtime.quiet_backend_probe_logs()  # idempotent
  with caplog.at_level(logging.INFO, logger="jax._src.xla_bridge"):
    logger.info("Unable to initialize backend 'tpu': INTERNAL: Failed to open libtpu.so")
    logger.warning("An NVIDIA GPU may be present on this machine, but ...")
  assert [r.levelno for r in caplog.records] == [logging.WARNING]
