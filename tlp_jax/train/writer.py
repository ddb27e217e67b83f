"""Training metrics to TensorBoard event files and to the log.

Tags are grouped by prefix, so TensorBoard shows one section each: ``train/...`` (loss, grad
norm, learning rate, throughput), ``val/...`` (loss and top-k per head) and ``time/...`` (where
each validated epoch's wall time went: the whole epoch, its validation, its checkpoints). The
run's config is written as TensorBoard hparams (the HPARAMS tab: one row per run, every config
field a column, next to the final validation metrics), not as text.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

# The hparams plugin accepts these value types; anything else (tuples, None) is written as text.
_HPARAM_TYPES = (bool, int, float, str)


def flat_hparams(
  hparams: Mapping[str, Any], prefix: str = ""
) -> dict[str, bool | int | float | str]:
  """``{dotted.name: value}`` of a nested config dict, values the hparams plugin accepts."""
  out: dict[str, bool | int | float | str] = {}
  for k, v in hparams.items():
    name = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(flat_hparams(v, name + "."))
    elif isinstance(v, _HPARAM_TYPES):
      out[name] = v
    else:
      out[name] = str(list(v) if isinstance(v, tuple) else v)
  return out


class MetricWriter:
  """Scalars to TensorBoard event files in ``logdir`` and to the log.

  Methods like ``clu.metric_writers.MetricWriter`` (``write_scalars``, ``write_hparams``,
  ``flush``, ``close``), written with tensorboardX (clu's TensorBoard writer needs TensorFlow,
  which this project does not install); only process 0 writes files.
  """

  def __init__(self, logdir: str, enabled: bool = True):
    self._writer = None
    if enabled:
      import tensorboardX  # optional heavy dependency, only for the process that writes

      self._writer = tensorboardX.SummaryWriter(logdir=logdir, flush_secs=30)

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    """Writes ``{tag: value}`` at ``step`` (tags like ``train/loss``, ``val/top1/epyc-9004``)."""
    logging.info("[%d] %s", step, ", ".join(f"{k}={float(v):.6g}" for k, v in scalars.items()))
    if self._writer is not None:
      for k, v in scalars.items():
        self._writer.add_scalar(k, float(v), global_step=step)

  def write_hparams(self, hparams: Mapping[str, Any], metric_tags: Sequence[str]) -> None:
    """Records the run's config as TensorBoard hparams, in this run's own event file.

    Args:
      hparams: the (nested) config dict; fields become dotted names.
      metric_tags: scalar tags the HPARAMS tab shows next to the config (their last value).
    """
    if self._writer is None:
      return
    from tensorboardX.summary import hparams as hparams_summary

    # SummaryWriter.add_hparams would write them into a new sub-run (a timestamped folder) and
    # add fake metric values; the three summaries in this run's file are what the plugin reads.
    summaries = hparams_summary(flat_hparams(hparams), {t: 0.0 for t in metric_tags})
    file_writer = self._writer.file_writer
    for summary in summaries:
      file_writer.add_summary(summary)

  def flush(self) -> None:
    """Flushes pending events to disk."""
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    """Flushes and closes the event file."""
    if self._writer is not None:
      self._writer.close()
      self._writer = None
