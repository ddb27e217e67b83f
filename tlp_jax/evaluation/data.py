"""The programs an evaluation scores: one split of a built dataset, on one hardware.

NumPy only. :func:`eval_data` keeps the programs of the split that have a valid measurement on
the hardware and recovers their latencies from the normalised scores, as TLP does.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np

from data_pipelines import schema
from tlp_jax.core import metrics


class EvalError(ValueError):
  """A user-facing evaluation error (unknown hardware, missing model head, ...)."""


@dataclasses.dataclass(frozen=True)
class EvalData:
  """The programs of one split for one hardware, with what top-k needs.

  Attributes:
    hardware: the hardware evaluated.
    split: split name.
    split_features: ``(M, L, E)`` float32 features of *all* programs of the split (possibly a
      memory map); ``split_features[rows]`` are the valid ones (see :attr:`features`).
    split_loop_tokens: ``(M, T, W)`` float16 loop tokens of all programs of the split, for a
      dataset of loop tokens (None otherwise); aligned with ``split_features``.
    score: ``(N,)`` true normalised score (``min_cost / cost``) on ``hardware``.
    latency: ``(N,)`` true latency (seconds), from the score as TLP does.
    task_index: ``(N,)`` task of each program (index into ``task_keys``).
    rows: ``(N,)`` row of each program in the split's arrays (to align extra predictions).
    task_keys: ``(T,)`` workload keys.
    networks: the evaluation networks.
    num_split_programs: programs in the split, valid on ``hardware`` or not.
  """

  hardware: str
  split: str
  split_features: np.ndarray
  score: np.ndarray
  latency: np.ndarray
  task_index: np.ndarray
  rows: np.ndarray
  task_keys: tuple[str, ...]
  networks: tuple[metrics.NetworkTasks, ...]
  num_split_programs: int
  split_loop_tokens: np.ndarray | None = None

  @property
  def features(self) -> np.ndarray:
    """``(N, L, E)`` features of the valid programs (a copy: the evaluation gathers them
    batch by batch instead)."""
    return np.asarray(self.split_features[self.rows])

  @property
  def loop_tokens(self) -> np.ndarray | None:
    """``(N, T, W)`` loop tokens of the valid programs (a copy), or None."""
    if self.split_loop_tokens is None:
      return None
    return np.asarray(self.split_loop_tokens[self.rows])


def hardware_index(hardware: Sequence[str], hw: str, what: str = "the dataset") -> int:
  """Index of ``hw`` in ``hardware``; an :class:`EvalError` listing the known names otherwise."""
  names = [str(h) for h in hardware]
  if hw not in names:
    raise EvalError(f"hardware {hw!r} is not in {what}; available: {', '.join(names) or 'none'}")
  return names.index(hw)


def _network_tasks(arrays) -> tuple[metrics.NetworkTasks, ...]:
  return tuple(
    metrics.NetworkTasks(
      net.label,
      np.asarray(net.task_indices),
      np.asarray(net.weights),
      num_missing=len(getattr(net, "missing_workload_keys", ())),
    )
    for net in arrays.networks
  )


def eval_data(arrays, hw: str, split: str = "test") -> EvalData:
  """The valid programs of ``split`` on hardware ``hw`` from a ``loader.DatasetArrays``.

  Raises:
    EvalError: ``hw`` is not a hardware of the dataset, or ``split`` does not exist.
  """
  h = hardware_index(
    arrays.hardware, hw, what=f"dataset config {getattr(arrays, 'config_name', '?')!r}"
  )
  if split not in schema.SPLITS:
    raise EvalError(f"unknown split {split!r}; choose train, validation or test")
  s = getattr(arrays, split)
  valid = np.asarray(s.mask[:, h], dtype=bool)
  rows = np.flatnonzero(valid)
  task_index = np.asarray(s.task_index)[rows].astype(np.int64)
  score = np.asarray(s.scores[rows, h], dtype=np.float64)
  min_cost = np.asarray(arrays.tasks.min_cost, dtype=np.float64)[:, h]
  latency = metrics.latency_from_score(score, min_cost[task_index])
  logging.info(
    "%s split on %s: %d of %d programs have a valid measurement", split, hw, rows.size, valid.size
  )
  return EvalData(
    hardware=hw,
    split=split,
    split_features=s.features,
    score=score,
    latency=latency,
    task_index=task_index,
    rows=rows,
    task_keys=tuple(arrays.tasks.workload_keys),
    networks=_network_tasks(arrays),
    num_split_programs=int(valid.size),
    split_loop_tokens=getattr(s, "loop_tokens", None),
  )
