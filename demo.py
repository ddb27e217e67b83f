"""The whole tlp-jax path on the embedded sample: build -> train -> eval -> export -> predict.

  python demo.py [--workdir demo_out] [--tenset_dir data/sample/tenset-mini] [--hw epyc-9004]

Builds the TFDS dataset from the TenSet-layout sample (with loop tokens, replayed from the
sample's committed ``network_info/skeletons.json``), trains the default recipe shortened
(``configs/demo.py``), evaluates top-k on the held-out networks, exports the weights to a ``.npz``
and ranks a few raw programs of a held-out task with the pure-NumPy predictor. Rerunning resumes
training from the workdir's checkpoints.
"""

import logging as py_logging
import os

from absl import app, flags, logging
from ml_collections import config_flags

from data_pipelines import loader, tenset_tfds
from tlp_jax.core import predictor as npred
from tlp_jax.core import records, tenset
from tlp_jax.train import runtime

_WORKDIR = flags.DEFINE_string("workdir", "demo_out", "Output folder.")
_TENSET_DIR = flags.DEFINE_string(
  "tenset_dir", "data/sample/tenset-mini", "TenSet-layout records (default: the embedded sample)."
)
_HW = flags.DEFINE_string("hw", "epyc-9004", "Hardware to train and evaluate on.")
_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "Training config.")


class _QuietLibraries(py_logging.Filter):
  """Keeps third-party INFO chatter (Orbax, TFDS) out of the demo's output."""

  def filter(self, record):
    return record.levelno >= py_logging.WARNING or "/tlp_jax/" in record.pathname


def _held_out_programs(tenset_dir: str, hw: str, workload_key: str, limit: int):
  """Raw step lists and cost labels (mean measured costs) of one task's first valid records."""
  for path in tenset.task_files(tenset_dir, hw):
    first = records.first_record(path)
    # Only the matching task's file is read whole.
    if first is None or first.workload_key != workload_key:
      continue
    valid = [r for r in records.iter_records(path) if r.failure is None][:limit]
    return [r.steps for r in valid], list(records.mean_costs([r.costs for r in valid]))
  return [], []


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  runtime.apply_config(_CONFIG.value)
  # The JAX side is imported only now: the config's XLA settings must be in the environment
  # before anything (even a module-level constant) starts a JAX backend.
  from tlp_jax.evaluation import data as eval_data
  from tlp_jax.evaluation import report as eval_report
  from tlp_jax.evaluation import run as eval_run
  from tlp_jax.train import export, loop

  workdir = os.path.abspath(_WORKDIR.value)
  data_dir = os.path.join(workdir, "data")
  print(f"[1/5] building the dataset from {_TENSET_DIR.value}")
  configs = tenset_tfds.make_configs(_TENSET_DIR.value, hardware=[_HW.value], multi=False)
  for meta in tenset_tfds.build(_TENSET_DIR.value, data_dir, configs):
    print(tenset_tfds.format_summary(meta))

  config = _CONFIG.value
  config.data_dir = data_dir
  config.dataset = _HW.value
  config.hardware = (_HW.value,)
  train_dir = os.path.join(workdir, "train")
  print(f"[2/5] training ({config.num_epochs} epochs, batch {config.batch_size}) in {train_dir}")
  result = loop.train_and_evaluate(config, train_dir)
  print("      last validation:", {k: round(v, 4) for k, v in result.validation.items()})

  print("[3/5] top-k on the held-out networks")
  report = eval_run.evaluate_model(hw=_HW.value, data_dir=data_dir, workdir=train_dir)
  paths = eval_report.write_report(report, os.path.join(workdir, "eval"))
  print(eval_report.format_report(report))
  print("      report:", ", ".join(paths.values()))

  model_path = os.path.join(workdir, "model.npz")
  print(f"[4/5] exporting to {model_path}")
  export.export_workdir(train_dir, model_path)

  print("[5/5] ranking raw programs of a held-out task with the pure-NumPy predictor")
  predictor = npred.Predictor.load(model_path)
  dataset = eval_data.eval_data(loader.load_arrays(data_dir, _HW.value), _HW.value, "test")
  task_key = dataset.task_keys[int(dataset.task_index[0])]
  steps, costs = _held_out_programs(_TENSET_DIR.value, _HW.value, task_key, limit=8)
  # A model of loop tokens replays each program over its task's skeleton, which the export
  # embeds (the dataset's tasks): name the task. A steps-only model needs no task.
  task = {"workload_key": task_key} if predictor.reads_loop_tokens else {}
  scores = predictor.predict_steps(steps, hw=_HW.value, **task)
  best = min(costs)
  print(f"      task {task_key[:70]}")
  print("      predicted rank | predicted score | measured cost / best")
  for rank, i in enumerate(sorted(range(len(steps)), key=lambda j: -scores[j]), start=1):
    print(f"      {rank:14d} | {scores[i]:15.4f} | {costs[i] / best:8.2f}x")


if __name__ == "__main__":
  app.run(main)
