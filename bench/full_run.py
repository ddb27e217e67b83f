"""One full training run plus hold-out evaluation, timed: what `train.py` then `eval.py` do.

Trains ``--config`` into ``--workdir`` with ``tlp_jax.train.loop.train_and_evaluate`` (the code
behind ``train.py``), then evaluates every head's hardware on the test split (the hold-out
networks) with ``tlp_jax.evaluation.run.evaluate_model`` (the code behind ``eval.py``), for the
``best`` and ``latest`` checkpoints. Records wall times (data load, training, evaluation), the
top-k rows and the machine in one JSON.

  python -m bench.full_run --config configs/mtl.py --config.data_dir DIR --workdir /tmp/mtl \
      --out bench/results/full_run_mtl_<device>.json
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from bench import common
from data_pipelines import loader
from tlp_jax.evaluation import report as report_lib
from tlp_jax.evaluation import run as eval_run
from tlp_jax.train import loop, runtime

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Training workdir (must be new or from the same run).")
flags.DEFINE_string("out", None, "Results JSON.")
flags.DEFINE_list("ks", ["1", "5", "10", "20"], "k values of top-k.")
flags.mark_flags_as_required(["config", "workdir", "out"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = FLAGS.config
  runtime.apply_config(config)  # before JAX starts a backend
  ks = [int(k) for k in FLAGS.ks]
  wall: dict = {"eval": {}}
  with common.timed(wall, "load_arrays"):
    dataset = loader.load_arrays(config.data_dir, config.dataset)
  with common.timed(wall, "train_and_evaluate"):
    result = loop.train_and_evaluate(config, FLAGS.workdir, dataset=dataset)

  evals = {}
  for hw in result.hardware:
    for which in ("best", "latest"):
      key = f"{hw}/{which}"
      with common.timed(wall["eval"], key):
        report = eval_run.evaluate_model(
          hw=hw,
          data_dir=config.data_dir,
          dataset=config.dataset,
          workdir=FLAGS.workdir,
          which=which,
          ks=ks,
        )
      evals[key] = {
        "rows": report["rows"],
        "model": report["model"],
        "num_programs": report["num_programs"],
        "networks": report["networks"],
      }
      print(f"== {hw} ({which} checkpoint)\n{report_lib.format_report(report)}", flush=True)

  common.write_json(
    FLAGS.out,
    {
      "what": "full training run (train_and_evaluate) + eval on the hold-out networks",
      **common.device_info(),
      "config": config.to_dict(),
      "num_train_records": int(dataset.train.features.shape[0]),
      "hardware": list(result.hardware),
      "wall_s": wall,
      "final_validation": result.validation,
      "eval": evals,
    },
  )


if __name__ == "__main__":
  app.run(main)
