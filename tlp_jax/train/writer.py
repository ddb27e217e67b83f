"""Training metrics to TensorBoard event files and to the log."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any


class MetricWriter:
  """Scalars to TensorBoard event files in ``logdir`` and to the log.

  Same methods as ``clu.metric_writers.MetricWriter`` (``write_scalars``, ``write_hparams``,
  ``flush``, ``close``). clu's TensorBoard writer needs TensorFlow, which this project does not
  install, so the events are written with tensorboardX; only process 0 writes files.
  """

  def __init__(self, logdir: str, enabled: bool = True):
    self._writer = None
    if enabled:
      import tensorboardX  # optional heavy dependency, only for the process that writes

      self._writer = tensorboardX.SummaryWriter(logdir=logdir, flush_secs=30)

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    """Writes ``{name: value}`` at ``step``."""
    logging.info("[%d] %s", step, ", ".join(f"{k}={float(v):.6g}" for k, v in scalars.items()))
    if self._writer is not None:
      for k, v in scalars.items():
        self._writer.add_scalar(k, float(v), global_step=step)

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    """Records the run's hyper-parameters as a text summary."""
    if self._writer is not None:
      self._writer.add_text("hparams", json.dumps(hparams, indent=1, default=str), 0)

  def flush(self) -> None:
    """Flushes pending events to disk."""
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    """Flushes and closes the event file."""
    if self._writer is not None:
      self._writer.close()
      self._writer = None
