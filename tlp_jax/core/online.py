"""Online refit of a TLP model's last layer on the tuner's own measurements (NumPy only).

A trained model scores a program ``s(x) = phi(x) . w + c``: ``phi`` is the input of the last
(linear) decoder layer summed over the program's rows (``Predictor.embed``), ``w, c`` that layer
(``Predictor.last_layer``). While Ansor tunes, every round measures a few programs on the machine
being tuned; :func:`fit` finds a change ``dw`` of ``w`` so that ``phi . (w + dw)`` ranks the
programs measured so far as this machine does, *within each task* (the training loss of
``configs/default.py``: pairwise logistic, each pair weighted by its log-latency ratio), with a
ridge penalty that keeps ``dw`` at 0 while there are few measurements.

The frozen scores enter as each pair's offset, so ``dw`` only corrects what the model gets
wrong here. The fit is Newton's method on a convex objective with a fixed number of steps, over
at most ``max_pairs`` pairs drawn with a fixed seed: its cost is bounded per round
(``O(max_pairs * d^2)``) and it is deterministic given the measurements.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class OnlineConfig:
  """Options of :func:`fit`.

  Attributes:
    l2: ridge strength on ``dw`` in standardised embedding units; the pair weights have mean 1,
      so ``dw`` moves once there are many more than ``l2`` pairs.
    max_pairs: pairs used per fit at most (drawn per task in proportion to its pair count); bounds
      the time of a fit.
    iterations: Newton steps (each with step halving, so the objective never rises).
    seed: seed of the pair draw.
  """

  l2: float = 10.0
  max_pairs: int = 16384
  iterations: int = 8
  seed: int = 0

  def __post_init__(self):
    if not self.l2 > 0 or self.max_pairs < 1 or self.iterations < 1:
      raise ValueError(f"bad OnlineConfig {self}: need l2 > 0, max_pairs >= 1, iterations >= 1")


@dataclasses.dataclass(frozen=True)
class FitStats:
  """What one :func:`fit` used: measurements with a valid cost, their tasks, pairs, loss."""

  measurements: int
  tasks: int
  pairs: int
  loss_before: float
  loss_after: float


def ranking_pairs(
  groups: np.ndarray, costs: np.ndarray, max_pairs: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Pairs ``(i, j, weight)`` of programs of one group with ``costs[i] < costs[j]``.

  ``weight = log(costs[j] / costs[i])`` (how many times slower ``j`` is, in nats). Programs with
  a non-finite or non-positive cost are left out. When the groups hold more than ``max_pairs``
  pairs, each group gets its share (in proportion to its pair count) drawn with ``seed``; ties
  drawn are dropped, so a draw may return fewer pairs.
  """
  costs = np.asarray(costs, np.float64)
  groups = np.asarray(groups)
  ok = np.isfinite(costs) & (costs > 0)
  idx_all = np.nonzero(ok)[0]
  order = np.argsort(groups[idx_all], kind="stable")
  idx_all = idx_all[order]
  _, starts, counts = np.unique(groups[idx_all], return_index=True, return_counts=True)
  total = int(np.sum(counts * (counts - 1) // 2))
  rng = np.random.default_rng(seed)
  out_i, out_j = [], []
  for start, n in zip(starts, counts):
    members = idx_all[start : start + n]
    if n < 2:
      continue
    if total <= max_pairs:
      a, b = np.triu_indices(n, k=1)
    else:
      share = int(np.ceil(max_pairs * (n * (n - 1) // 2) / total))
      a = rng.integers(0, n, share)
      b = rng.integers(0, n - 1, share)
      b = b + (b >= a)  # a != b, uniform over ordered pairs
    a, b = members[a], members[b]
    faster_first = costs[a] < costs[b]
    keep = costs[a] != costs[b]
    out_i.append(np.where(faster_first, a, b)[keep])
    out_j.append(np.where(faster_first, b, a)[keep])
  if not out_i:
    empty = np.zeros(0, np.int64)
    return empty, empty, np.zeros(0)
  i, j = np.concatenate(out_i), np.concatenate(out_j)
  if len(i) > max_pairs:
    i, j = i[:max_pairs], j[:max_pairs]
  return i, j, np.log(costs[j] / costs[i])


def _objective(margins: np.ndarray, weights: np.ndarray, v: np.ndarray, l2: float) -> float:
  # sum_pairs w * -log(sigmoid(margin)) + l2/2 |v|^2
  return float(np.sum(weights * np.logaddexp(0.0, -margins)) + 0.5 * l2 * v @ v)


def fit(
  embeddings: np.ndarray,
  base_scores: np.ndarray,
  groups: np.ndarray,
  costs: np.ndarray,
  config: OnlineConfig = OnlineConfig(),
) -> tuple[np.ndarray, FitStats]:
  """The change ``dw`` of the last layer that ranks the measured programs within their tasks.

  Args:
    embeddings: ``(N, d)`` ``phi`` of the measured programs.
    base_scores: ``(N,)`` their frozen scores (higher = predicted faster).
    groups: ``(N,)`` task of each program (any hashable values NumPy can sort).
    costs: ``(N,)`` measured costs (lower = faster); non-finite or <= 0 = failed, left out.
    config: :class:`OnlineConfig`.

  Returns:
    ``dw`` (``(d,)`` float64, in ``embeddings``' units: new scores are ``base + phi @ dw``) and
    :class:`FitStats`. Without any pair (fewer than two valid programs in every task) ``dw`` is 0.
  """
  phi = np.asarray(embeddings, np.float64)
  base = np.asarray(base_scores, np.float64).reshape(-1)
  costs = np.asarray(costs, np.float64).reshape(-1)
  groups = np.asarray(groups).reshape(-1)
  n, d = phi.shape
  if not len(base) == len(costs) == len(groups) == n:
    raise ValueError(
      f"embeddings ({n}), base_scores ({len(base)}), groups ({len(groups)}) and costs "
      f"({len(costs)}) must have one entry per program"
    )
  ok = np.isfinite(costs) & (costs > 0)
  stats = dict(measurements=int(ok.sum()), tasks=len(np.unique(groups[ok])))
  i, j, weights = ranking_pairs(groups, costs, config.max_pairs, config.seed)
  dw = np.zeros(d)
  if len(i) == 0:
    return dw, FitStats(pairs=0, loss_before=0.0, loss_after=0.0, **stats)
  weights = weights / weights.mean()
  # Standardised columns: one l2 for embeddings of any scale; constant columns stay put.
  scale = phi[ok].std(axis=0)
  scale[~(scale > 1e-12)] = 1.0
  diff = (phi[i] - phi[j]) / scale  # (P, d)
  offset = base[i] - base[j]
  v = np.zeros(d)
  loss = loss0 = _objective(offset, weights, v, config.l2)
  for _ in range(config.iterations):
    margins = offset + diff @ v
    p_wrong = 0.5 * (1.0 - np.tanh(0.5 * margins))  # sigmoid(-margin), stable
    grad = -diff.T @ (weights * p_wrong) + config.l2 * v
    curvature = weights * p_wrong * (1.0 - p_wrong)
    hess = (diff * curvature[:, None]).T @ diff + config.l2 * np.eye(d)
    step = np.linalg.solve(hess, grad)
    t = 1.0
    for _ in range(20):  # step halving: the objective never rises
      candidate = v - t * step
      new_loss = _objective(offset + diff @ candidate, weights, candidate, config.l2)
      if new_loss <= loss:
        v, loss = candidate, new_loss
        break
      t *= 0.5
    else:
      break
  dw = v / scale
  return dw, FitStats(pairs=len(i), loss_before=loss0, loss_after=loss, **stats)
