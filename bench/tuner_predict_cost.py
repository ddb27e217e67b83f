"""What one ``TLPCostModel.predict`` costs inside Ansor with the default model, next to Ansor's
own ``XGBModel.predict`` on the same states (needs TVM).

For tasks of the sample (their compute DAGs come from its ``network_info/all_tasks.pkl``; by
default the heaviest task of each hold-out network), Ansor's ``SketchPolicy`` samples a population
of states and each model scores the whole population:

* ``tlp``: ``configs/default.py``'s model (its ensemble size) of replayed loop tokens, exported as
  the trainer exports it (``train.data.model_config_for`` / ``dataset_meta`` on a dataset of loop
  tokens, the sample's skeletons embedded). Its first call per task extracts the task's skeleton
  with TVM and traces the replay templates cold; it is timed apart (``first_s``) from the
  steady-state calls that follow (``steady_s``, best of ``--repeats``; ``median_s``, their
  median; prediction cache off so every call scores every state);
* ``tlp_steps``: the same recipe on TLP's step features only (``loop_tokens="off"``), for
  reference;
* ``xgb``: Ansor's ``XGBModel`` trained on the sample's training records of ``--hardware``
  (``tlp_jax.tvm.xgb_baseline``'s protocol), whose ``predict`` runs TVM's per-store feature
  extraction and XGBoost on every call (its first call is timed apart too).

The TLP models are randomly initialised at the default dimensions (timing does not depend on the
weights' values). One steady-state call of ``tlp`` on the first task is also run under cProfile
(``profile_tlp_steady_call``: seconds in serialisation, replay, loop tokens, step features and
the network). On one more steady-state call per task the network is timed alone and its work
counted from the inputs it ran (``tlp_network``: rows and MFLOP per state after the predictor's
row dedup, ``Predictor.forward_cost``), next to this machine's float32 GEMM rate (``sgemm``) and
the states/s that rate would allow (``states_per_s_bound_at_sgemm_rate``). Prints a table and
writes ``bench/results/tuner_predict_cost.json`` with machine
info (load average at the start and the end).

    python -m bench.tuner_predict_cost [--states 512] [--tasks 3] [--repeats 3]
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import os
import pstats
import tempfile
import time
import types

os.environ.setdefault("TOPHUB_LOCATION", "NONE")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (JAX_PLATFORMS above must be set first)
import numpy as np  # noqa: E402

from bench import common  # noqa: E402
from configs import default  # noqa: E402
from tlp_jax.core import (
  features,  # noqa: E402
  loop_tokens,  # noqa: E402
  network_info,  # noqa: E402
  skeleton,  # noqa: E402
  tenset,  # noqa: E402
)
from tlp_jax.train import config as config_lib  # noqa: E402
from tlp_jax.train import (
  data,  # noqa: E402
  export,  # noqa: E402
)
from tlp_jax.train import model as model_lib  # noqa: E402
from tlp_jax.tvm import (
  cost_model,  # noqa: E402
  search_tasks,  # noqa: E402
  tvm_import,  # noqa: E402
  xgb_baseline,  # noqa: E402
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def export_default_model(
  out: str, skeletons_path: str, loop_tokens_mode: str, model_overrides: dict | None = None
) -> str:
  """``configs/default.py``'s model exported as the trainer exports it from a dataset of loop
  tokens with these skeletons (``loop_tokens_mode``: the config's ``loop_tokens``;
  ``model_overrides``: ``config.model`` fields to change, for a cheaper candidate network)."""
  config = default.get_config()
  config.loop_tokens = loop_tokens_mode
  for key, value in (model_overrides or {}).items():
    config.model[key] = value
  typed = config_lib.from_config_dict(config)
  step_crop = (typed.model.seq_len, typed.model.feature_dim)
  # What the loader returns for a default build of TLP's crop with loop tokens.
  dataset = types.SimpleNamespace(
    crop=step_crop,
    platform="llvm",
    config_name="bench",
    vocab_json=features.Vocabulary.original("llvm").to_json(),
    metadata={
      "loop_tokens": {
        "layout_version": loop_tokens.LAYOUT_VERSION,
        "max_tokens": loop_tokens.DEFAULT_MAX_TOKENS,
        "width": loop_tokens.WIDTH,
      }
    },
  )
  reads = data.reads_loop_tokens(typed.loop_tokens, dataset)
  if reads:  # as the trainer: the model reads config.max_loop_tokens of the stored tokens
    dataset = data.crop_loop_tokens(dataset, typed.max_loop_tokens)
  cfg = data.model_config_for(typed.model, typed.loop_tokens, dataset, num_hardware_heads=1)
  params = model_lib.TLPModel(cfg).init(
    jax.random.PRNGKey(0), np.zeros((1, cfg.seq_len, cfg.feature_dim), np.float32)
  )["params"]
  meta = dict(data.dataset_meta(dataset, ["hw"], reads), step=0)
  if reads:
    with open(skeletons_path, encoding="utf-8") as f:
      meta["skeletons_json"] = f.read()
  export.save_npz(out, params, cfg, **export.meta_kwargs(meta))
  return out


def _time_model(model, task, states, repeats: int) -> tuple[float, float, float]:
  """``(first call s, best steady-state call s, median steady-state call s)`` of
  ``model.predict(task, states)`` over ``repeats`` steady calls: the best is the least disturbed
  call, the median what a tuner's calls take typically (collector pauses included)."""
  t0 = time.perf_counter()
  model.predict(task, states)
  first = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    model.predict(task, states)
    times.append(time.perf_counter() - t0)
  return first, min(times), float(np.median(times))


# Where a TLPCostModel.predict call spends its time: (file, function) of the profile -> bucket.
_PROFILE_BUCKETS = {
  ("cost_model.py", "predict"): "total",
  ("cost_model.py", "state_steps_json"): "serialize (TVM record writer)",
  ("replay_cache.py", "values"): "replay (templates / full replay)",
  ("replay_cache.py", "fill_padded"): "loop tokens (NumPy fill)",
  ("predictor.py", "featurize_steps"): "step features",
  ("predictor.py", "predict"): "network (NumPy forward)",
}


def profile_split(model, task, states, top: int = 15) -> dict:
  """cProfile of one steady-state ``model.predict(task, states)``: cumulative seconds per bucket
  of ``_PROFILE_BUCKETS`` (under the profiler, so slower than unprofiled) and the top functions
  by own time."""
  prof = cProfile.Profile()
  prof.runcall(model.predict, task, states)
  stats = pstats.Stats(prof).stats  # (file, line, name) -> (cc, nc, tottime, cumtime, callers)
  buckets = {}
  for (path, _, name), (_, _, _, cum, _) in stats.items():
    bucket = _PROFILE_BUCKETS.get((os.path.basename(path), name))
    if bucket:
      buckets[bucket] = buckets.get(bucket, 0.0) + cum
  # orjson.loads of the serialised inputs: a C function, keyed by its repr.
  buckets["orjson.loads"] = sum(v[3] for k, v in stats.items() if "orjson.loads" in k[2])
  own = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
  return {
    "states": len(states),
    "buckets_s": buckets,
    "top_own_time": [
      {
        "function": f"{os.path.basename(k[0])}:{k[1]}({k[2]})",
        "calls": v[1],
        "own_s": v[2],
        "cum_s": v[3],
      }
      for k, v in own
    ],
  }


def _sgemm_gflops(threads_note: str, repeats: int = 10) -> dict:
  """This machine's float32 GEMM rate on the network's shape ((8192, 256) x (256, 256)), best
  of ``repeats``: the ceiling of any dense NumPy forward here."""
  rng = np.random.default_rng(0)
  a = rng.standard_normal((8192, 256), dtype=np.float32)
  w = rng.standard_normal((256, 256), dtype=np.float32)
  best = common.best_time(lambda: a @ w, repeats)
  return {"gflops": 2 * 8192 * 256 * 256 / best / 1e9, "threads": threads_note}


def network_cost(model, task, states) -> dict:
  """One steady-state ``model.predict`` with the NumPy network timed and its work counted
  (``Predictor.forward_cost`` of the inputs it ran, after the row dedup): rows and FLOPs per
  state, the network's seconds and the GFLOP/s it ran at."""
  pred = model.predictor
  forward = pred._forward  # pylint: disable=protected-access
  predict = pred.predict
  acc = {"network_s": 0.0, "programs": 0.0, "packed_rows": 0.0, "unique_rows": 0.0, "flops": 0.0}
  inputs = []  # (model input chunk, heads) of every forward, counted after the call

  def counted_forward(x, heads):
    inputs.append((x, len(heads)))  # list.append is atomic: the chunks may run on threads
    return forward(x, heads)

  def timed_predict(*args, **kwargs):  # wall time of the network, over all its threads
    t = time.perf_counter()
    out = predict(*args, **kwargs)
    acc["network_s"] += time.perf_counter() - t
    return out

  pred._forward = counted_forward  # pylint: disable=protected-access
  pred.predict = timed_predict
  try:
    t = time.perf_counter()
    model.predict(task, states)
    call_s = time.perf_counter() - t
  finally:
    del pred._forward, pred.predict  # the class methods again
  for x, heads in inputs:
    for k, v in pred.forward_cost(x, heads).items():
      if k in acc:
        acc[k] += v
  n = max(acc["programs"], 1.0)
  return {
    "states": len(states),
    "call_s": call_s,
    "network_s": acc["network_s"],
    "packed_rows_per_state": acc["packed_rows"] / n,
    "unique_rows_per_state": acc["unique_rows"] / n,
    "mflop_per_state": acc["flops"] / n / 1e6,
    "network_gflops": acc["flops"] / max(acc["network_s"], 1e-12) / 1e9,
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tenset_dir", default=os.path.join(REPO, "data", "sample", "tenset-mini"))
  parser.add_argument("--hardware", default="epyc-9004", help="XGBModel's training records.")
  parser.add_argument("--states", type=int, default=512)
  parser.add_argument("--tasks", type=int, default=3, help="0 = every task of all_tasks.pkl.")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument(
    "--model",
    action="append",
    default=[],
    help="config.model field of the timed TLP models, KEY=PYTHON_LITERAL (a cheaper candidate "
    "network, e.g. --model res_blocks=0 --model decoder_dims=(64,1)); default: configs/default.py",
  )
  parser.add_argument(
    "--threads",
    type=int,
    default=cost_model.CostModelConfig.threads,
    help="CostModelConfig.threads of the TLP models (0 = one per core).",
  )
  parser.add_argument(
    "--out", default=os.path.join(REPO, "bench", "results", "tuner_predict_cost.json")
  )
  args = parser.parse_args()
  if args.repeats < 1:
    parser.error("--repeats must be >= 1")
  model_overrides = common.parse_overrides(args.model)
  load_at_start = os.getloadavg()

  # TVM only past the flags, so --help works without it.
  tvm_import.require_tvm()
  from tvm import auto_scheduler
  from tvm.auto_scheduler.cost_model import XGBModel

  tasks = {
    t.workload_key: t
    for t in search_tasks.load_search_tasks(tenset.all_tasks_path(args.tenset_dir))
  }
  if args.tasks > 0:
    nets = network_info.load_network_infos(args.tenset_dir)
    held = network_info.select_holdout(nets, network_info.default_holdout(nets))
    chosen = []
    for net in held:  # heaviest task of each hold-out network, round-robin
      for t in sorted(net.tasks, key=lambda t: -np.nan_to_num(t.flop_ct) * t.weight):
        if t.workload_key in tasks and t.workload_key not in chosen:
          chosen.append(t.workload_key)
          break
    chosen = chosen[: args.tasks]
  else:
    chosen = sorted(tasks)

  prep = xgb_baseline.prepare_hardware(args.tenset_dir, args.hardware, progress=False)
  xgb = XGBModel(seed=43, verbose_eval=0)
  t0 = time.perf_counter()
  xgb.update(prep.train_inputs, prep.train_results)
  xgb_fit_s = time.perf_counter() - t0

  ensemble = int(default.get_config().model.ensemble_size)
  tlp_config = cost_model.CostModelConfig(cache_size=0, threads=args.threads)
  network_threads = None  # as the cost model resolves args.threads
  with tempfile.TemporaryDirectory() as tmp:
    skeletons_path = skeleton.tenset_skeletons_path(args.tenset_dir)
    paths = {
      "tlp": export_default_model(
        os.path.join(tmp, "tlp.npz"), skeletons_path, "required", model_overrides
      ),
      "tlp_steps": export_default_model(
        os.path.join(tmp, "steps.npz"), skeletons_path, "off", model_overrides
      ),
    }
    rows = []
    profile = None  # one steady-state call of the default model, first task
    for wk in chosen:
      task = tasks[wk]
      policy = auto_scheduler.SketchPolicy(
        task, params={"evolutionary_search_population": args.states}, seed=0, verbose=0
      )
      states = list(policy.sample_initial_population())[: args.states]
      row = {"workload_key": wk, "states": len(states)}
      for name, path in paths.items():
        model = cost_model.TLPCostModel(path, tlp_config)
        network_threads = model.threads
        row[f"{name}_first_s"], row[f"{name}_steady_s"], row[f"{name}_median_s"] = _time_model(
          model, task, states, args.repeats
        )
        row[f"{name}_failed"] = model.timing_summary()["states_failed"]
        if name == "tlp" and profile is None:
          profile = dict(profile_split(model, task, states), workload_key=wk)
        if name == "tlp":
          row["tlp_network"] = network_cost(model, task, states)
      row["xgb_first_s"], row["xgb_steady_s"], row["xgb_median_s"] = _time_model(
        xgb, task, states, args.repeats
      )
      rows.append(row)
      timed = ", ".join(f"{k[:-2]} {v:.3f} s" for k, v in row.items() if k.endswith("_s"))
      print(f"{wk[:60]}: {len(states)} states: {timed}")

  n = int(sum(r["states"] for r in rows))
  nets = [r["tlp_network"] for r in rows]
  flops = sum(c["mflop_per_state"] * c["states"] for c in nets) / n * 1e6
  sgemm = _sgemm_gflops("numpy's BLAS, default threads (2 cores)")
  network = {
    "mflop_per_state": flops / 1e6,
    "network_gflops": flops * n / sum(c["network_s"] for c in nets) / 1e9,
    "network_states_per_s": n / sum(c["network_s"] for c in nets),
    "sgemm": sgemm,
    # The most states/s any float32 NumPy forward of this model reaches here: every FLOP at
    # the measured GEMM rate (elementwise work, attention and featurization not counted).
    "states_per_s_bound_at_sgemm_rate": sgemm["gflops"] * 1e9 / flops,
  }
  print(
    f"network: {network['mflop_per_state']:.1f} MFLOP/state after dedup, "
    f"{network['network_gflops']:.1f} GFLOP/s (sgemm {sgemm['gflops']:.1f}), "
    f"{network['network_states_per_s']:,.0f} states/s for the network alone, bound "
    f"{network['states_per_s_bound_at_sgemm_rate']:,.0f}"
  )
  summary = {}
  for key in rows[0]:
    if key.endswith("_s"):
      total = float(sum(r[key] for r in rows))
      summary[f"{key[:-2]}_states_per_s"] = n / total if total > 0 else None
  print(
    f"states/s over {n} states of {len(rows)} tasks (ensemble {ensemble}): "
    + ", ".join(f"{k} {v:,.0f}" for k, v in summary.items() if v)
  )
  common.write_json(
    args.out,
    {
      "machine": common.machine_info(load_average_start=load_at_start),
      "args": vars(args),
      "ensemble_size": ensemble,
      "tlp_cost_model_config": dataclasses.asdict(tlp_config),
      "tlp_network_threads": network_threads,
      "xgb_train_records": len(prep.train_inputs),
      "xgb_fit_s": xgb_fit_s,
      "rows": rows,
      "summary": summary,
      "profile_tlp_steady_call": profile,
      "tlp_network": network,
    },
  )
  if profile:
    print(
      f"cProfile of one steady-state tlp call ({profile['states']} states): "
      + ", ".join(f"{k} {v:.3f} s" for k, v in profile["buckets_s"].items())
    )


if __name__ == "__main__":
  main()
