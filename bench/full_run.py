"""One full training run plus hold-out evaluation, timed: what `train.py` then `eval.py` do.

Trains ``--config`` into ``--workdir`` with ``train_lib.train_and_evaluate`` (the code behind
``train.py``), then evaluates every head's hardware on the test split (the hold-out networks)
with ``eval_lib.run`` (the code behind ``eval.py``), for the ``best`` and ``latest`` checkpoints.
Records wall times (data load, training, evaluation), the top-k rows and the machine in one JSON.

  python bench/full_run.py --config configs/mtl.py --config.data_dir DIR --workdir /tmp/mtl \
      --out bench/results/full_run_mtl_<device>.json
"""
from __future__ import annotations

import os
import sys
import time

from absl import app
from absl import flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import machine_info    # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training configuration file.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Training workdir (must be new or from the same run).")
flags.DEFINE_string("out", None, "Results JSON.")
flags.DEFINE_list("ks", ["1", "5", "10", "20"], "k values of top-k.")
flags.mark_flags_as_required(["config", "workdir", "out"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from tlp_jax.train import runtime  # pylint: disable=g-import-not-at-top
  config = FLAGS.config
  runtime.apply_config(config)  # before JAX starts a backend
  import jax  # pylint: disable=g-import-not-at-top
  from tlp_jax.evaluation import eval_lib  # pylint: disable=g-import-not-at-top
  from data_pipelines import loader  # pylint: disable=g-import-not-at-top
  from tlp_jax.train import train_lib  # pylint: disable=g-import-not-at-top
  ks = [int(k) for k in FLAGS.ks]

  t0 = time.perf_counter()
  dataset = loader.load_arrays(config.data_dir, config.dataset)
  load_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  result = train_lib.train_and_evaluate(config, FLAGS.workdir, dataset=dataset)
  train_s = time.perf_counter() - t0

  evals = {}
  eval_s = {}
  for hw in result.hardware:
    for which in ("best", "latest"):
      t0 = time.perf_counter()
      report = eval_lib.run(hw=hw, data_dir=config.data_dir, dataset=config.dataset,
                            workdir=FLAGS.workdir, which=which, ks=ks)
      eval_s[f"{hw}/{which}"] = time.perf_counter() - t0
      evals[f"{hw}/{which}"] = {"rows": report["rows"], "model": report["model"],
                                "num_programs": report["num_programs"],
                                "networks": report["networks"]}
      print(f"== {hw} ({which} checkpoint)\n{eval_lib.format_report(report)}", flush=True)

  devices = jax.devices()
  machine_info.write_json(FLAGS.out, {
      "what": "full training run (train_lib.train_and_evaluate) + eval on the hold-out networks",
      "device": devices[0].device_kind, "num_devices": len(devices),
      "backend": jax.default_backend(), "jax": jax.__version__,
      "date": time.strftime("%Y-%m-%d %H:%M:%S"), "host": machine_info.machine_info(),
      "config": config.to_dict(), "num_train_records": int(dataset.train.features.shape[0]),
      "hardware": list(result.hardware),
      "wall_s": {"load_arrays": load_s, "train_and_evaluate": train_s, "eval": eval_s},
      "final_validation": result.validation, "eval": evals})


if __name__ == "__main__":
  app.run(main)
