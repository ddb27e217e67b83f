"""Top-k metrics of TLP / TenSet, in plain NumPy (no JAX: eval and the trainer share it).

Definitions (TLP ``scripts/tlp_eval.py`` and TenSet ``scripts/eval_model_on_dataset.py`` use the
same per-network formula)::

    top-k(network) = sum_t w_t * min_latency_t / sum_t w_t * best_k_t

* ``t`` runs over the network's tasks, ``w_t`` is the task's weight (how many times it occurs
  in the network);
* ``best_k_t`` is the fastest *true* latency among the ``k`` programs the model ranks best
  (highest predicted score); when a task has fewer than ``k`` programs, all of them count (as
  the original's ``real_latency[:top_k]`` slice does);
* ``min_latency_t`` is the fastest true latency among all the task's programs;
* true latencies are recovered from the normalised scores exactly as the original does:
  ``latency = min_latency / max(score, 1e-5)`` (:func:`latency_from_score`);
* tasks without any valid program are skipped (removed from both sums) and counted, as the
  original skips a task missing from the dataset.

Aggregates over networks:

* ``mean`` -- TenSet's: the mean of the per-network scores (networks with no valid task are
  left out of the mean and counted);
* ``pooled`` -- TLP's "average top-k": one ratio over all networks,
  ``sum_networks sum_t w_t min_t / sum_networks sum_t w_t best_k_t``.

Ties in predicted scores: the original ranks with ``np.argsort(-preds)`` (quicksort, so tied
programs come out in an unspecified order). Here ranking is a *stable* sort by predicted score
descending, then by program index ascending (the order of the programs in the arrays), so
results are deterministic; for distinct predictions both orders are identical. NaN predictions
rank last.

Random ranking baseline: ``E[best_k_t]`` under a uniformly random order of the task's ``n``
programs is computed exactly (order statistics of ``k`` draws without replacement, see
:func:`expected_random_best_latency`); the network's random top-k is then the formula above
with ``E[best_k_t]`` in place of ``best_k_t``, i.e. the ratio of the best network latency to
the *expected* network latency of a random-ranking tuner. This is exact for what it states (no
sampling); it is not the expectation of the ratio, which has no closed form across tasks.

Oracle: ranking by the true score itself; 1.0 by construction, but computed through the same
code path, as a check of the pipeline.

Everything is vectorised over all programs at once (one grouped sort), so it scales to the
full TenSet (~8.6M programs per hardware).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

# The original clamps normalised scores before turning them back into latencies, so a program
# with (near) zero throughput has latency at most 1e5 x the task's best. The one floor of a
# score in the project: the log-score losses (tlp_jax.train.losses) clamp with it too.
SCORE_FLOOR = 1e-5

DEFAULT_KS = (1, 5, 10, 20)


@dataclasses.dataclass(frozen=True)
class NetworkTasks:
  """The tasks of one evaluation network.

  Attributes:
    name: display name, e.g. ``"resnet_50 (1,224)"``.
    task_indices: ``(m,)`` ints, indices into the task table the programs' ``task_index``
      refers to.
    weights: ``(m,)`` occurrences of each task in the network.
    num_missing: further tasks of the network absent from the task table (no records at all);
      they only add to the skipped count.
  """

  name: str
  task_indices: np.ndarray
  weights: np.ndarray
  num_missing: int = 0

  def __post_init__(self):
    ti = np.asarray(self.task_indices).reshape(-1).astype(np.int64)
    w = np.asarray(self.weights, dtype=np.float64).reshape(-1)
    if ti.shape != w.shape:
      raise ValueError(f"network {self.name!r}: {ti.size} task indices but {w.size} weights")
    if np.any(w < 0) or not np.all(np.isfinite(w)):
      raise ValueError(f"network {self.name!r}: weights must be finite and >= 0")
    object.__setattr__(self, "task_indices", ti)
    object.__setattr__(self, "weights", w)


@dataclasses.dataclass(frozen=True)
class TopKScores:
  """Top-k scores of one ranking on a set of networks.

  Attributes:
    ks: the k values, in column order.
    networks: network names, in row order.
    per_network: ``(num_networks, K)`` top-k per network; NaN where the network has no task
      with a valid program.
    mean: ``(K,)`` TenSet's aggregate, mean of the finite per-network scores.
    pooled: ``(K,)`` TLP's aggregate, one ratio over all networks.
    best_latency: ``(num_networks,)`` ``sum_t w_t * min_latency_t`` (seconds).
    topk_latency: ``(num_networks, K)`` ``sum_t w_t * best_k_t`` (seconds).
    tasks_used: ``(num_networks,)`` tasks that entered the sums.
    tasks_skipped: ``(num_networks,)`` tasks skipped for having no valid program.
  """

  ks: tuple[int, ...]
  networks: tuple[str, ...]
  per_network: np.ndarray
  mean: np.ndarray
  pooled: np.ndarray
  best_latency: np.ndarray
  topk_latency: np.ndarray
  tasks_used: np.ndarray
  tasks_skipped: np.ndarray

  def to_dict(self) -> dict:
    """JSON-ready dict: per-network and aggregate scores keyed by ``"top-k"``."""

    def row(values):
      return {f"top-{k}": json_float(v) for k, v in zip(self.ks, values)}

    return {
      "per_network": {
        name: {
          **row(self.per_network[i]),
          "tasks_used": int(self.tasks_used[i]),
          "tasks_skipped": int(self.tasks_skipped[i]),
        }
        for i, name in enumerate(self.networks)
      },
      "mean": row(self.mean),
      "pooled": row(self.pooled),
    }


def json_float(v) -> float | None:
  """``float(v)``, or None (JSON null) when it is not finite."""
  v = float(v)
  return v if np.isfinite(v) else None


def _check_ks(ks: Iterable[int]) -> tuple[int, ...]:
  ks = tuple(int(k) for k in ks)
  if not ks or min(ks) < 1:
    raise ValueError(f"ks must be non-empty positive integers, got {ks}")
  return ks


def _num_tasks(task_index: np.ndarray, num_tasks: int | None) -> int:
  if task_index.size and task_index.min() < 0:
    raise ValueError("task_index must be >= 0")
  seen = int(task_index.max()) + 1 if task_index.size else 0
  if num_tasks is None:
    return seen
  if seen > num_tasks:
    raise ValueError(f"task_index has {seen - 1} but num_tasks={num_tasks}")
  return int(num_tasks)


def _as_1d(name: str, x, n: int | None = None, dtype=np.float64) -> np.ndarray:
  x = np.asarray(x, dtype=dtype)
  if x.ndim != 1:
    raise ValueError(f"{name} must be 1-D, got shape {x.shape}")
  if n is not None and x.shape[0] != n:
    raise ValueError(f"{name} has {x.shape[0]} entries, expected {n}")
  return x


def latency_from_score(score: np.ndarray, min_latency: np.ndarray) -> np.ndarray:
  """True latency from the normalised score ``min_latency / latency``, as TLP/TenSet do.

  Args:
    score: ``(N,)`` normalised throughput in ``[0, 1]``.
    min_latency: scalar or ``(N,)``, the latency of the task's best program (seconds).

  Returns:
    ``min_latency / max(score, 1e-5)`` as float64.
  """
  score = np.asarray(score, dtype=np.float64)
  return np.asarray(min_latency, dtype=np.float64) / np.maximum(score, SCORE_FLOOR)


def rank_within_tasks(pred: np.ndarray, task_index: np.ndarray):
  """Grouped ranking of programs by predicted score.

  Args:
    pred: ``(N,)`` predicted scores (higher = faster).
    task_index: ``(N,)`` task of each program.

  Returns:
    ``(order, rank, starts)``: ``order`` permutes programs so that tasks are contiguous
    (ascending task index) and, within a task, programs are sorted by ``pred`` descending, ties
    by program index ascending, NaN last; ``rank[j]`` is the 0-based rank of ``order[j]`` within
    its task; ``starts`` are the offsets in ``order`` where each non-empty task begins.
  """
  pred = np.asarray(pred)
  task_index = np.asarray(task_index)
  n = pred.shape[0]
  # lexsort's last key is the primary one; the explicit index key makes ties deterministic
  # independently of the sort algorithm.
  neg = -pred.astype(np.float64)
  order = np.lexsort((np.arange(n), neg, task_index))
  sorted_tasks = task_index[order]
  is_start = np.ones(n, dtype=bool)
  is_start[1:] = sorted_tasks[1:] != sorted_tasks[:-1]
  starts = np.flatnonzero(is_start)
  group = np.cumsum(is_start) - 1
  rank = np.arange(n) - starts[group]
  return order, rank, starts


def best_latency_in_top_k(
  pred, latency, task_index, ks: Sequence[int] = DEFAULT_KS, num_tasks: int | None = None
) -> np.ndarray:
  """Per task, the fastest true latency among the ``k`` best-ranked programs.

  Args:
    pred: ``(N,)`` predicted scores, higher = predicted faster.
    latency: ``(N,)`` true latencies of the valid programs (seconds).
    task_index: ``(N,)`` task of each program.
    ks: the k values.
    num_tasks: size of the task table (default: ``max(task_index) + 1``).

  Returns:
    ``(num_tasks, K)`` float64; NaN rows for tasks without any program.
  """
  ks = _check_ks(ks)
  task_index = _as_1d("task_index", task_index, dtype=np.int64)
  n = task_index.shape[0]
  pred = _as_1d("pred", pred, n)
  latency = _as_1d("latency", latency, n)
  num_tasks = _num_tasks(task_index, num_tasks)
  out = np.full((num_tasks, len(ks)), np.nan)
  if n == 0:
    return out
  order, rank, starts = rank_within_tasks(pred, task_index)
  lat_sorted = latency[order]
  present = task_index[order][starts]
  for j, k in enumerate(ks):
    masked = np.where(rank < k, lat_sorted, np.inf)
    out[present, j] = np.minimum.reduceat(masked, starts)
  return out


def min_latency_per_task(latency, task_index, num_tasks: int | None = None) -> np.ndarray:
  """``(num_tasks,)`` fastest true latency per task; NaN for tasks without programs."""
  task_index = _as_1d("task_index", task_index, dtype=np.int64)
  latency = _as_1d("latency", latency, task_index.shape[0])
  num_tasks = _num_tasks(task_index, num_tasks)
  out = np.full(num_tasks, np.inf)
  np.minimum.at(out, task_index, latency)
  out[np.isinf(out)] = np.nan
  return out


def _log_factorials(n_max: int) -> np.ndarray:
  # log(m!) for m = 0..n_max by cumulative sums: exact enough (relative 1e-12 at n = 1e4) and
  # vectorisable, unlike math.lgamma.
  return np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, n_max + 1, dtype=np.float64)))])


def expected_random_best_latency(
  latency, task_index, ks: Sequence[int] = DEFAULT_KS, num_tasks: int | None = None
) -> np.ndarray:
  """Per task, the exact ``E[best_k]`` when the programs are ranked in a uniformly random order.

  With the task's ``n`` latencies sorted ascending ``x_(1) <= ... <= x_(n)`` and
  ``k' = min(k, n)``, the first ``k'`` programs of a random order are a uniform ``k'``-subset,
  whose minimum is ``x_(i)`` (by position, so ties are handled) with probability
  ``C(n - i, k' - 1) / C(n, k')``; hence ``E[best_k] = sum_i x_(i) C(n-i, k'-1) / C(n, k')``.

  Args:
    latency: ``(N,)`` true latencies of the valid programs.
    task_index: ``(N,)`` task of each program.
    ks: the k values.
    num_tasks: size of the task table (default: ``max(task_index) + 1``).

  Returns:
    ``(num_tasks, K)`` float64; NaN rows for tasks without any program.
  """
  ks = _check_ks(ks)
  task_index = _as_1d("task_index", task_index, dtype=np.int64)
  n_prog = task_index.shape[0]
  latency = _as_1d("latency", latency, n_prog)
  num_tasks = _num_tasks(task_index, num_tasks)
  out = np.full((num_tasks, len(ks)), np.nan)
  if n_prog == 0:
    return out
  # Ranking by -latency sorts each task ascending by latency.
  order, rank, starts = rank_within_tasks(-latency, task_index)
  lat_sorted = latency[order]
  sizes = np.diff(np.append(starts, n_prog))
  n = np.repeat(sizes, sizes)  # task size of each sorted position
  i = rank + 1  # 1-based position in ascending order
  present = task_index[order][starts]
  log_fact = _log_factorials(int(sizes.max()))

  def log_comb(a, b):
    return log_fact[a] - log_fact[b] - log_fact[a - b]

  for j, k in enumerate(ks):
    k_eff = np.minimum(k, n)
    valid = (n - i) >= (k_eff - 1)
    a = np.where(valid, n - i, 0)
    b = np.where(valid, k_eff - 1, 0)
    prob = np.where(valid, np.exp(log_comb(a, b) - log_comb(n, k_eff)), 0.0)
    out[present, j] = np.add.reduceat(prob * lat_sorted, starts)
  return out


def network_top_k(
  best_k: np.ndarray,
  min_latency: np.ndarray,
  networks: Sequence[NetworkTasks],
  ks: Sequence[int] = DEFAULT_KS,
) -> TopKScores:
  """Combines per-task latencies into per-network top-k and the two aggregates.

  Args:
    best_k: ``(T, K)`` per-task best latency in the top k (NaN = task has no valid program).
    min_latency: ``(T,)`` per-task best latency (NaN = no valid program).
    networks: the evaluation networks; their ``task_indices`` index rows of ``best_k``.
    ks: the k values of ``best_k``'s columns.

  Returns:
    A :class:`TopKScores`.
  """
  ks = _check_ks(ks)
  best_k = np.asarray(best_k, dtype=np.float64)
  min_latency = np.asarray(min_latency, dtype=np.float64)
  if best_k.ndim != 2 or best_k.shape != (min_latency.shape[0], len(ks)):
    raise ValueError(
      f"best_k shape {best_k.shape} does not match ({min_latency.shape[0]}, {len(ks)})"
    )
  num_tasks = min_latency.shape[0]
  num_net = len(networks)
  best_sum = np.zeros(num_net)
  topk_sum = np.zeros((num_net, len(ks)))
  used = np.zeros(num_net, dtype=np.int64)
  skipped = np.zeros(num_net, dtype=np.int64)
  for i, net in enumerate(networks):
    ti = net.task_indices
    if ti.size and (ti.min() < 0 or ti.max() >= num_tasks):
      raise ValueError(
        f"network {net.name!r} refers to task {ti.max()} but only {num_tasks} tasks exist"
      )
    ok = np.isfinite(min_latency[ti]) & np.all(np.isfinite(best_k[ti]), axis=1)
    used[i] = int(ok.sum())
    skipped[i] = int(ti.size - used[i]) + int(net.num_missing)
    w = net.weights[ok]
    best_sum[i] = float(np.sum(w * min_latency[ti[ok]]))
    topk_sum[i] = np.sum(w[:, None] * best_k[ti[ok]], axis=0)
    if skipped[i]:
      logging.debug(
        "network %s: %d of %d tasks have no valid program; skipped",
        net.name,
        skipped[i],
        ti.size + net.num_missing,
      )
  with np.errstate(invalid="ignore", divide="ignore"):
    per_network = np.where(topk_sum > 0, best_sum[:, None] / topk_sum, np.nan)
    finite = np.isfinite(per_network)
    counts = finite.sum(axis=0)
    mean = np.where(counts > 0, np.where(finite, per_network, 0.0).sum(axis=0) / counts, np.nan)
    total_topk = topk_sum.sum(axis=0)
    pooled = np.where(total_topk > 0, best_sum.sum() / total_topk, np.nan)
  return TopKScores(
    ks=ks,
    networks=tuple(n.name for n in networks),
    per_network=per_network,
    mean=mean,
    pooled=pooled,
    best_latency=best_sum,
    topk_latency=topk_sum,
    tasks_used=used,
    tasks_skipped=skipped,
  )


def top_k_scores(
  pred,
  latency,
  task_index,
  networks: Sequence[NetworkTasks],
  ks: Sequence[int] = DEFAULT_KS,
  num_tasks: int | None = None,
) -> TopKScores:
  """TLP/TenSet top-k of a model's ranking (see the module docstring)."""
  best = best_latency_in_top_k(pred, latency, task_index, ks, num_tasks)
  mins = min_latency_per_task(latency, task_index, best.shape[0])
  return network_top_k(best, mins, networks, ks)


def random_top_k_scores(
  latency,
  task_index,
  networks: Sequence[NetworkTasks],
  ks: Sequence[int] = DEFAULT_KS,
  num_tasks: int | None = None,
) -> TopKScores:
  """Top-k of a uniformly random ranking, with the exact per-task ``E[best_k]``."""
  expected = expected_random_best_latency(latency, task_index, ks, num_tasks)
  mins = min_latency_per_task(latency, task_index, expected.shape[0])
  return network_top_k(expected, mins, networks, ks)


def oracle_top_k_scores(
  latency,
  task_index,
  networks: Sequence[NetworkTasks],
  ks: Sequence[int] = DEFAULT_KS,
  num_tasks: int | None = None,
) -> TopKScores:
  """Top-k of the ranking by true latency (1.0 by construction, computed as a check)."""
  latency = np.asarray(latency, dtype=np.float64)
  return top_k_scores(-latency, latency, task_index, networks, ks, num_tasks)


def quick_top_ks(
  pred, score, task_index, ks: Sequence[int] = DEFAULT_KS, mask=None
) -> dict[int, np.ndarray]:
  """Cheap validation top-k: mean over tasks of the best true score among the top-k predicted,
  relative to the task's best score among the given programs.

  Unweighted (no networks), for monitoring training. Each task's term is the best score in its
  top k divided by its best score over the programs given (the valid ones of ``mask``), i.e.
  ``min_latency / best_k`` with both latencies taken within these programs: the per-task term of
  the full metric (without the 1e-5 score floor), whose oracle is 1.0. Scores normalised over a
  larger set (TenSet labels use each task's best over all its programs, of every split) are
  renormalised here, so a validation split's top-k is measured against what it holds. A task
  whose best score is not positive is left out.

  Args:
    pred: ``(N,)`` or ``(N, H)`` predicted scores.
    score: same shape, true scores (higher is better, proportional to 1 / latency within a
      task; any per-task scale).
    task_index: ``(N,)`` task of each program.
    ks: the k values.
    mask: optional, same shape as ``score``; False entries (no valid measurement) are ignored.

  Returns:
    ``{k: value}``: a float64 scalar for 1-D inputs, an ``(H,)`` array for 2-D inputs (one per
    head); NaN where no task has a valid program with a positive score.
  """
  ks = _check_ks(ks)
  pred = np.asarray(pred)
  score = np.asarray(score)
  if pred.shape != score.shape:
    raise ValueError(f"pred shape {pred.shape} != score shape {score.shape}")
  if mask is None:
    mask = np.ones(score.shape, dtype=bool)
  mask = np.asarray(mask, dtype=bool)
  if mask.shape != score.shape:
    raise ValueError(f"mask shape {mask.shape} != score shape {score.shape}")
  task_index = _as_1d("task_index", task_index, pred.shape[0], dtype=np.int64)
  if pred.ndim == 1:
    return {
      k: v[0]
      for k, v in _quick_top_ks_heads(
        pred[:, None], score[:, None], mask[:, None], task_index, ks
      ).items()
    }
  if pred.ndim != 2:
    raise ValueError(f"pred must be 1-D or 2-D, got shape {pred.shape}")
  return _quick_top_ks_heads(pred, score, mask, task_index, ks)


def _quick_top_ks_heads(pred, score, mask, task_index, ks) -> dict[int, np.ndarray]:
  heads = pred.shape[1]
  out = {k: np.full(heads, np.nan) for k in ks}
  for h in range(heads):
    m = mask[:, h]
    if not m.any():
      continue
    order, rank, starts = rank_within_tasks(pred[m, h], task_index[m])
    s = score[m, h].astype(np.float64)[order]
    oracle = np.maximum.reduceat(s, starts)
    ok = oracle > 0  # a task whose best score is 0 has no finite latency to compare with
    if not ok.any():
      continue
    for k in ks:
      best = np.maximum.reduceat(np.where(rank < k, s, -np.inf), starts)
      out[k][h] = float((best[ok] / oracle[ok]).mean())
  return out


def quick_top_k(pred, score, task_index, k: int = 1, mask=None):
  """:func:`quick_top_ks` for a single ``k``: a float (1-D inputs) or ``(H,)`` array."""
  return quick_top_ks(pred, score, task_index, (k,), mask)[k]


def scores_by_name(results: Mapping[str, TopKScores]) -> dict:
  """``{row name: TopKScores.to_dict()}`` for a JSON report."""
  return {name: r.to_dict() for name, r in results.items()}
