r"""Tune a network with Ansor on this machine, with TLP (or XGB / random) as the cost model.

    python -m tlp_jax.tvm.tune --network resnet_18 --batch 1 --size 224 \
        --load_model pretrained:epyc-9004 [--update online] --n_trials 2000 --out runs/r18

What a run does, in the shape of TenSet's and TLP's tuning scripts:

1. builds the network (``tlp_jax.tvm.collect.NETWORKS``, NHWC where the builder has a layout)
   and extracts its auto-scheduler tasks for ``--target`` (default: this CPU);
2. makes the cost model *before* tuning, so a bad model file or name fails at once: ``tlp``
   (``TLPCostModel``, ``--update none|online``), ``xgb`` (Ansor's ``XGBModel``, retrained every
   round, random for its first ``tasks x measures_per_round`` trials as in TVM), ``random``;
3. tunes with Ansor's gradient task scheduler and one seeded ``SketchPolicy`` per task, writing
   Ansor's record log (``--log_file``, default ``OUT/records.json``), a progress bar per round,
   and after every round ``OUT/tune.json`` (estimated network latency = sum of weight x best
   latency, against trials and wall time; predict / update time per round; written atomically,
   so a crash leaves the rounds that finished);
4. compiles the network with the best schedules of the log (``ApplyHistoryBest``) and measures
   its real end-to-end latency with ``graph_executor``'s ``time_evaluator``;
5. writes ``OUT/tune.png`` (estimated latency against trials and wall time).

Rerunning the same command resumes: the records already in the log count against
``--n_trials``, seed the task scheduler and the search policies (Ansor's ``load_log_file`` /
``PreloadMeasuredStates``), and are fed to a cost model that learns (``xgb``, ``tlp --update
online``). User errors print one line and exit 2.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from tlp_jax.core import atomic_file, pretrained
from tlp_jax.core import predictor as npred
from tlp_jax.tvm import collect, tvm_import
from tlp_jax.tvm import cost_model as tlp_cost_model

COST_MODELS = ("tlp", "xgb", "random")
# The layout each builder of collect.NETWORKS makes (relay.testing's CNNs that take a layout are
# built NHWC, as TenSet's CPU data; the others only exist NCHW).
NETWORK_LAYOUTS = {name: "NHWC" for name in ("resnet_18", "resnet_50", "mobilenet")}
RESULT_JSON, RESULT_PNG, DEFAULT_LOG = "tune.json", "tune.png", "records.json"


class TuneError(ValueError):
  """A user error: bad flags, an unknown network or model, too few trials."""


@dataclasses.dataclass(frozen=True)
class TuneConfig:
  """One tuning run (the flags of ``python -m tlp_jax.tvm.tune``).

  Attributes:
    network: the network (``collect.NetworkSpec``: name, batch, input size).
    out_dir: where ``tune.json``, ``tune.png`` and (by default) the record log go.
    n_trials: measurement trials over all tuned tasks (including any already in the log).
    cost_model: a key of ``COST_MODELS``.
    load_model: ``tlp``'s model: an exported ``.npz`` or ``pretrained:NAME``.
    update: ``tlp``'s update mode (``cost_model.UPDATE_MODES``: "none" or "online").
    hardware: ``tlp``'s head (None: the model's first).
    target: TVM target (None: ``llvm -mcpu=<this CPU>``).
    layout: None or the network's layout (checked, see ``NETWORK_LAYOUTS``).
    log_file: Ansor's record log (None: ``out_dir/records.json``).
    num_measures_per_round: programs measured per round (Ansor's default 64).
    population: evolutionary search population (Ansor's default 2048).
    num_tasks: tune only the N tasks of largest weight x FLOPs (0: all).
    seed: seed of the policies, NumPy / random, the XGB model and the end-to-end input.
    runner_repeat, runner_min_repeat_ms: LocalRunner's repeat and minimum time per measurement.
    e2e_repeat: time_evaluator repeats of the compiled network (0: do not compile or measure).
    progress: show the progress bar.
  """

  network: collect.NetworkSpec
  out_dir: str
  n_trials: int
  cost_model: str = "tlp"
  load_model: str | None = None
  update: str = "none"
  hardware: str | None = None
  target: str | None = None
  layout: str | None = None
  log_file: str | None = None
  num_measures_per_round: int = 64
  population: int = 2048
  num_tasks: int = 0
  seed: int = 0
  runner_repeat: int = 3
  runner_min_repeat_ms: int = 100
  e2e_repeat: int = 10
  progress: bool = True

  @property
  def log_path(self) -> str:
    return self.log_file or os.path.join(self.out_dir, DEFAULT_LOG)


def check_config(cfg: TuneConfig) -> None:
  """Raises ``TuneError`` for flags that cannot work, before anything is built."""
  name = cfg.network.name
  if name not in collect.NETWORKS:
    raise TuneError(f"unknown network {name!r}; available: {', '.join(sorted(collect.NETWORKS))}")
  have = NETWORK_LAYOUTS.get(name, "NCHW")
  if cfg.layout is not None and cfg.layout.upper() != have:
    raise TuneError(f"network {name} is built {have} here; --layout {cfg.layout} is not available")
  if cfg.cost_model not in COST_MODELS:
    raise TuneError(f"unknown --cost_model {cfg.cost_model!r}; choose one of {list(COST_MODELS)}")
  if cfg.cost_model == "tlp" and not cfg.load_model:
    shipped = ", ".join(f"pretrained:{n}" for n in pretrained.available()) or "none installed"
    raise TuneError(f"--cost_model tlp needs --load_model (an exported .npz, or one of: {shipped})")
  if cfg.cost_model != "tlp" and (cfg.load_model or cfg.update != "none"):
    raise TuneError("--load_model and --update are options of --cost_model tlp")
  if cfg.update not in tlp_cost_model.UPDATE_MODES:
    raise TuneError(
      f"unknown --update {cfg.update!r}; choose one of {list(tlp_cost_model.UPDATE_MODES)}"
    )
  for field in ("n_trials", "num_measures_per_round", "population", "runner_repeat"):
    if getattr(cfg, field) < 1:
      raise TuneError(f"--{field} must be >= 1, got {getattr(cfg, field)}")
  if cfg.network.batch_size < 1 or cfg.network.input_size < 1 or cfg.num_tasks < 0:
    raise TuneError("--batch and --size must be >= 1 and --num_tasks >= 0")


def select_tasks(tasks: Sequence, weights: Sequence[int], num_tasks: int) -> list[int]:
  """Indices of the ``num_tasks`` tasks of largest weight x FLOPs (all when 0), in order."""
  order = sorted(
    range(len(tasks)), key=lambda i: -weights[i] * max(float(tasks[i].compute_dag.flop_ct), 0.0)
  )
  return sorted(order[:num_tasks] if num_tasks > 0 else order)


class _Untimed:
  """Ansor's ``RandomModel`` as it is, with empty call logs: Ansor's C++ recognises a random
  model by its node type (it then samples the whole population and cuts the evolutionary search
  short, TVM's random baseline), which a Python wrapper would hide."""

  def __init__(self, inner):
    self.inner, self.predict_calls, self.update_calls = inner, [], []


def _timed(inner) -> Any:
  """Ansor cost model ``inner`` with every ``predict`` / ``update`` timed (``.predict_calls``:
  (states, seconds), ``.update_calls``: (measurements, seconds))."""
  from tvm.auto_scheduler.cost_model.cost_model import PythonBasedModel

  class Timed(PythonBasedModel):
    def __init__(self):
      super().__init__()
      self.inner, self.predict_calls, self.update_calls = inner, [], []

    def predict(self, task, states):
      t0 = time.perf_counter()
      out = self.inner.predict(task, states)
      self.predict_calls.append((len(states), time.perf_counter() - t0))
      return out

    def update(self, inputs, results):
      t0 = time.perf_counter()
      self.inner.update(inputs, results)
      self.update_calls.append((len(inputs), time.perf_counter() - t0))

  return Timed()


def make_tlp_model(cfg: TuneConfig) -> Any:
  """``tlp``'s cost model, made before anything else: a bad model file or name, or a head the
  model lacks, raises a user error here, before minutes of task extraction."""
  try:
    return tlp_cost_model.TLPCostModel(
      pretrained.load_spec(cfg.load_model), hardware=cfg.hardware, update=cfg.update
    )
  except (npred.PredictorError, pretrained.PretrainedError, FileNotFoundError):
    raise
  except ValueError as e:  # e.g. no head for --hw
    raise TuneError(f"--load_model {cfg.load_model}: {e}") from None


def make_cost_model(cfg: TuneConfig, num_tasks: int, per_round: int, tlp_model: Any = None):
  """The run's cost model, with a ``predict_calls`` / ``update_calls`` log (timed, except
  Ansor's random model) and the model Ansor is given as ``.tvm_model``."""
  from tvm import auto_scheduler

  if cfg.cost_model == "tlp":
    model = tlp_model if tlp_model is not None else make_tlp_model(cfg)
  elif cfg.cost_model == "xgb":
    from tvm.auto_scheduler.cost_model import XGBModel

    # As TVM's make_search_policies: random predictions for the first tasks x per-round trials.
    model = XGBModel(num_warmup_sample=num_tasks * per_round, seed=cfg.seed + 43, verbose_eval=0)
  else:
    logged = _Untimed(auto_scheduler.RandomModel())
    logged.tvm_model = logged.inner
    return logged
  logged = _timed(model)
  logged.tvm_model = logged
  return logged


def _write_json(path: str, obj: Any) -> None:
  atomic_file.write_atomically(path, lambda f: json.dump(obj, f, indent=1))


def _count_records(log_file: str, keys: set[str]) -> tuple[list, list]:
  """Measure inputs / results of ``keys``' tasks already in ``log_file`` (for a resume)."""
  from tvm import auto_scheduler

  if not os.path.exists(log_file):
    return [], []
  inputs, results = [], []
  for inp, res in auto_scheduler.RecordReader(log_file):
    if inp.task.workload_key in keys:
      inputs.append(inp)
      results.append(res)
  return inputs, results


def tune_tasks(
  cfg: TuneConfig,
  tasks: Sequence,
  weights: Sequence[int],
  model,
  report: dict,
  save: Callable[[], None],
) -> None:
  """Runs Ansor's task scheduler; fills ``report["curve"]`` / ``["rounds"]`` and calls ``save``
  after every round."""
  from tqdm import tqdm
  from tvm import auto_scheduler

  log_file = cfg.log_path
  keys = {t.workload_key for t in tasks}
  old_inputs, old_results = _count_records(log_file, keys)
  done = len(old_inputs)
  remaining = cfg.n_trials - done
  report["resumed_from_trials"] = done
  curve, rounds = report["curve"], report["rounds"]
  offset_s = curve[-1]["elapsed_s"] if curve else 0.0
  if remaining < len(tasks):
    logging.info("the log holds %d trials of %d: nothing left to tune", done, cfg.n_trials)
    return
  if done:
    logging.info("resuming from %d trials in %s", done, log_file)
    model.inner.update(old_inputs, old_results)  # a learning model starts from them

  bar = tqdm(total=cfg.n_trials, initial=done, unit="trial", desc="tune", disable=not cfg.progress)

  class Record(auto_scheduler.task_scheduler.TaskSchedulerCallback):
    """After each round: trials, wall time, estimated latency, predict/update time."""

    def __init__(self):
      self.seen = (0, 0)

    def post_tune(self, task_scheduler, task_id):
      p, u = model.predict_calls[self.seen[0] :], model.update_calls[self.seen[1] :]
      self.seen = (len(model.predict_calls), len(model.update_calls))
      best = [float(c) for c in task_scheduler.best_costs]
      ok = all(c < 1e9 for c in best)
      est = float(task_scheduler.cur_score) * 1e3 if ok else None
      trials = done + int(task_scheduler.ct)
      curve.append(
        {
          "trials": trials,
          "elapsed_s": round(offset_s + time.time() - task_scheduler.tic, 2),
          "estimated_latency_ms": est,  # None until every task has a valid measurement
          "tasks_measured": int(sum(c < 1e9 for c in best)),
          # Weighted sum over the tasks measured so far: a task that no schedule can build
          # (e.g. TVM 0.19's layout rewrite of some dense tasks) would leave the total None.
          "estimated_latency_measured_ms": 1e3
          * sum(w * c for w, c in zip(weights, best) if c < 1e9),
          "best_ms_per_task": [round(c * 1e3, 6) if c < 1e9 else None for c in best],
        }
      )
      rounds.append(
        {
          "task": int(task_id),
          "predict_calls": len(p),
          "predict_states": int(sum(c[0] for c in p)),
          "predict_s": round(float(sum(c[1] for c in p)), 4),
          "update_s": round(float(sum(c[1] for c in u)), 4),
        }
      )
      bar.update(trials - bar.n)
      bar.set_postfix(est_ms="-" if est is None else f"{est:.3f}", task=int(task_id))
      save()

  policies = [
    auto_scheduler.SketchPolicy(
      t,
      program_cost_model=model.tvm_model,
      params={"evolutionary_search_population": cfg.population},
      seed=cfg.seed + 1 + i,
      verbose=0,
      init_search_callbacks=[auto_scheduler.PreloadMeasuredStates(log_file)] if done else None,
    )
    for i, t in enumerate(tasks)
  ]
  scheduler = auto_scheduler.TaskScheduler(
    list(tasks), list(weights), load_log_file=log_file if done else None, callbacks=[Record()]
  )
  options = auto_scheduler.TuningOptions(
    num_measure_trials=remaining,
    num_measures_per_round=cfg.num_measures_per_round,
    verbose=0,
    runner=auto_scheduler.LocalRunner(
      timeout=10,
      number=1,
      repeat=cfg.runner_repeat,
      min_repeat_ms=cfg.runner_min_repeat_ms,
      enable_cpu_cache_flush=True,
    ),
    measure_callbacks=[auto_scheduler.RecordToFile(log_file)],
  )
  np.random.seed(cfg.seed)  # RandomModel and Ansor's Python-side sampling draw from these
  random.seed(cfg.seed)
  try:
    scheduler.tune(options, search_policy=policies)
  finally:
    bar.close()
  report["best_latency_ms_per_task"] = [float(c) * 1e3 for c in scheduler.best_costs]
  report["tasks_without_valid_measurement"] = [
    t.desc for t, c in zip(tasks, scheduler.best_costs) if c >= 1e9
  ]


def compile_and_measure(
  mod, params, target: str, log_file: str, repeat: int, seed: int
) -> dict[str, Any]:
  """Builds the network with the log's best schedules and times it (``time_evaluator``)."""
  tvm = tvm_import.require_tvm()
  from tvm import auto_scheduler, relay
  from tvm.contrib import graph_executor

  t0 = time.time()
  with auto_scheduler.ApplyHistoryBest(log_file):
    with tvm.transform.PassContext(opt_level=3, config={"relay.backend.use_auto_scheduler": True}):
      lib = relay.build(mod, target=tvm.target.Target(target), params=params)
  build_s = time.time() - t0
  dev = tvm.cpu()
  module = graph_executor.GraphModule(lib["default"](dev))
  rng = np.random.default_rng(seed)
  for p in mod["main"].params:
    if p.name_hint in (params or {}):
      continue
    shape = [int(d) for d in p.checked_type.shape]
    module.set_input(p.name_hint, rng.uniform(-1, 1, shape).astype(p.checked_type.dtype))
  timer = module.module.time_evaluator("run", dev, number=1, repeat=repeat, min_repeat_ms=200)
  costs_ms = np.asarray(timer().results) * 1e3
  return {
    "status": "measured",
    "latency_ms_mean": float(costs_ms.mean()),
    "latency_ms_std": float(costs_ms.std()),
    "latency_ms_all": [round(float(c), 4) for c in costs_ms],
    "repeat": repeat,
    "build_s": round(build_s, 1),
  }


def plot(report: dict, path: str) -> None:
  """Best estimated latency against trials and against wall time (PNG)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  pts = [
    (c["trials"], c["elapsed_s"], c["estimated_latency_ms"])
    for c in report["curve"]
    if c["estimated_latency_ms"] is not None
  ]
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  label = report["cost_model_label"]
  if pts:
    trials, elapsed, lat = zip(*pts)
    axes[0].plot(trials, lat, marker=".", label=label)
    axes[1].plot(elapsed, lat, marker=".", label=label)
  net = report["network"]
  title = f"{net['name']} b{net['batch_size']} s{net['input_size']}, {len(report['tasks'])} tasks"
  axes[0].set(xlabel="measurement trials", ylabel="estimated latency (ms)", title=title)
  axes[1].set(xlabel="tuning wall time (s)", ylabel="estimated latency (ms)")
  for ax in axes:
    ax.grid(alpha=0.3)
    if pts:
      ax.legend()
  fig.tight_layout()
  try:
    atomic_file.write_atomically(path, lambda f: fig.savefig(f, dpi=100, format="png"), binary=True)
  finally:
    plt.close(fig)


# What a rerun into the same --out must keep, so that the resumed curve is one run's.
RESUME_FIELDS = ("network", "target", "cost_model", "load_model", "update", "hardware_head", "seed")


def check_resume(cfg: TuneConfig, target: str, out_json: str) -> None:
  """Refuses (``TuneError``) to continue an ``--out`` whose ``tune.json`` was written by a run
  with other settings (``RESUME_FIELDS``; ``--n_trials`` may grow). Before any work."""
  if not os.path.exists(out_json):
    return
  try:
    with open(out_json, encoding="utf-8") as f:
      previous = json.load(f)
  except (OSError, ValueError) as e:
    raise TuneError(f"{out_json}: unreadable ({e}); use another --out") from None
  now = {
    "network": dataclasses.asdict(cfg.network),
    "target": target,
    "cost_model": cfg.cost_model,
    "load_model": cfg.load_model,
    "update": cfg.update,
    "hardware_head": cfg.hardware,
    "seed": cfg.seed,
  }
  differ = {k: (previous.get(k), v) for k, v in now.items() if previous.get(k) != v}
  if differ:
    fields = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in differ.items())
    raise TuneError(
      f"{out_json} holds a run with other settings ({fields}); rerun with them to resume it, "
      "or use another --out"
    )


def run(cfg: TuneConfig) -> dict:
  """The whole run (module docstring); returns the report also written to ``OUT/tune.json``.

  Raises:
    TuneError, FileNotFoundError, PredictorError, PretrainedError: user errors, all raised
      before tuning starts.
  """
  check_config(cfg)
  tvm_import.require_tvm()
  target = cfg.target or collect.default_target()
  os.makedirs(cfg.out_dir, exist_ok=True)
  if os.path.dirname(cfg.log_path):
    os.makedirs(os.path.dirname(cfg.log_path), exist_ok=True)
  # The model first: a bad file or name must fail before minutes of task extraction.
  check_resume(cfg, target, os.path.join(cfg.out_dir, RESULT_JSON))
  tlp_model = make_tlp_model(cfg) if cfg.cost_model == "tlp" else None
  mod, params = collect.NETWORKS[cfg.network.name](cfg.network.batch_size, cfg.network.input_size)
  t0 = time.time()
  all_tasks, all_weights = collect.extract_network_tasks(cfg.network, target, None)
  chosen = select_tasks(all_tasks, all_weights, cfg.num_tasks)
  tasks = [all_tasks[i] for i in chosen]
  weights = [all_weights[i] for i in chosen]
  if cfg.n_trials < len(tasks):
    raise TuneError(f"--n_trials {cfg.n_trials} is below the {len(tasks)} tasks to tune")
  per_round = min(cfg.num_measures_per_round, cfg.n_trials // len(tasks))
  model = make_cost_model(cfg, len(tasks), per_round, tlp_model)
  label = cfg.cost_model + (f" ({cfg.update})" if cfg.cost_model == "tlp" else "")
  out_json = os.path.join(cfg.out_dir, RESULT_JSON)
  previous = {}
  if os.path.exists(out_json):  # a resumed run continues its curve
    with open(out_json, encoding="utf-8") as f:
      previous = json.load(f)
  report = {
    "status": "tuning",
    "network": dataclasses.asdict(cfg.network),
    "layout": NETWORK_LAYOUTS.get(cfg.network.name, "NCHW"),
    "target": target,
    "cost_model": cfg.cost_model,
    "cost_model_label": label,
    "load_model": cfg.load_model,
    "update": cfg.update,
    "hardware_head": cfg.hardware,
    "seed": cfg.seed,
    "n_trials": cfg.n_trials,
    "num_measures_per_round": per_round,
    "population": cfg.population,
    "runner": f"LocalRunner(number=1, repeat={cfg.runner_repeat}, "
    f"min_repeat_ms={cfg.runner_min_repeat_ms}, cache flush)",
    "log_file": cfg.log_path,
    "network_tasks_total": len(all_tasks),
    "task_extraction_s": round(time.time() - t0, 1),
    "tasks": [
      {
        "workload_key": t.workload_key,
        "desc": t.desc,
        "weight": w,
        "flop_ct": t.compute_dag.flop_ct,
      }
      for t, w in zip(tasks, weights)
    ],
    "curve": previous.get("curve", []),
    "rounds": previous.get("rounds", []),
    "end_to_end": None,
  }

  def save():
    _write_json(out_json, report)

  logging.info(
    "tuning %d of %d tasks of %s with %s on %s",
    len(tasks),
    len(all_tasks),
    cfg.network,
    label,
    target,
  )
  t0 = time.time()
  tune_tasks(cfg, tasks, weights, model, report, save)
  report["tuning_wall_s"] = round(time.time() - t0, 1)
  curve = report["curve"]
  report["trials"] = curve[-1]["trials"] if curve else 0
  report["final_estimated_latency_ms"] = curve[-1]["estimated_latency_ms"] if curve else None
  report["predict_total_s"] = round(sum(r["predict_s"] for r in report["rounds"]), 3)
  report["update_total_s"] = round(sum(r["update_s"] for r in report["rounds"]), 3)
  report["predict_s_per_round_mean"] = (
    round(report["predict_total_s"] / len(report["rounds"]), 4) if report["rounds"] else 0.0
  )
  if isinstance(model.inner, tlp_cost_model.TLPCostModel):
    report["tlp_timing"] = model.inner.timing_summary()
  report["status"] = "tuned"
  save()
  if cfg.e2e_repeat > 0:
    try:
      report["end_to_end"] = compile_and_measure(
        mod, params, target, cfg.log_path, cfg.e2e_repeat, cfg.seed
      )
      if len(tasks) < len(all_tasks):
        report["end_to_end"]["note"] = (
          f"only {len(tasks)} of {len(all_tasks)} tasks were tuned; the others use TVM's "
          "fallback schedules"
        )
    except Exception as e:  # the tuning results stand; say why there is no latency
      report["end_to_end"] = {"status": f"failed: {type(e).__name__}: {str(e)[-500:]}"}
      logging.warning("end-to-end build or run failed: %s", report["end_to_end"]["status"])
  report["status"] = "done"
  save()
  plot(report, os.path.join(cfg.out_dir, RESULT_PNG))
  return report


# ---- command line -------------------------------------------------------------------------


def _define_flags():
  from absl import flags

  flags.DEFINE_string("network", None, f"One of: {', '.join(sorted(collect.NETWORKS))}.")
  flags.DEFINE_integer("batch", 1, "Batch size.")
  flags.DEFINE_integer("size", 224, "Input image side (mlp: the square input side).")
  flags.DEFINE_string("layout", None, "Checked against the network's layout (NHWC for CNNs).")
  flags.DEFINE_string("target", None, "TVM target (default: llvm -mcpu=<this CPU>).")
  flags.DEFINE_integer("n_trials", 1000, "Measurement trials, all tuned tasks together.")
  flags.DEFINE_integer("num_measures_per_round", 64, "Programs measured per search round.")
  flags.DEFINE_enum("cost_model", "tlp", list(COST_MODELS), "Cost model.")
  flags.DEFINE_enum("update", "none", list(tlp_cost_model.UPDATE_MODES), "TLP update mode.")
  flags.DEFINE_string("load_model", None, "TLP model: an exported .npz or pretrained:NAME.")
  flags.DEFINE_string("hw", None, "Head of a multi-head TLP model (default: its first).")
  flags.DEFINE_string("log_file", None, "Ansor record log (default: OUT/records.json).")
  flags.DEFINE_integer("seed", 0, "Seed of the search, the XGB model and the inputs.")
  flags.DEFINE_string("out", None, "Output folder (tune.json, tune.png, records.json).")
  flags.DEFINE_integer("num_tasks", 0, "Tune only the N heaviest tasks (0 = all).")
  flags.DEFINE_integer("population", 2048, "Evolutionary search population.")
  flags.DEFINE_integer("runner_repeat", 3, "LocalRunner repeats per measurement.")
  flags.DEFINE_integer("e2e_repeat", 10, "Repeats of the end-to-end timing (0 = skip).")
  flags.DEFINE_bool("progress", True, "Show a progress bar.")


def config_from_flags(values) -> TuneConfig:
  """``TuneConfig`` of parsed absl flags; missing required flags are ``TuneError``s."""
  for name in ("network", "out"):
    if not getattr(values, name):
      raise TuneError(f"--{name} is required")
  return TuneConfig(
    network=collect.NetworkSpec(values.network, values.batch, values.size),
    out_dir=values.out,
    n_trials=values.n_trials,
    cost_model=values.cost_model,
    load_model=values.load_model,
    update=values.update,
    hardware=values.hw,
    target=values.target,
    layout=values.layout,
    log_file=values.log_file,
    num_measures_per_round=values.num_measures_per_round,
    population=values.population,
    num_tasks=values.num_tasks,
    seed=values.seed,
    runner_repeat=values.runner_repeat,
    e2e_repeat=values.e2e_repeat,
    progress=values.progress,
  )


# TVM's Python loggers that print per operator or per task at INFO.
NOISY_LOGGERS = ("te_compiler", "strategy", "auto_scheduler", "autotvm", "compile_engine")
# What a user can get wrong before tuning: one line, no traceback.
USER_ERRORS = (TuneError, npred.PredictorError, pretrained.PretrainedError, FileNotFoundError)


def main(argv) -> None:
  from absl import flags

  if len(argv) > 1:
    raise TuneError(f"unexpected arguments: {argv[1:]}")
  os.environ.setdefault("TOPHUB_LOCATION", "NONE")  # no network access for TopHub
  for name in NOISY_LOGGERS:  # relay.build logs every operator strategy at INFO
    logging.getLogger(name).setLevel(logging.WARNING)
  try:
    report = run(config_from_flags(flags.FLAGS))
  except USER_ERRORS as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  e2e = report.get("end_to_end") or {}
  print(
    f"{report['cost_model_label']}: {report['trials']} trials, estimated latency "
    f"{report['final_estimated_latency_ms']} ms, end-to-end "
    f"{e2e.get('latency_ms_mean', e2e.get('status', 'not measured'))} ms; "
    f"wrote {os.path.join(flags.FLAGS.out, RESULT_JSON)}"
  )


if __name__ == "__main__":
  from absl import app

  _define_flags()
  app.run(main)
