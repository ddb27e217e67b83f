r"""Tune one network's tasks with Ansor on this CPU: default XGBModel vs TLPCostModel.

Same tasks, trial budget, search parameters and seed for both cost models; the only difference
is the ``program_cost_model`` of the SketchPolicies. Records, per cost model:

* best *estimated* network latency (Ansor's objective: sum over tasks of weight x best measured
  latency) after every search round vs trials and wall time;
* tuning wall time; time spent in ``predict`` (and, for XGB, ``update`` = retraining) per round.

Writes ``bench/results/tune_<network>.json`` and ``.png`` (``--out_name`` renames them).

Usage::

  TOPHUB_LOCATION=NONE python -m bench.tune_network --model /tmp/tlp.npz \
      [--network resnet_18:1:224] [--num_tasks 6] [--trials 192] [--per_round 8] \
      [--population 512] [--seed 0] [--score_transform softplus] [--models xgb,tlp] \
      [--out_name tune_resnet_18_all_tasks]
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags, logging

from bench import common
from tlp_jax.core import predictor as npred
from tlp_jax.tvm import collect, tvm_import
from tlp_jax.tvm import cost_model as tvm_cost_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "Exported TLP model (.npz) for TLPCostModel.")
flags.DEFINE_string("hw", None, "Head of the exported model (default: its first head).")
flags.DEFINE_string("network", "resnet_18:1:224", "NAME:BATCH:SIZE (tlp_jax.tvm.collect).")
flags.DEFINE_string("target", None, "LLVM target (default: llvm -mcpu=<host cpu>).")
flags.DEFINE_integer(
  "num_tasks", 6, "Tune the N tasks with the largest weight x FLOPs (0 = all tasks of the network)."
)
flags.DEFINE_integer("trials", 192, "Measurement trials per cost model (all tasks together).")
flags.DEFINE_integer("per_round", 8, "Programs measured per search round.")
flags.DEFINE_integer("population", 512, "Evolutionary search population (Ansor: 2048).")
flags.DEFINE_integer("seed", 0, "Seed of the search policies, task scheduler and numpy.")
flags.DEFINE_enum(
  "score_transform",
  "softplus",
  sorted(tvm_cost_model.SCORE_TRANSFORMS),
  "TLPCostModel score transform.",
)
flags.DEFINE_list("models", ["xgb", "tlp"], "Cost models to run, in order.")
flags.DEFINE_string("single_model", None, "Internal: run only this cost model, in this process.")
flags.DEFINE_string("work_dir", None, "Records and per-model results (default: a temp dir).")
flags.DEFINE_string("out_dir", os.path.join(REPO, "bench", "results"), "Where JSON/PNG go.")
flags.DEFINE_string("out_name", None, "Base name of the JSON/PNG (default: tune_<network>).")


def _timed_xgb(num_warmup_sample: int, seed: int):
  """Ansor's XGBModel, with predict/update timed per call."""
  from tvm.auto_scheduler.cost_model import XGBModel

  class TimedXGBModel(XGBModel):
    def __init__(self):
      super().__init__(num_warmup_sample=num_warmup_sample, seed=seed, verbose_eval=0)
      self.predict_calls, self.update_calls = [], []

    def predict(self, task, states):
      t0 = time.perf_counter()
      out = super().predict(task, states)
      self.predict_calls.append((task.workload_key, len(states), time.perf_counter() - t0))
      return out

    def update(self, inputs, results):
      t0 = time.perf_counter()
      super().update(inputs, results)
      self.update_calls.append((len(inputs), time.perf_counter() - t0))

  return TimedXGBModel()


def _predict_log(model) -> list:
  """(workload_key, states, seconds) per predict call, for either cost model."""
  if isinstance(model, tvm_cost_model.TLPCostModel):
    return [(c.workload_key, c.num_states, c.total_s) for c in model.calls]
  return list(model.predict_calls)


def _make_model(name: str, num_tasks: int):
  """The cost model called ``name`` ("xgb": Ansor's default, "tlp": TLPCostModel)."""
  if name == "xgb":
    return _timed_xgb(num_tasks * FLAGS.per_round, FLAGS.seed + 43)
  if name == "tlp":
    if not FLAGS.model:
      raise app.UsageError("--model (an exported .npz) is required for the tlp cost model")
    return tvm_cost_model.TLPCostModel(
      npred.Predictor.load(FLAGS.model),
      tvm_cost_model.CostModelConfig(hardware=FLAGS.hw, score_transform=FLAGS.score_transform),
    )
  raise app.UsageError(f"unknown cost model {name!r}; choose xgb or tlp")


def tune(name, tasks, weights, cost_model, log_file, partial_path=None):
  """Runs Ansor's task scheduler with ``cost_model``; returns the curve and timings.

  After every round the curve so far is written to ``partial_path`` (status "running"), so a
  crash inside TVM still leaves the rounds that finished.
  """
  from tvm import auto_scheduler

  curve = []
  rounds = []

  def dump_partial():
    if partial_path:
      with open(partial_path + ".tmp", "w", encoding="utf-8") as f:
        json.dump({"cost_model": name, "status": "running", "curve": curve, "per_round": rounds}, f)
      os.replace(partial_path + ".tmp", partial_path)

  class Record(auto_scheduler.task_scheduler.TaskSchedulerCallback):
    """After each round: trials, elapsed time, estimated latency, predict time in the round."""

    def __init__(self):
      self.seen_calls = 0

    def post_tune(self, task_scheduler, task_id):
      calls = _predict_log(cost_model)
      new = calls[self.seen_calls :]
      self.seen_calls = len(calls)
      done = all(c < 1e9 for c in task_scheduler.best_costs)
      est = float(task_scheduler.cur_score) if done else None
      curve.append(
        {
          "trials": int(task_scheduler.ct),
          "elapsed_s": round(time.time() - task_scheduler.tic, 2),
          "estimated_latency_ms": None if est is None else est * 1e3,
        }
      )
      rounds.append(
        {
          "task": int(task_id),
          "predict_calls": len(new),
          "predict_states": int(sum(c[1] for c in new)),
          "predict_s": float(sum(c[2] for c in new)),
        }
      )
      dump_partial()

  policies = [
    auto_scheduler.SketchPolicy(
      t,
      program_cost_model=cost_model,
      params={"evolutionary_search_population": FLAGS.population},
      seed=FLAGS.seed + 1 + i,
      verbose=0,
    )
    for i, t in enumerate(tasks)
  ]
  scheduler = auto_scheduler.TaskScheduler(tasks, weights, callbacks=[Record()])
  runner = auto_scheduler.LocalRunner(
    timeout=10, number=1, repeat=3, min_repeat_ms=50, enable_cpu_cache_flush=True
  )
  options = auto_scheduler.TuningOptions(
    num_measure_trials=FLAGS.trials,
    num_measures_per_round=FLAGS.per_round,
    verbose=0,
    runner=runner,
    measure_callbacks=[auto_scheduler.RecordToFile(log_file)],
  )
  np.random.seed(FLAGS.seed)
  random.seed(FLAGS.seed)
  t0 = time.time()
  scheduler.tune(options, search_policy=policies)
  wall = time.time() - t0
  calls = _predict_log(cost_model)
  out = {
    "cost_model": name,
    "wall_s": round(wall, 1),
    "trials": int(scheduler.ct),
    "final_estimated_latency_ms": float(scheduler.cur_score) * 1e3,
    "best_latency_ms_per_task": [float(c) * 1e3 for c in scheduler.best_costs],
    # Tasks none of whose trials measured (Ansor keeps 1e10 s for them, so the estimated
    # network latency above is 1e13 ms until every task has one valid measurement).
    "tasks_without_valid_measurement": [
      t.desc for t, c in zip(tasks, scheduler.best_costs) if c >= 1e9
    ],
    "predict_total_s": float(sum(c[2] for c in calls)),
    "predict_calls": len(calls),
    "predict_states": int(sum(c[1] for c in calls)),
    "rounds": len(rounds),
    "predict_s_per_round_mean": float(np.mean([r["predict_s"] for r in rounds])) if rounds else 0.0,
    "curve": curve,
    "per_round": rounds,
  }
  if isinstance(cost_model, tvm_cost_model.TLPCostModel):
    out["tlp_timing"] = cost_model.timing_summary()
  else:
    out["update_total_s"] = float(sum(u[1] for u in cost_model.update_calls))
  logging.info(
    "%s: %d trials in %.0f s, estimated latency %.3f ms, predict %.1f s total",
    name,
    out["trials"],
    wall,
    out["final_estimated_latency_ms"],
    out["predict_total_s"],
  )
  return out


def plot(results: dict, path: str, title: str) -> None:
  """Best estimated latency vs trials and vs wall time, one line per cost model."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
  for name, r in results.items():
    pts = [
      (c["trials"], c["elapsed_s"], c["estimated_latency_ms"])
      for c in r["curve"]
      if c["estimated_latency_ms"] is not None
    ]
    if pts:
      trials, elapsed, lat = zip(*pts)
      axes[0].plot(trials, lat, marker=".", label=name)
      axes[1].plot(elapsed, lat, marker=".", label=name)
    axes[2].plot([p["predict_s"] for p in r["per_round"]], marker=".", label=name)
  axes[0].set(xlabel="measurement trials", ylabel="best estimated latency (ms)", title=title)
  axes[1].set(xlabel="tuning wall time (s)", ylabel="best estimated latency (ms)")
  axes[2].set(xlabel="search round", ylabel="time in predict (s)", title="predict per round")
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv):
  del argv
  tvm_import.require_tvm()
  load_at_start = os.getloadavg()
  spec = collect.NetworkSpec.parse(FLAGS.network)
  target = FLAGS.target or collect.default_target()
  t0 = time.time()
  all_tasks, all_weights = collect.extract_network_tasks(spec, target, None)
  extract_s = time.time() - t0
  order = sorted(
    range(len(all_tasks)),
    key=lambda i: -all_weights[i] * max(all_tasks[i].compute_dag.flop_ct, 0.0),
  )
  chosen = sorted(order[: FLAGS.num_tasks] if FLAGS.num_tasks > 0 else order)
  tasks = [all_tasks[i] for i in chosen]
  weights = [all_weights[i] for i in chosen]
  logging.info(
    "tuning %d of %d tasks of %s on %s", len(tasks), len(all_tasks), FLAGS.network, target
  )

  work = FLAGS.work_dir or tempfile.mkdtemp(prefix="tune_")
  os.makedirs(work, exist_ok=True)
  if FLAGS.single_model:
    name = FLAGS.single_model
    result_path = os.path.join(work, f"{name}.result.json")
    result = tune(
      name,
      tasks,
      weights,
      _make_model(name, len(tasks)),
      os.path.join(work, f"{name}.records.json"),
      result_path,
    )
    result["status"] = "done"
    with open(result_path, "w", encoding="utf-8") as f:
      json.dump(result, f)
    return

  # Each cost model runs in its own process: TVM's C++ feature extraction can abort the whole
  # process (an out-of-range assertion seen with XGBModel); the other model's run survives and
  # the crashed one keeps the rounds it finished.
  results = {}
  for name in FLAGS.models:
    args = [
      sys.executable,
      "-m",
      "bench.tune_network",
      f"--single_model={name}",
      f"--work_dir={work}",
    ] + [a for a in sys.argv[1:] if not a.startswith(("--single_model", "--work_dir", "--models"))]
    t0 = time.time()
    # The child imports ``bench`` from this checkout whatever the current folder (relative
    # paths in the flags stay relative to it).
    env = dict(
      os.environ, PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    )
    proc = subprocess.run(args, check=False, env=env)
    path = os.path.join(work, f"{name}.result.json")
    result = {"cost_model": name, "status": "no result", "curve": [], "per_round": []}
    if os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        result = json.load(f)
    if proc.returncode != 0:
      result["status"] = (
        f"crashed (exit code {proc.returncode}) after {len(result['curve'])} rounds"
      )
      result["wall_s"] = round(time.time() - t0, 1)
      logging.warning("%s: %s", name, result["status"])
    results[name] = result

  net = spec.name
  report = {
    "network": FLAGS.network,
    "target": target,
    # load average at the end of the run; the one at its start beside it
    "machine": common.machine_info(load_average_start=load_at_start),
    "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    "tasks": [
      {
        "workload_key": t.workload_key,
        "desc": t.desc,
        "weight": w,
        "flop_ct": float(t.compute_dag.flop_ct),
      }
      for t, w in zip(tasks, weights)
    ],
    "network_tasks_total": len(all_tasks),
    "task_extraction_s": round(extract_s, 1),
    "budget": {
      "trials": FLAGS.trials,
      "per_round": FLAGS.per_round,
      "population": FLAGS.population,
      "seed": FLAGS.seed,
      "runner": "LocalRunner(number=1, repeat=3, min_repeat_ms=50, cache flush)",
    },
    "tlp_model": FLAGS.model,
    "tlp_head": FLAGS.hw,
    "score_transform": FLAGS.score_transform,
    "results": results,
  }
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  base = os.path.join(FLAGS.out_dir, FLAGS.out_name or f"tune_{net}")
  path = base + ".json"
  common.write_json(path, report)
  plot(results, base + ".png", f"{FLAGS.network}, {len(tasks)} tasks")
  for name, r in results.items():
    if r.get("status") != "done":
      last = r["curve"][-1] if r["curve"] else {}
      print(f"{name:4s} {r['status']}; last round: {last}")
      continue
    print(
      f"{name:4s} trials {r['trials']:4d}  wall {r['wall_s']:7.1f} s  "
      f"est. latency {r['final_estimated_latency_ms']:8.3f} ms  "
      f"predict {r['predict_total_s']:6.1f} s ({r['predict_s_per_round_mean']:.2f} s/round)"
    )
  print(f"wrote {path}")


if __name__ == "__main__":
  flags.mark_flag_as_required("model")
  app.run(main)
