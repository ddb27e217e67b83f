"""Process-wide XLA settings, which must be made before JAX starts a backend.

GPU runs are not reproducible from one process to the next by default: XLA autotunes GEMM and
reduction kernels by timing them, so two processes with the same seed can pick different
kernels. Training is chaotic enough that this changes which program a model ranks first: on an
H100, the default config with seed 0 gave predictions up to 24.7 apart between two processes.
``--xla_gpu_deterministic_ops=true`` removes that: two processes then agree bit for bit
(bench/README.md). XLA reads ``XLA_FLAGS`` once, when JAX first starts a backend, so the flag
has to be in the environment before that; ``train.py`` and the bench scripts set it from the
config. This module does not import JAX.

``quiet_backend_probe_logs`` drops the INFO line JAX logs at every start on a machine without
a TPU ("Unable to initialize backend 'tpu': ... libtpu.so ..."): probing for a TPU is normal,
not news.
"""

from __future__ import annotations

import logging
import os
from collections.abc import MutableMapping
from typing import Any

DETERMINISTIC_GPU_FLAG = "--xla_gpu_deterministic_ops=true"
_FLAG_NAME = "--xla_gpu_deterministic_ops"


def _flag_value(flags: str) -> str | None:
  value = None
  for token in flags.split():
    name, _, v = token.partition("=")
    if name == _FLAG_NAME:
      value = v or "true"
  return value


def deterministic_gpu_ops_enabled(environ: MutableMapping[str, str] | None = None) -> bool:
  """Whether ``XLA_FLAGS`` asks for deterministic GPU kernels."""
  environ = os.environ if environ is None else environ
  return (_flag_value(environ.get("XLA_FLAGS", "")) or "").lower() in ("true", "1")


def enable_deterministic_gpu_ops(environ: MutableMapping[str, str] | None = None) -> bool:
  """Adds ``--xla_gpu_deterministic_ops=true`` to ``XLA_FLAGS`` unless the flag is already set.

  Call it before the first JAX computation of the process. An explicit setting in the
  environment (either value) is left alone.

  Returns:
    True if the flag was added by this call.
  """
  environ = os.environ if environ is None else environ
  flags = environ.get("XLA_FLAGS", "")
  if _flag_value(flags) is not None:
    return False
  environ["XLA_FLAGS"] = f"{flags} {DETERMINISTIC_GPU_FLAG}".strip()
  return True


def apply_config(config: Any) -> None:
  """Makes a training config's process-wide XLA settings (``config.deterministic_gpu_ops``).

  ``config``: the training ``ConfigDict`` or its ``tlp_jax.train.config.TrainConfig``. Entry
  points call it before JAX starts a backend.
  """
  if config.deterministic_gpu_ops:
    enable_deterministic_gpu_ops()


# JAX logs its backend probing through this Python logger.
_BACKEND_LOGGER = "jax._src.xla_bridge"


class _NoBackendProbeInfo(logging.Filter):
  """Drops JAX's INFO records about a backend (TPU, ...) it probed for and did not find."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (
      record.levelno <= logging.INFO and str(record.msg).startswith("Unable to initialize backend")
    )


_NO_BACKEND_PROBE_INFO = _NoBackendProbeInfo()


def quiet_backend_probe_logs() -> None:
  """Silences JAX's INFO lines about backends it did not find at start-up (e.g. libtpu).

  Idempotent; warnings and errors of the same logger are kept. Call it before JAX starts a
  backend.
  """
  logger = logging.getLogger(_BACKEND_LOGGER)
  if _NO_BACKEND_PROBE_INFO not in logger.filters:
    logger.addFilter(_NO_BACKEND_PROBE_INFO)
