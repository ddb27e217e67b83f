r"""Baseline: Ansor's XGBoost cost model on its hand-crafted features, scored like TLP (needs TVM).

Exactly how ANCHORS.md's "Ansor XGBModel" row was made: TVM's own
``auto_scheduler.cost_model.XGBModel`` (defaults: seed 43, pack-sum squared error on normalised
throughput, early stopping on the training set) is ``update()``-d once with every record of the
training tasks (the tasks outside the hold-out networks; records with an error code are left
out, as in ANCHORS.md -- ``train_on_failed`` keeps them, as Ansor's tuner would), then
``predict()``-s every program of each hold-out task from its rebuilt state (per-store
features, ``get_per_store_features_from_states``). The predictions are scored with
:mod:`tlp_jax.core.metrics` top-k on the hold-out networks over the valid (error-free) programs,
i.e. the same records, split and metric as ``eval.py``.

The hold-out split is :mod:`tlp_jax.core.network_info`'s (default hold-out for the directory,
every workload key of a hold-out network is test-only), so it is identical to the dataset's.

Tasks: records hold only workload keys; Ansor needs each workload's compute DAG registered to
replay a record's steps. TenSet ships them only as ``network_info/all_tasks.pkl``, registered by
:func:`tlp_jax.tvm.search_tasks.register_tenset_tasks` (restricted unpickler). Records are read
by :func:`tlp_jax.core.records.iter_records` (the dataset's checks and labels), then loaded into
TVM with ``load_record_from_string``; skipped lines are counted by reason with file and line.

Outputs: a JSON summary (top-k per hardware) and, per hardware, an ``.npz`` of per-program
predictions keyed by ``(workload_key, program_key)`` (``tlp_jax.core.features.program_key``, the key
the dataset uses to join programs) that :func:`align_predictions` maps onto a dataset split for
``evaluation.topk.topk_report(extra_predictions=...)``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from absl import app, flags
from tqdm import tqdm

from data_pipelines import loader
from tlp_jax.core import atomic_file, metrics, network_info, records, tenset
from tlp_jax.evaluation import data as eval_data
from tlp_jax.evaluation import run as eval_run
from tlp_jax.evaluation import topk
from tlp_jax.tvm import search_tasks, tvm_import

# Why a record the TLP reader keeps is skipped here: TVM cannot load it.
TVM_UNREADABLE = "tvm_unreadable"


@dataclasses.dataclass
class TaskRecords:
  """The measure records of one task file on one hardware."""

  workload_key: str
  path: str
  inputs: list  # MeasureInput per kept line
  results: list  # MeasureResult per kept line
  line_numbers: np.ndarray  # (n,) 1-based
  latency: np.ndarray  # (n,) mean cost in seconds; NaN for failed measurements
  program_keys: np.ndarray  # (n,) uint64
  stats: records.ReadStats  # how the file's lines were counted


def read_task_records(path: str) -> TaskRecords:
  """Every well-formed record of one file, loaded into TVM (the workloads must be registered).

  Lines are read, checked and labelled by :func:`records.iter_records` (latency = the TLP cost
  label, NaN for failed measurements) and counted in ``stats``, records TVM cannot load as
  malformed (:data:`TVM_UNREADABLE`).
  """
  tvm_import.require_tvm()
  from tvm.auto_scheduler import measure_record

  inputs, results, lines, costs, valid, keys = [], [], [], [], [], []
  wk = None
  stats = records.ReadStats()
  for rec in records.iter_records(path, stats):
    try:
      inp, res = measure_record.load_record_from_string(rec.line.decode())
    except Exception:  # TVM raises its own error types; any of them means "cannot load"
      # Not a training pair: counted as malformed instead of kept / failed.
      if rec.failure is None:
        stats.kept -= 1
      else:
        stats.failed[rec.failure] -= 1
      records.count_malformed(stats, path, rec.line_number, TVM_UNREADABLE)
      continue
    wk = rec.workload_key
    inputs.append(inp)
    results.append(res)
    lines.append(rec.line_number)
    keys.append(rec.program_key)
    if rec.failure is None:
      valid.append(len(costs))
      costs.append(rec.costs)
    else:
      costs.append(None)
  latency = np.full(len(costs), np.nan, dtype=np.float64)
  latency[valid] = records.mean_costs([costs[i] for i in valid])
  return TaskRecords(
    workload_key=wk or "",
    path=path,
    inputs=inputs,
    results=results,
    line_numbers=np.asarray(lines, dtype=np.int64),
    latency=latency,
    program_keys=np.asarray(keys, dtype=np.uint64),
    stats=stats,
  )


def read_hardware(
  tenset_dir: str, hardware: str, progress: bool = True
) -> tuple[list[TaskRecords], records.ReadStats]:
  """Every task file of ``measure_records/<hardware>/``, sorted by file name."""
  paths = tenset.task_files(tenset_dir, hardware)
  if not paths:
    raise FileNotFoundError(f"{tenset.measure_records_dir(tenset_dir, hardware)}: no record files")
  tasks = [read_task_records(p) for p in tqdm(paths, desc=f"read {hardware}", disable=not progress)]
  return [t for t in tasks if t.inputs], sum((t.stats for t in tasks), records.ReadStats())


@dataclasses.dataclass(frozen=True)
class XGBBaselineConfig:
  """Options. Defaults reproduce ANCHORS.md's XGBModel row.

  Attributes:
    seed: XGBModel seed (TVM's default is 43).
    train_on_failed: also train on records whose measurement failed (Ansor's XGBModel.update
      would, with normalised throughput 0). Off by default: ANCHORS.md excludes records with
      an error code, and only this setting reproduces its numbers (docs/TVM.md).
    holdout: hold-out specs; None = ``network_info.default_holdout`` of the directory.
    num_warmup_sample: XGBModel predicts at random until it has seen more training records
      than this (TVM's default 100); tests on tiny data lower it.
    ks: top-k values reported.
  """

  seed: int = 43
  train_on_failed: bool = False
  num_warmup_sample: int = 100
  holdout: tuple[str, ...] | None = None
  ks: tuple[int, ...] = metrics.DEFAULT_KS


@dataclasses.dataclass
class HardwarePredictions:
  """XGB predictions for every valid program of the hold-out tasks of one hardware."""

  hardware: str
  task_keys: tuple[str, ...]  # hold-out tasks with at least one valid program
  task_index: np.ndarray  # (N,)
  program_keys: np.ndarray  # (N,) uint64
  line_numbers: np.ndarray  # (N,)
  latency: np.ndarray  # (N,) seconds
  pred: np.ndarray  # (N,) XGBModel scores (higher = faster)
  networks: tuple[metrics.NetworkTasks, ...]
  info: dict

  def save_npz(self, path: str) -> None:
    """Per-program predictions, loadable with ``np.load(allow_pickle=False)``; written
    atomically (a crash leaves the previous file, never a truncated one)."""
    arrays = dict(
      hardware=np.asarray(self.hardware),
      task_keys=np.asarray(self.task_keys),
      task_index=self.task_index,
      workload_keys=np.asarray([self.task_keys[i] for i in self.task_index]),
      program_keys=self.program_keys,
      line_numbers=self.line_numbers,
      latency=self.latency,
      pred=self.pred,
    )
    atomic_file.write_atomically(path, lambda f: np.savez(f, **arrays), binary=True)


def _holdout_networks(tenset_dir: str, holdout: Sequence[str] | None):
  nets = network_info.load_network_infos(tenset_dir)
  specs = holdout or network_info.default_holdout(nets)
  return network_info.select_holdout(nets, specs)


@dataclasses.dataclass
class PreparedHardware:
  """Records of one hardware split into XGB training pairs and hold-out test tasks."""

  hardware: str
  train_inputs: list
  train_results: list
  test_tasks: list  # TaskRecords of hold-out tasks with >= 1 valid program
  test_states: list  # per test task: (SearchTask, rebuilt states of valid programs)
  networks: tuple[metrics.NetworkTasks, ...]
  info: dict


def prepare_hardware(
  tenset_dir: str,
  hardware: str,
  config: XGBBaselineConfig = XGBBaselineConfig(),
  progress: bool = True,
) -> PreparedHardware:
  """Reads ``hardware``'s records, splits them by the hold-out, rebuilds the test states."""
  tvm_import.require_tvm()
  from tvm.auto_scheduler.measure import recover_measure_input

  holdout_nets = _holdout_networks(tenset_dir, config.holdout)
  test_keys = network_info.holdout_workload_keys(holdout_nets)
  tasks, stats = read_hardware(tenset_dir, hardware, progress)
  train_inputs, train_results, test_tasks, test_states = [], [], [], []
  for t in tasks:
    if t.workload_key in test_keys:
      valid = np.flatnonzero(np.isfinite(t.latency))
      if valid.size:
        rec = [recover_measure_input(t.inputs[i], rebuild_state=True) for i in valid]
        test_tasks.append(t)
        test_states.append((rec[0].task, [r.state for r in rec]))
      continue
    for inp, res, lat in zip(t.inputs, t.results, t.latency):
      if config.train_on_failed or np.isfinite(lat):
        train_inputs.append(inp)
        train_results.append(res)
  index = {t.workload_key: i for i, t in enumerate(test_tasks)}
  networks = []
  for net in holdout_nets:
    present = [
      (index[task.workload_key], task.weight) for task in net.tasks if task.workload_key in index
    ]
    networks.append(
      metrics.NetworkTasks(
        net.label,
        np.asarray([p[0] for p in present], dtype=np.int64),
        np.asarray([p[1] for p in present], dtype=np.float64),
      )
    )
  info = {
    "hardware": hardware,
    "holdout": [n.label for n in holdout_nets],
    "train_records": len(train_inputs),
    "train_tasks": sum(t.workload_key not in test_keys for t in tasks),
    "test_tasks_with_valid_programs": len(test_tasks),
    "test_programs": int(sum(len(s) for _, s in test_states)),
    "read": stats.to_dict(),
    "xgb_seed": config.seed,
    "train_on_failed": config.train_on_failed,
  }
  return PreparedHardware(
    hardware, train_inputs, train_results, test_tasks, test_states, tuple(networks), info
  )


def fit_predict(
  prep: PreparedHardware, seed: int = 43, progress: bool = True, num_warmup_sample: int = 100
) -> HardwarePredictions:
  """Trains a fresh ``XGBModel`` on the training pairs and predicts every test program."""
  tvm_import.require_tvm()
  from tvm.auto_scheduler.cost_model import XGBModel

  t0 = time.time()
  model = XGBModel(
    seed=seed, verbose_eval=25 if progress else 0, num_warmup_sample=num_warmup_sample
  )
  model.update(prep.train_inputs, prep.train_results)
  train_s = time.time() - t0
  t0 = time.time()
  pred = [
    np.asarray(model.predict(task, states), dtype=np.float64) for task, states in prep.test_states
  ]
  predict_s = time.time() - t0
  valid = [np.flatnonzero(np.isfinite(t.latency)) for t in prep.test_tasks]

  def cat(parts, dtype):
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)

  info = dict(
    prep.info, xgb_seed=seed, train_seconds=round(train_s, 1), predict_seconds=round(predict_s, 1)
  )
  return HardwarePredictions(
    hardware=prep.hardware,
    task_keys=tuple(t.workload_key for t in prep.test_tasks),
    task_index=cat([np.full(v.size, i) for i, v in enumerate(valid)], np.int64),
    program_keys=cat([t.program_keys[v] for t, v in zip(prep.test_tasks, valid)], np.uint64),
    line_numbers=cat([t.line_numbers[v] for t, v in zip(prep.test_tasks, valid)], np.int64),
    latency=cat([t.latency[v] for t, v in zip(prep.test_tasks, valid)], np.float64),
    pred=cat(pred, np.float64),
    networks=prep.networks,
    info=info,
  )


def run_hardware(
  tenset_dir: str,
  hardware: str,
  config: XGBBaselineConfig = XGBBaselineConfig(),
  progress: bool = True,
) -> HardwarePredictions:
  """Trains XGBModel on the training tasks of ``hardware`` and predicts the hold-out tasks."""
  return fit_predict(
    prepare_hardware(tenset_dir, hardware, config, progress),
    config.seed,
    progress,
    config.num_warmup_sample,
  )


def score(p: HardwarePredictions, ks: Sequence[int] = metrics.DEFAULT_KS) -> dict:
  """Top-k of the XGB ranking, plus the random expectation on the same programs."""
  num_tasks = len(p.task_keys)
  xgb = metrics.top_k_scores(p.pred, p.latency, p.task_index, p.networks, ks, num_tasks)
  rnd = metrics.random_top_k_scores(p.latency, p.task_index, p.networks, ks, num_tasks)
  return {"xgb": xgb.to_dict(), "random": rnd.to_dict()}


def align_predictions(
  pred_npz: Mapping[str, np.ndarray], workload_keys: Sequence[str], program_keys: np.ndarray
) -> np.ndarray:
  """Maps saved per-program predictions onto another program list (e.g. a dataset split).

  Args:
    pred_npz: arrays saved by :meth:`HardwarePredictions.save_npz`.
    workload_keys: ``(N,)`` workload key of each target program.
    program_keys: ``(N,)`` ``features.program_key`` of each target program.

  Returns:
    ``(N,)`` float64 predictions, NaN where a program has no XGB prediction (NaN ranks last in
    ``tlp_jax.core.metrics``).
  """
  lookup = {
    (str(w), int(k)): float(v)
    for w, k, v in zip(pred_npz["workload_keys"], pred_npz["program_keys"], pred_npz["pred"])
  }
  return np.asarray(
    [
      lookup.get((str(w), int(k)), np.nan)
      for w, k in zip(workload_keys, np.asarray(program_keys, dtype=np.uint64))
    ],
    dtype=np.float64,
  )


def _summarise(runs: Sequence[dict], ks: Sequence[int]) -> dict:
  """Mean / std / min / max over repetitions of each pooled and mean top-k."""
  out = {}
  for agg in ("pooled", "mean"):
    for k in ks:
      vals = np.asarray([r[agg][f"top-{k}"] for r in runs], dtype=np.float64)
      out[f"{agg} top-{k}"] = {
        "mean": float(vals.mean()),
        "std": float(vals.std()),
        "min": float(vals.min()),
        "max": float(vals.max()),
      }
  return out


def run(
  tenset_dir: str,
  hardware: Iterable[str] | None = None,
  config: XGBBaselineConfig = XGBBaselineConfig(),
  out_dir: str | None = None,
  repeats: int = 1,
  progress: bool = True,
) -> dict:
  """Runs the baseline for each hardware ``repeats`` times (TVM's feature extraction is not
  deterministic, see docs/TVM.md); writes the first run's per-program predictions to
  ``out_dir``."""
  search_tasks.register_tenset_tasks(tenset_dir)
  report = {}
  for hw in hardware or tenset.hardware_folders(tenset_dir):
    prep = prepare_hardware(tenset_dir, hw, config, progress)
    runs, first = [], None
    for _ in range(repeats):
      p = fit_predict(prep, config.seed, progress, config.num_warmup_sample)
      first = first or p
      runs.append(
        {
          "info": {k: p.info[k] for k in ("train_seconds", "predict_seconds")},
          **score(p, config.ks),
        }
      )
    entry = {
      "info": first.info,
      "runs": runs,
      "xgb_over_runs": _summarise([r["xgb"] for r in runs], config.ks),
      "random": runs[0]["random"],
    }
    if out_dir:
      path = os.path.join(out_dir, f"xgb_predictions_{hw}.npz")
      first.save_npz(path)
      entry["predictions_npz"] = path
    report[hw] = entry
    k = config.ks[0]
    logging.info(
      "%s: XGB pooled top-%d %.3f (mean of %d runs)",
      hw,
      k,
      entry["xgb_over_runs"][f"pooled top-{k}"]["mean"],
      repeats,
    )
  return report


def align_to_split(
  pred_npz: Mapping[str, np.ndarray], arrays, hw: str, split: str = "test"
) -> np.ndarray:
  """Per-program XGB predictions aligned with a ``DatasetArrays`` split, for ``eval_lib``.

  The dataset arrays carry no program keys, so programs are matched within each task by their
  true score ``min_cost / cost`` (the label both sides compute from the same records), nearest
  first. Programs with equal scores have equal latencies, so whichever of them receives which
  prediction, every top-k value is unchanged.

  Returns:
    ``(num_split_programs,)`` float64; NaN where the split has no valid program on ``hw`` or no
    prediction matched.

  Raises:
    ValueError: a task's programs cannot all be matched (different records on the two sides).
  """
  h = eval_data.hardware_index(arrays.hardware, hw)
  s = getattr(arrays, split)
  out = np.full(s.task_index.shape[0], np.nan, dtype=np.float64)
  keys = np.asarray(pred_npz["workload_keys"])
  lat = np.asarray(pred_npz["latency"], dtype=np.float64)
  pred = np.asarray(pred_npz["pred"], dtype=np.float64)
  by_task: dict[str, np.ndarray] = {}
  for k in np.unique(keys):
    idx = np.flatnonzero(keys == k)
    by_task[str(k)] = idx
  valid = np.asarray(s.mask[:, h], dtype=bool)
  task_keys = arrays.tasks.workload_keys
  for t in np.unique(s.task_index[valid]):
    rows = np.flatnonzero(valid & (s.task_index == t))
    key = task_keys[int(t)]
    cand = by_task.get(key)
    if cand is None:
      raise ValueError(f"no XGB predictions for task {key}")
    if cand.size != rows.size:
      raise ValueError(f"task {key}: {rows.size} programs in the dataset, {cand.size} predicted")
    theirs = np.asarray(s.scores[rows, h], dtype=np.float64)
    ours = lat[cand].min() / lat[cand]
    # Sorting both sides by score pairs equal-score programs among themselves.
    a, b = rows[np.argsort(theirs, kind="stable")], cand[np.argsort(ours, kind="stable")]
    diff = np.abs(np.sort(theirs) - np.sort(ours))
    if diff.max(initial=0.0) > 1e-5:
      raise ValueError(f"task {key}: scores differ by up to {diff.max():.2e}; not the same records")
    out[a] = pred[b]
  return out


def _define_flags():
  flags.DEFINE_string(
    "tenset_dir", None, "TenSet-layout root (needs network_info/all_tasks.pkl).", required=True
  )
  flags.DEFINE_list("hardware", None, "Hardware folders (default: all).")
  flags.DEFINE_integer(
    "repeats",
    3,
    "XGB runs per hardware (TVM's features are not deterministic, so results vary run to run).",
  )
  flags.DEFINE_boolean("train_on_failed", False, "Also train on failed measurements.")
  flags.DEFINE_string("predictions_dir", None, "Where xgb_predictions_<hw>.npz go.")
  flags.DEFINE_string("data_dir", None, "Built dataset (data_pipelines.build) for TLP rows.")
  flags.DEFINE_list(
    "tlp",
    [],
    "HW=MODEL pairs: an exported .npz or a training workdir per "
    "hardware, evaluated with eval_lib next to the XGB row.",
  )
  flags.DEFINE_string("out", "bench/results/xgb_baseline.json", "Summary JSON.")


def write_summary(path: str, summary: Mapping[str, Any]) -> None:
  """Writes the summary JSON atomically: a crash or an error while writing leaves the previous
  summary, never a truncated file."""
  text = json.dumps(summary, indent=1)  # serialised first: a failure touches no file
  atomic_file.write_atomically(path, lambda fh: fh.write(text))


def _pooled(rows: Mapping, name: str) -> dict:
  r = rows[name]
  return {
    "pooled": {k: r["pooled"][k] for k in ("top-1", "top-5")},
    "mean": {k: r["mean"][k] for k in ("top-1", "top-5")},
  }


def main(argv) -> None:
  """CLI: XGB baseline per hardware, optionally next to TLP models via tlp_jax.evaluation."""
  del argv
  f = flags.FLAGS
  cfg = XGBBaselineConfig(train_on_failed=f.train_on_failed)
  pred_dir = f.predictions_dir or os.path.dirname(os.path.abspath(f.out))
  report = run(f.tenset_dir, f.hardware, cfg, out_dir=pred_dir, repeats=f.repeats)
  tlp_models = dict(item.split("=", 1) for item in f.tlp)
  summary = {
    "tenset_dir": os.path.abspath(f.tenset_dir),
    "config": dataclasses.asdict(cfg),
    "repeats": f.repeats,
    "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    "hardware": {},
  }
  for hw, entry in report.items():
    out = {
      "xgb_first_run": {k: entry["runs"][0]["xgb"][k] for k in ("pooled", "mean")},
      "xgb_over_runs": entry["xgb_over_runs"],
      "xgb_runs_pooled": [
        [r["xgb"]["pooled"]["top-1"], r["xgb"]["pooled"]["top-5"]] for r in entry["runs"]
      ],
      "info": entry["info"],
      "predictions_npz": entry.get("predictions_npz"),
    }
    model = tlp_models.get(hw)
    if model and f.data_dir:
      arrays = loader.load_arrays(f.data_dir, eval_run.resolve_config(f.data_dir, hw))
      with np.load(entry["predictions_npz"], allow_pickle=False) as z:
        aligned = align_to_split(dict(z), arrays, hw)
      is_npz = model.endswith(".npz")
      xgb_row = "Ansor XGBModel (TVM 0.19, run 1)"
      ev = eval_run.evaluate_model(
        hw=hw,
        data_dir=f.data_dir,
        model_path=model if is_npz else None,
        workdir=None if is_npz else model,
        extra_predictions={xgb_row: aligned},
      )
      rows = ev["rows"]
      tlp_row = next(n for n in rows if n not in (xgb_row, topk.RANDOM_ROW, topk.ORACLE_ROW))
      out["tlp"] = {"model": model, "row": tlp_row, **_pooled(rows, tlp_row)}
      out["xgb_via_eval"] = _pooled(rows, xgb_row)
      out["random_expectation"] = _pooled(rows, topk.RANDOM_ROW)
      out["eval_per_network"] = {n: rows[n]["per_network"] for n in rows}
    else:
      out["tlp"] = None
      out["tlp_note"] = "no trained TLP model given for this hardware"
    summary["hardware"][hw] = out
  write_summary(f.out, summary)
  for hw, out in summary["hardware"].items():
    o = out["xgb_over_runs"]
    line = (
      f"{hw}: XGB pooled top-1 {o['pooled top-1']['mean']:.3f}"
      f"+-{o['pooled top-1']['std']:.3f}"
      f" top-5 {o['pooled top-5']['mean']:.3f}+-{o['pooled top-5']['std']:.3f}"
    )
    if out["tlp"]:
      line += (
        f" | TLP pooled top-1 {out['tlp']['pooled']['top-1']:.3f} "
        f"top-5 {out['tlp']['pooled']['top-5']:.3f}"
      )
    print(line)
  print(f"wrote {f.out}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
