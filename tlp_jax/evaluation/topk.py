"""Top-k of a predict function on an :class:`~tlp_jax.evaluation.data.EvalData`, as a report.

NumPy only. Predictions are made in batches over every valid program of the split, then scored
with :mod:`tlp_jax.core.metrics`. The report puts the model next to the exact random-ranking
expectation, the oracle and any extra named baselines (per-program prediction arrays, e.g. an
XGBoost model on Ansor features), so all rows share the same programs, tasks, networks and split.
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import threadpoolctl
import tqdm

from tlp_jax.core import metrics
from tlp_jax.evaluation.data import EvalData, EvalError

RANDOM_ROW = "random (exact expectation)"
ORACLE_ROW = "oracle"
# Points of the predicted-vs-measured scatter kept in the report (a deterministic subsample).
SCATTER_POINTS = 5000


def predict_in_batches(
  predict: Callable[..., np.ndarray],
  features: np.ndarray,
  rows: np.ndarray | None = None,
  batch_size: int = 4096,
  desc: str = "predict",
  loop_tokens: np.ndarray | None = None,
  workers: int = 1,
) -> np.ndarray:
  """``predict(features[rows])`` (or ``predict(features[rows], loop_tokens[rows])``) in
  batches, as float64.

  Only ``workers`` batches of features (and tokens) are gathered at a time, so a memory-mapped
  split of TenSet size is never copied whole into memory, nor the model's padded input block made
  for it.

  Args:
    predict: ``(B, L, E) -> (B,)``, or ``((B, L, E), (B, T, W)) -> (B,)`` with ``loop_tokens``;
      called from ``workers`` threads at once (the NumPy predictor is safe to).
    features: ``(M, L, E)`` features.
    rows: indices into ``features`` to predict (default: all, in order).
    batch_size: programs per call of ``predict``.
    desc: progress-bar label.
    loop_tokens: ``(M, T, W)`` loop tokens aligned with ``features``, passed to ``predict``.
    workers: threads predicting batches at once, each with a one-thread BLAS (NumPy releases
      the GIL in its kernels: a whole core per thread); 0 = one per core. A program's score does
      not depend on its batch nor, with a one-thread BLAS, on the thread count: the scores are
      the same for any number.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if workers < 0:
    raise ValueError(f"workers must be >= 0, got {workers}")
  if rows is None:
    rows = np.arange(features.shape[0])
  n = rows.shape[0]
  out = np.empty(n, dtype=np.float64)
  starts = range(0, n, batch_size)
  workers = min(workers or os.cpu_count() or 1, len(starts))

  def one(start: int) -> int:
    stop = min(start + batch_size, n)
    batch = rows[start:stop]
    args = (np.asarray(features[batch]),)
    if loop_tokens is not None:
      args += (np.asarray(loop_tokens[batch]),)
    # A model that overflows is reported once, by _check_finite, as one clear error: NumPy's
    # overflow / invalid-value warnings on the way would only be noise before it.
    with np.errstate(over="ignore", invalid="ignore"):
      pred = np.asarray(predict(*args), dtype=np.float64).reshape(-1)
    if pred.shape[0] != stop - start:
      raise ValueError(f"predictor returned {pred.shape[0]} values for {stop - start} programs")
    out[start:stop] = pred
    return start

  bar = tqdm.tqdm(total=len(starts), desc=desc, unit="batch", disable=len(starts) <= 1)
  # A one-thread BLAS in every case: a multi-threaded BLAS splits its matmuls by thread count and
  # changes the scores' last bits, so the scores would depend on the machine's cores.
  with bar, threadpoolctl.threadpool_limits(1, user_api="blas"):
    if workers <= 1:
      for start in starts:
        one(start)
        bar.update(1)
    else:
      with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for _ in pool.map(one, starts):
          bar.update(1)
  return out


def _check_finite(
  pred: np.ndarray, data: EvalData, model_name: str, model_info: Mapping[str, Any] | None
) -> None:
  """Non-finite predictions mean a broken model (weights or overflow): no ranking of it is
  meaningful, and a report of it would not be valid JSON. Raises :class:`EvalError`."""
  bad = np.flatnonzero(~np.isfinite(pred))
  if bad.size == 0:
    return
  info = model_info or {}
  source = info.get("model_file") or info.get("workdir")
  where = f" ({source})" if source else ""
  raise EvalError(
    f"model {model_name!r}{where} predicted {bad.size} non-finite scores (NaN/inf) for "
    f"{pred.size} programs of the {data.split} split (split rows "
    f"{', '.join(str(int(r)) for r in data.rows[bad[:5]])}{', ...' if bad.size > 5 else ''}); "
    "its weights are broken or overflow: no report written"
  )


def _row(scores: metrics.TopKScores, data: EvalData, pred: np.ndarray | None = None) -> dict:
  """A report row; ranked rows (with predictions) also get the unweighted all-task mean."""
  d = scores.to_dict()
  if pred is not None:
    q = metrics.quick_top_ks(pred, data.score, data.task_index, scores.ks)
    d["task_mean"] = {f"top-{k}": metrics.json_float(q[k]) for k in scores.ks}
  return d


def _scatter(pred: np.ndarray, score: np.ndarray, seed: int = 0) -> dict:
  n = pred.shape[0]
  idx = np.arange(n)
  if n > SCATTER_POINTS:
    idx = np.sort(np.random.default_rng(seed).choice(n, SCATTER_POINTS, replace=False))
  return {"pred": pred[idx].tolist(), "score": score[idx].tolist(), "total": int(n)}


def costliest_tasks(pred: np.ndarray, data: EvalData, limit: int = 10) -> list[dict]:
  """The tasks whose top-1 pick costs the pooled (TLP) top-1 the most, costliest first.

  Pooled top-1 is ``sum_t W_t * min_t / sum_t W_t * pick_t`` over the evaluation tasks, with
  ``W_t`` the task's occurrences summed over the networks. A task's *excess* is
  ``W_t * (pick_t - min_t)``: the latency its top-1 pick adds. One badly ranked heavy task can
  decide the whole score, and this list shows which one.

  Args:
    pred: ``(N,)`` predictions for the split's valid programs (higher = faster).
    data: the split.
    limit: at most this many tasks (only tasks with a non-zero excess are listed).

  Returns:
    One dict per task: ``task`` (index), ``workload_key``, ``networks``, ``weight`` (``W_t``),
    ``num_programs``, ``best_latency_share`` (its share of ``sum W_t * min_t``), ``pick_ratio``
    (``pick_t / min_t``), ``excess_share`` (its share of all the excess) and
    ``pooled_top1_if_fixed`` (pooled top-1 had this task's pick been its best program).
  """
  num_tasks = len(data.task_keys)
  pick = metrics.best_latency_in_top_k(pred, data.latency, data.task_index, (1,), num_tasks)[:, 0]
  best = metrics.min_latency_per_task(data.latency, data.task_index, num_tasks)
  weight = np.zeros(num_tasks)
  names: list[list[str]] = [[] for _ in range(num_tasks)]
  for net in data.networks:
    for t, w in zip(net.task_indices, net.weights):
      if np.isfinite(pick[t]) and np.isfinite(best[t]):
        weight[t] += w
        names[t].append(net.name)
  present = weight > 0
  best_sum = float(np.sum(weight[present] * best[present]))
  pick_sum = float(np.sum(weight[present] * pick[present]))
  excess = np.zeros(num_tasks)
  excess[present] = weight[present] * (pick[present] - best[present])
  total_excess = float(excess.sum())
  out = []
  for t in np.argsort(-excess, kind="stable")[:limit]:
    if excess[t] <= 0:
      break
    out.append(
      {
        "task": int(t),
        "workload_key": str(data.task_keys[t]),
        "networks": names[t],
        "weight": float(weight[t]),
        "num_programs": int(np.count_nonzero(data.task_index == t)),
        "best_latency_share": float(weight[t] * best[t] / best_sum),
        "pick_ratio": float(pick[t] / best[t]),
        "excess_share": float(excess[t] / total_excess),
        "pooled_top1_if_fixed": float(best_sum / (pick_sum - excess[t])),
      }
    )
  return out


def topk_report(
  data: EvalData,
  predict: Callable[..., np.ndarray],
  *,
  model_name: str = "model",
  ks: Sequence[int] = metrics.DEFAULT_KS,
  extra_predictions: Mapping[str, np.ndarray] | None = None,
  batch_size: int = 4096,
  model_info: Mapping[str, Any] | None = None,
  loop_tokens: bool = False,
  workers: int = 0,
) -> dict:
  """Top-k report of a model on one split/hardware, with random, oracle and extra rows.

  Args:
    data: the split (see :func:`tlp_jax.evaluation.data.eval_data`).
    predict: ``features (B, L, E) -> (B,)`` predicted scores (higher = faster) for
      ``data.hardware``; see :func:`tlp_jax.evaluation.run.predictor_fn`.
    model_name: the model's row name.
    ks: the k values.
    extra_predictions: ``{row name: (num_split_programs,) predictions}`` aligned with the rows of
      the split's arrays (all programs of the split, valid on the hardware or not: only the
      valid ones are used), e.g. a baseline cost model.
    batch_size: prediction batch size.
    model_info: JSON-able description of the model (path, heads, ...) stored in the report.
    loop_tokens: ``predict`` also takes the programs' loop tokens (``(B, T, W)``, from
      ``data.split_loop_tokens``), for a model of loop tokens.
    workers: threads predicting at once (``predict_in_batches``; 0 = one per core).

  Returns:
    A JSON-able report dict: ``hardware``, ``split``, ``ks``, counts (``max_task_programs``:
    the most programs of one task), ``networks`` (name,
    tasks, weights), ``rows`` (row name -> per-network / ``mean`` (TenSet) / ``pooled`` (TLP)
    top-k, plus ``task_mean``, the unweighted mean over all tasks of the split, for ranked
    rows), ``costliest_tasks`` (:func:`costliest_tasks` of the model) and ``scatter`` (a
    subsample of model predictions vs measured scores).

  Raises:
    EvalError: the model predicts a non-finite score, extra predictions do not align with the
      split, or their name clashes.
  """
  ks = tuple(int(k) for k in ks)
  num_tasks = len(data.task_keys)
  args = (data.latency, data.task_index, data.networks, ks, num_tasks)
  if loop_tokens and data.split_loop_tokens is None:
    raise EvalError(
      f"{model_name} reads loop tokens but the {data.split} split has none "
      "(build the dataset with loop tokens)"
    )
  pred = predict_in_batches(
    predict,
    data.split_features,
    data.rows,
    batch_size,
    desc=f"predict {model_name}",
    loop_tokens=data.split_loop_tokens if loop_tokens else None,
    workers=workers,
  )
  _check_finite(pred, data, model_name, model_info)
  rows = {model_name: _row(metrics.top_k_scores(pred, *args), data, pred)}
  for name, extra in (extra_predictions or {}).items():
    extra = np.asarray(extra, dtype=np.float64).reshape(-1)
    if extra.shape[0] != data.num_split_programs:
      raise EvalError(
        f"extra predictions {name!r} have {extra.shape[0]} entries; the "
        f"{data.split} split has {data.num_split_programs} programs"
      )
    if name in rows or name in (RANDOM_ROW, ORACLE_ROW):
      raise EvalError(f"extra predictions name {name!r} clashes with another row")
    p = extra[data.rows]
    rows[name] = _row(metrics.top_k_scores(p, *args), data, p)
  rows[RANDOM_ROW] = _row(metrics.random_top_k_scores(*args), data)
  rows[ORACLE_ROW] = _row(metrics.oracle_top_k_scores(*args), data, -data.latency)
  present = np.zeros(num_tasks, bool)
  present[data.task_index] = True
  return {
    "hardware": data.hardware,
    "split": data.split,
    "ks": list(ks),
    "model": {"name": model_name, **dict(model_info or {})},
    "num_programs": int(data.task_index.size),
    "num_split_programs": data.num_split_programs,
    "num_tasks_with_programs": int(present.sum()),
    # At k >= this every ranking's top-k is 1.0 (the plot leaves such k out).
    "max_task_programs": int(np.bincount(data.task_index, minlength=1).max()),
    "networks": [
      {"name": n.name, "tasks": int(n.task_indices.size), "occurrences": float(n.weights.sum())}
      for n in data.networks
    ],
    "rows": rows,
    "costliest_tasks": costliest_tasks(pred, data),
    "scatter": _scatter(pred, data.score),
  }
