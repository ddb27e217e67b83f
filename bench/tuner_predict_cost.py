"""What one ``TLPCostModel.predict`` costs inside Ansor, for each feature version (needs TVM).

For a few hold-out tasks of the sample (their compute DAGs come from its
``network_info/all_tasks.pkl``), Ansor's ``SketchPolicy`` samples a population of states, and
each model scores the whole population once with a fresh prediction cache, timed:

* ``tlp``: a model of TLP's step features (25 x 22), one network;
* ``loop``: a model of the "loop" version (35 x 186, ``configs/loopnest.py``), one network,
  which also extracts every state's loop-nest vectors with TVM;
* ``tlp_ensN`` / ``loop_ensN``: the same with ``configs/default.py``'s ensemble of N networks;
* ``store_features_only``: that extraction alone (``loop_features.store_features_from_states``),
  which is also what Ansor's XGBModel computes before every prediction.

The models are randomly initialised at the default dimensions (timing does not depend on the
weights' values). Prints a table and writes ``bench/results/tuner_predict_cost.json`` with
machine info.

    python -m bench.tuner_predict_cost [--states 512] [--tasks 3] [--repeats 3]
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import tempfile
import time

os.environ.setdefault("TOPHUB_LOCATION", "NONE")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (JAX_PLATFORMS above must be set first)
import numpy as np  # noqa: E402

from bench import common  # noqa: E402
from configs import default  # noqa: E402
from configs import loopnest  # noqa: E402
from tlp_jax.core import features  # noqa: E402
from tlp_jax.core import network_info  # noqa: E402
from tlp_jax.core import predictor  # noqa: E402
from tlp_jax.core import tenset  # noqa: E402
from tlp_jax.train import config as config_lib  # noqa: E402
from tlp_jax.train import export  # noqa: E402
from tlp_jax.train import model as model_lib  # noqa: E402
from tlp_jax.tvm import cost_model  # noqa: E402
from tlp_jax.tvm import loop_features  # noqa: E402
from tlp_jax.tvm import search_tasks  # noqa: E402
from tlp_jax.tvm import tvm_import  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _export(tmp: str, config_module: str, loop_stores: int, loop_dim: int,
            ensemble_size: int) -> str:
  config = importlib.import_module(f"configs.{config_module}").get_config()
  cfg = config_lib.from_config_dict(config).model
  # The model input of a dataset with these loop-nest tokens, as the trainer sizes it.
  crop = predictor.input_shape((cfg.seq_len, cfg.feature_dim), (loop_stores, loop_dim))
  cfg = dataclasses.replace(cfg, seq_len=crop[0], feature_dim=crop[1], num_hardware_heads=1,
                            ensemble_size=ensemble_size)
  params = model_lib.TLPModel(cfg).init(jax.random.PRNGKey(0),
                                        np.zeros((1,) + crop, np.float32))["params"]
  path = os.path.join(tmp, f"{config_module}_ens{ensemble_size}.npz")
  export.save_npz(path, params, cfg, hardware=["hw"], platform="llvm", crop=crop,
                  vocab_json=features.Vocabulary.original("llvm").to_json(), step=0,
                  loop_stores=loop_stores, loop_dim=loop_dim)
  return path


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tenset_dir", default=os.path.join(REPO, "data", "sample", "tenset-mini"))
  parser.add_argument("--states", type=int, default=512)
  parser.add_argument("--tasks", type=int, default=3)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", default=os.path.join(REPO, "bench", "results",
                                                    "tuner_predict_cost.json"))
  args = parser.parse_args()

  # TVM only past the flags, so --help works without it.
  tvm_import.require_tvm()
  from tvm import auto_scheduler

  tasks = {t.workload_key: t for t in search_tasks.load_search_tasks(
      tenset.all_tasks_path(args.tenset_dir))}
  nets = network_info.load_network_infos(args.tenset_dir)
  held = network_info.select_holdout(nets, network_info.default_holdout(nets))
  chosen = []
  for net in held:  # heaviest tasks of each hold-out network first, round-robin
    for t in sorted(net.tasks, key=lambda t: -np.nan_to_num(t.flop_ct) * t.weight):
      if t.workload_key in tasks and t.workload_key not in chosen:
        chosen.append(t.workload_key)
        break
  chosen = chosen[:args.tasks]

  with tempfile.TemporaryDirectory() as tmp:
    members = int(default.get_config().model.ensemble_size)
    models = {}
    for size, suffix in ((1, ""), (members, f"_ens{members}")):
      models["tlp" + suffix] = _export(tmp, "default", 0, 0, size)
      models["loop" + suffix] = _export(tmp, "loopnest", loopnest.LOOP_STORES, loopnest.LOOP_DIM,
                                        size)
    rows = []
    for wk in chosen:
      task = tasks[wk]
      policy = auto_scheduler.SketchPolicy(
          task, params={"evolutionary_search_population": args.states}, seed=0, verbose=0)
      states = list(policy.sample_initial_population())[:args.states]
      row = {"workload_key": wk, "states": len(states)}
      for name, path in models.items():
        times = []
        for _ in range(args.repeats):
          model = cost_model.TLPCostModel.from_npz(path)  # fresh cache each time
          t0 = time.perf_counter()
          model.predict(task, states)
          times.append(time.perf_counter() - t0)
        row[f"{name}_s"] = min(times)
      row["store_features_only_s"] = common.best_time(
          lambda task=task, states=states: loop_features.store_features_from_states(
              task, states, loopnest.LOOP_STORES),
          args.repeats, warmup=False)
      rows.append(row)
      timed = ", ".join(f"{k[:-2]} {v:.3f} s" for k, v in row.items() if k.endswith("_s"))
      print(f"{wk[:60]}: {len(states)} states: {timed}")

  total = {k: float(sum(r[k] for r in rows)) for k in rows[0] if k.endswith("_s")}
  n = int(sum(r["states"] for r in rows))
  summary = {f"{k[:-2]}_states_per_s": n / v for k, v in total.items() if v > 0}
  print(f"states/s over {n} states: " + ", ".join(f"{k} {v:,.0f}" for k, v in summary.items()))
  common.write_json(args.out, {"machine": common.machine_info(), "args": vars(args),
                               "rows": rows, "summary": summary})


if __name__ == "__main__":
  main()
