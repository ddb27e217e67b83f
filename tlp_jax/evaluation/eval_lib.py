"""Library of ``eval.py``: top-k of a cost model on the held-out networks of one hardware.

One prediction path: every model is evaluated through the pure-NumPy predictor
(:class:`tlp_jax.core.predictor.Predictor`), loaded from an exported ``.npz`` or exported in
memory from a training workdir (:func:`load_predictor`). Predictions are made in batches over
every valid program of the split, then scored with :mod:`tlp_jax.core.metrics`. The report puts the
model next to the exact random-ranking expectation, the oracle and any extra named baselines
(per-program prediction arrays, e.g. an XGBoost model on Ansor features) so all rows share the
same programs, tasks, networks and split.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import tqdm

from tlp_jax.core import metrics

RANDOM_ROW = "random (exact expectation)"
ORACLE_ROW = "oracle"
# Points of the predicted-vs-measured scatter kept in the report (a deterministic subsample).
SCATTER_POINTS = 5000


class EvalError(ValueError):
  """A user-facing evaluation error (unknown hardware, missing model head, ...)."""


@dataclasses.dataclass(frozen=True)
class EvalSplit:
  """The programs of one split for one hardware, with what top-k needs.

  Attributes:
    hardware: the hardware evaluated.
    split: split name.
    split_features: ``(M, L, E)`` float32 features of *all* programs of the split (possibly a
      memory map); ``split_features[rows]`` are the valid ones (see :attr:`features`).
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

  @property
  def features(self) -> np.ndarray:
    """``(N, L, E)`` features of the valid programs (a copy: :func:`evaluate` gathers them
    batch by batch instead)."""
    return np.asarray(self.split_features[self.rows])


def hardware_index(hardware: Sequence[str], hw: str, what: str = "the dataset") -> int:
  """Index of ``hw`` in ``hardware``; an :class:`EvalError` listing the known names otherwise."""
  names = [str(h) for h in hardware]
  if hw not in names:
    raise EvalError(f"hardware {hw!r} is not in {what}; available: {', '.join(names) or 'none'}")
  return names.index(hw)


def _network_tasks(arrays) -> tuple[metrics.NetworkTasks, ...]:
  nets = []
  for net in arrays.networks:
    nets.append(metrics.NetworkTasks(
        net.label, np.asarray(net.task_indices), np.asarray(net.weights),
        num_missing=len(getattr(net, "missing_workload_keys", ()))))
  return tuple(nets)


def select_split(arrays, hw: str, split: str = "test") -> EvalSplit:
  """The valid programs of ``split`` on hardware ``hw`` from a ``DatasetArrays``.

  Raises:
    EvalError: ``hw`` is not a hardware of the dataset, or ``split`` does not exist.
  """
  h = hardware_index(arrays.hardware, hw,
                     what=f"dataset config {getattr(arrays, 'config_name', '?')!r}")
  if split not in ("train", "validation", "test"):
    raise EvalError(f"unknown split {split!r}; choose train, validation or test")
  s = getattr(arrays, split)
  valid = np.asarray(s.mask[:, h], dtype=bool)
  rows = np.flatnonzero(valid)
  task_index = np.asarray(s.task_index)[rows].astype(np.int64)
  score = np.asarray(s.scores[rows, h], dtype=np.float64)
  min_cost = np.asarray(arrays.tasks.min_cost, dtype=np.float64)[:, h]
  latency = metrics.latency_from_score(score, min_cost[task_index])
  logging.info("%s split on %s: %d of %d programs have a valid measurement", split, hw,
               rows.size, valid.size)
  return EvalSplit(hardware=hw, split=split, split_features=s.features, score=score,
                   latency=latency, task_index=task_index, rows=rows,
                   task_keys=tuple(arrays.tasks.workload_keys),
                   networks=_network_tasks(arrays), num_split_programs=int(valid.size))


def predict_in_batches(predict: Callable[[np.ndarray], np.ndarray], features: np.ndarray,
                       rows: np.ndarray | None = None, batch_size: int = 4096,
                       desc: str = "predict") -> np.ndarray:
  """``predict(features[rows])`` in batches, as float64.

  Only one batch of features is gathered at a time, so a memory-mapped split of TenSet size is
  never copied whole into memory.

  Args:
    predict: ``(B, L, E) -> (B,)``.
    features: ``(M, L, E)`` features.
    rows: indices into ``features`` to predict (default: all, in order).
    batch_size: programs per call of ``predict``.
    desc: progress-bar label.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if rows is None:
    rows = np.arange(features.shape[0])
  n = rows.shape[0]
  out = np.empty(n, dtype=np.float64)
  for start in tqdm.trange(0, n, batch_size, desc=desc, unit="batch", disable=n <= batch_size):
    stop = min(start + batch_size, n)
    pred = np.asarray(predict(np.asarray(features[rows[start:stop]])),
                      dtype=np.float64).reshape(-1)
    if pred.shape[0] != stop - start:
      raise ValueError(f"predictor returned {pred.shape[0]} values for {stop - start} programs")
    out[start:stop] = pred
  return out


def _rows_of(name: str, r: metrics.TopKScores, data: EvalSplit, pred=None) -> dict:
  d = r.to_dict()
  if pred is not None:
    q = metrics.quick_top_ks(pred, data.score, data.task_index, r.ks)
    d["task_mean"] = {f"top-{k}": metrics.json_float(q[k]) for k in r.ks}
  return d


def _scatter(pred: np.ndarray, score: np.ndarray, seed: int = 0) -> dict:
  n = pred.shape[0]
  idx = np.arange(n)
  if n > SCATTER_POINTS:
    idx = np.sort(np.random.default_rng(seed).choice(n, SCATTER_POINTS, replace=False))
  return {"pred": pred[idx].tolist(), "score": score[idx].tolist(), "total": int(n)}


def costliest_tasks(pred: np.ndarray, data: EvalSplit, limit: int = 10) -> list[dict]:
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
    out.append({
        "task": int(t), "workload_key": str(data.task_keys[t]), "networks": names[t],
        "weight": float(weight[t]),
        "num_programs": int(np.count_nonzero(data.task_index == t)),
        "best_latency_share": float(weight[t] * best[t] / best_sum),
        "pick_ratio": float(pick[t] / best[t]),
        "excess_share": float(excess[t] / total_excess),
        "pooled_top1_if_fixed": float(best_sum / (pick_sum - excess[t])),
    })
  return out


def evaluate(data: EvalSplit, predict: Callable[[np.ndarray], np.ndarray], *,
             model_name: str = "model", ks: Sequence[int] = metrics.DEFAULT_KS,
             extra_predictions: Mapping[str, np.ndarray] | None = None,
             batch_size: int = 4096, model_info: Mapping[str, Any] | None = None) -> dict:
  """Top-k report of a model on one split/hardware, with random, oracle and extra rows.

  Args:
    data: the split (see :func:`select_split`).
    predict: ``features (B, L, E) -> (B,)`` predicted scores (higher = faster) for
      ``data.hardware``; see :func:`predictor_fn`.
    model_name: the model's row name.
    ks: the k values.
    extra_predictions: ``{row name: (num_split_programs,) predictions}`` aligned with the rows of
      the split's arrays (all programs of the split, valid on the hardware or not: only the
      valid ones are used), e.g. a baseline cost model.
    batch_size: prediction batch size.
    model_info: JSON-able description of the model (path, heads, ...) stored in the report.

  Returns:
    A JSON-able report dict: ``hardware``, ``split``, ``ks``, counts, ``networks`` (name,
    tasks, weights), ``rows`` (row name -> per-network / ``mean`` (TenSet) / ``pooled`` (TLP)
    top-k, plus ``task_mean``, the unweighted mean over all tasks of the split, for ranked
    rows), ``costliest_tasks`` (:func:`costliest_tasks` of the model) and ``scatter`` (a
    subsample of model predictions vs measured scores).
  """
  ks = tuple(int(k) for k in ks)
  num_tasks = len(data.task_keys)
  args = (data.latency, data.task_index, data.networks, ks, num_tasks)
  pred = predict_in_batches(predict, data.split_features, data.rows, batch_size,
                            desc=f"predict {model_name}")
  if not np.all(np.isfinite(pred)):
    logging.warning("%d non-finite predictions (ranked last)", int((~np.isfinite(pred)).sum()))
  rows = {model_name: _rows_of(model_name, metrics.top_k_scores(pred, *args), data, pred)}
  for name, extra in (extra_predictions or {}).items():
    extra = np.asarray(extra, dtype=np.float64).reshape(-1)
    if extra.shape[0] != data.num_split_programs:
      raise EvalError(f"extra predictions {name!r} have {extra.shape[0]} entries; the "
                      f"{data.split} split has {data.num_split_programs} programs")
    if name in rows or name in (RANDOM_ROW, ORACLE_ROW):
      raise EvalError(f"extra predictions name {name!r} clashes with another row")
    p = extra[data.rows]
    rows[name] = _rows_of(name, metrics.top_k_scores(p, *args), data, p)
  rows[RANDOM_ROW] = _rows_of(RANDOM_ROW, metrics.random_top_k_scores(*args), data)
  oracle_pred = -data.latency
  rows[ORACLE_ROW] = _rows_of(ORACLE_ROW, metrics.oracle_top_k_scores(*args), data, oracle_pred)
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
      "networks": [{"name": n.name, "tasks": int(n.task_indices.size),
                    "occurrences": float(n.weights.sum())} for n in data.networks],
      "rows": rows,
      "costliest_tasks": costliest_tasks(pred, data),
      "scatter": _scatter(pred, data.score),
  }


# ---- models --------------------------------------------------------------------------------


def load_predictor(model_path: str | None = None, workdir: str | None = None,
                   which: str = "best"):
  """The NumPy predictor of an exported ``.npz`` or of a training workdir, and a description.

  A workdir is restored with ``export.restore_for_export`` and exported in memory with
  ``export.export_params``, so it is evaluated through exactly the code that serves it.

  Args:
    model_path: exported ``.npz`` (exclusive with ``workdir``).
    workdir: training workdir.
    which: checkpoint of the workdir, "best" or "latest".

  Returns:
    ``(predictor, info)``: a ``npred.Predictor`` and a JSON-able dict.
  """
  from tlp_jax.core import predictor as npred  # pylint: disable=g-import-not-at-top
  if (model_path is None) == (workdir is None):
    raise EvalError("give exactly one of a model file and a workdir")
  if model_path is not None:
    if not os.path.exists(model_path):
      raise EvalError(f"{model_path}: no such model file")
    try:
      predictor = npred.Predictor.load(model_path)
    except npred.PredictorError as e:
      raise EvalError(str(e)) from None
    info = {"model_file": os.path.abspath(model_path)}
  else:
    # JAX/Orbax only on this path: an exported model is evaluated with NumPy alone.
    from tlp_jax.train import export  # pylint: disable=g-import-not-at-top
    from tlp_jax.train import checkpoints  # pylint: disable=g-import-not-at-top
    try:
      params, model_config, meta = export.restore_for_export(workdir, which)
    except (FileNotFoundError, checkpoints.CheckpointError) as e:
      raise EvalError(str(e)) from None
    arrays = export.export_params(params, model_config, **export.meta_kwargs(meta))
    predictor = npred.Predictor.from_arrays(arrays)
    info = {"workdir": os.path.abspath(workdir), "checkpoint": which}
  info.update({"heads": list(predictor.hardware), "step": int(predictor.step),
               "vocab_version": predictor.vocab_version})
  return predictor, info


def predictor_fn(predictor, hw: str, arrays=None) -> Callable[[np.ndarray], np.ndarray]:
  """``features -> scores`` of the predictor's head ``hw``.

  Raises:
    EvalError: the model has no head ``hw``, or (given the dataset ``arrays``) was trained on
      features of another platform or crop.
  """
  head = hardware_index(predictor.hardware, hw, what=f"the model's heads ({predictor.source})")
  if arrays is not None:
    if predictor.platform != arrays.platform:
      raise EvalError(f"the model was trained on {predictor.platform} features, the dataset "
                      f"has {arrays.platform} features")
    if tuple(predictor.crop) != tuple(arrays.crop):
      raise EvalError(f"the model expects features cropped to {tuple(predictor.crop)}, the "
                      f"dataset has {tuple(arrays.crop)}")
    if predictor.vocab_json != arrays.vocab_json:
      # Same platform and crop but another vocabulary (e.g. a dataset built with more records):
      # token ids of entries both know agree, new ones are unseen by the model.
      logging.warning("the model's feature vocabulary (version %s) differs from the dataset's; "
                      "steps unknown to the model get ids it never saw", predictor.vocab_version)
  name = predictor.hardware[head]
  return lambda x: predictor.predict(x, hw=name)


# ---- data ----------------------------------------------------------------------------------


def built_hardware(data_dir: str) -> dict[str, tuple[str, ...]]:
  """``{config name: hardware}`` of every dataset config built under ``data_dir``."""
  from data_pipelines import loader  # pylint: disable=g-import-not-at-top
  root = os.path.join(data_dir, loader.BUILDER_NAME)
  out = {}
  for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
    try:
      ds_dir = loader.find_dataset_dir(data_dir, name)
      with open(os.path.join(ds_dir, "metadata.json"), "rb") as f:
        out[name] = tuple(json.load(f)["hardware"])
    except (loader.DatasetNotFoundError, OSError, KeyError, ValueError) as e:
      logging.warning("skipping dataset config %s: %s", name, e)
  return out


def resolve_config(data_dir: str, hw: str, dataset: str | None = None) -> str:
  """The dataset config to evaluate ``hw`` on: ``dataset`` if given, else the per-hardware
  config named ``hw``, else the first built config that has ``hw``.

  Raises:
    EvalError: nothing built in ``data_dir`` has ``hw`` (the message lists what is there).
  """
  if dataset is not None:
    return dataset
  configs = built_hardware(data_dir)
  if hw in configs and hw in configs[hw]:
    return hw
  for name, hardware in configs.items():
    if hw in hardware:
      return name
  have = sorted({h for hardware in configs.values() for h in hardware})
  raise EvalError(f"hardware {hw!r} is not in the datasets built in {data_dir}; available: "
                  f"{', '.join(have) or 'none (build one with python -m data_pipelines.build)'}")


def run(*, hw: str, data_dir: str, dataset: str | None = None, workdir: str | None = None,
        model_path: str | None = None, which: str = "best", split: str = "test",
        ks: Sequence[int] = metrics.DEFAULT_KS, batch_size: int = 4096,
        extra_predictions: Mapping[str, np.ndarray] | None = None) -> dict:
  """Everything ``eval.py`` does but writing: load data and model, evaluate, return the report.
  """
  from data_pipelines import loader  # pylint: disable=g-import-not-at-top
  config = resolve_config(data_dir, hw, dataset)
  try:
    arrays = loader.load_arrays(data_dir, config)
  except loader.DatasetNotFoundError as e:
    raise EvalError(str(e)) from None
  data = select_split(arrays, hw, split)
  predictor, info = load_predictor(model_path, workdir, which)
  predict = predictor_fn(predictor, hw, arrays)
  name = os.path.splitext(os.path.basename(model_path))[0] if model_path else "TLP (workdir)"
  info.update({"dataset": config, "dataset_fingerprint": arrays.fingerprint})
  return evaluate(data, predict, model_name=name, ks=ks, extra_predictions=extra_predictions,
                  batch_size=batch_size, model_info=info)


def default_out_dir(out: str | None, workdir: str | None, model_path: str | None) -> str:
  """``out``, else ``WORKDIR/eval``, else the model file's folder."""
  if out:
    return out
  if workdir:
    return os.path.join(workdir, "eval")
  return os.path.dirname(os.path.abspath(model_path))


# ---- report ----------------------------------------------------------------------------------


def _fmt(v) -> str:
  return "  n/a" if v is None else f"{v:.3f}"


def format_report(report: Mapping[str, Any]) -> str:
  """Markdown tables of a report: one row per (ranking, network / aggregate), one column per k."""
  ks = report["ks"]
  head = [f"top-{k}" for k in ks]
  out = io.StringIO()
  out.write(f"hardware {report['hardware']}, split {report['split']}: "
            f"{report['num_programs']} programs with a valid measurement "
            f"(of {report['num_split_programs']}), "
            f"{report['num_tasks_with_programs']} tasks\n\n")
  out.write("| ranking | network | " + " | ".join(head) + " | tasks used/skipped |\n")
  out.write("|---|---|" + "---|" * len(head) + "---|\n")
  for name, row in report["rows"].items():
    for net, vals in row["per_network"].items():
      cells = " | ".join(_fmt(vals[h]) for h in head)
      out.write(f"| {name} | {net} | {cells} | {vals['tasks_used']}/{vals['tasks_skipped']} |\n")
    for agg, label in (("mean", "mean (TenSet)"), ("pooled", "pooled (TLP)"),
                       ("task_mean", "all tasks, unweighted")):
      if agg in row:
        cells = " | ".join(_fmt(row[agg][h]) for h in head)
        out.write(f"| {name} | **{label}** | {cells} | |\n")
  costly = report.get("costliest_tasks")
  if costly:
    out.write(f"\nTasks costing {report['model']['name']} the most pooled top-1 (its pick vs the "
              "task's best):\n\n| task | networks | weight | share of best latency | pick / best "
              "| share of the loss | pooled top-1 if fixed |\n|---|---|---|---|---|---|---|\n")
    for t in costly:
      out.write(f"| {t['task']} {t['workload_key'][:60]} | {', '.join(t['networks'])} | "
                f"{t['weight']:g} | {t['best_latency_share']:.3f} | {t['pick_ratio']:.2f}x | "
                f"{t['excess_share']:.3f} | {t['pooled_top1_if_fixed']:.3f} |\n")
  return out.getvalue()


def plot_report(report: Mapping[str, Any], path: str) -> None:
  """PNG: per-network grouped bars for each k, and predicted vs measured score of the model."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  ks = report["ks"]
  rows = report["rows"]
  groups = list(next(iter(rows.values()))["per_network"]) + ["mean (TenSet)", "pooled (TLP)"]
  panels = len(ks) + 2  # one per k, the scatter, the legend
  ncols = min(3, panels)
  nrows = -(-panels // ncols)
  fig, axes = plt.subplots(nrows, ncols, figsize=(5.0 * ncols, 4.2 * nrows), squeeze=False)
  axes = axes.reshape(-1)
  width = 0.8 / len(rows)
  x = np.arange(len(groups))
  handles = []
  for ax, k in zip(axes, ks):
    key = f"top-{k}"
    handles = []
    for i, (name, row) in enumerate(rows.items()):
      vals = [row["per_network"][g][key] for g in groups[:-2]]
      vals += [row["mean"][key], row["pooled"][key]]
      vals = [np.nan if v is None else v for v in vals]
      handles.append(ax.bar(x + (i - (len(rows) - 1) / 2) * width, vals, width, label=name))
    ax.set_xticks(x, groups, rotation=30, ha="right", fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{key} ({report['hardware']}, {report['split']})", fontsize=9)
  for ax in axes[len(ks) + 1:]:
    ax.axis("off")
  axes[len(ks) + 1].legend(handles, list(rows), loc="center", fontsize=9)
  sc = report["scatter"]
  ax = axes[len(ks)]
  ax.scatter(sc["pred"], sc["score"], s=3, alpha=0.4)
  ax.set_xlabel("predicted score")
  ax.set_ylabel("measured score (min_cost / cost)")
  ax.set_title(f"{report['model']['name']}: {len(sc['pred'])} of {sc['total']} programs",
               fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_report(report: Mapping[str, Any], out_dir: str) -> dict[str, str]:
  """Writes ``report.json``, ``report.md`` and ``report.png`` under ``out_dir``; returns paths."""
  os.makedirs(out_dir, exist_ok=True)
  stem = f"eval_{report['hardware']}_{report['split']}"
  paths = {ext: os.path.join(out_dir, f"{stem}.{ext}") for ext in ("json", "md", "png")}
  with open(paths["json"], "w") as f:
    json.dump(report, f, indent=1, allow_nan=False)
  with open(paths["md"], "w") as f:
    f.write(format_report(report))
  plot_report(report, paths["png"])
  return paths
