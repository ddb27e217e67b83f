"""Trains a TLP / MTL-TLP cost model.

    python train.py --config configs/default.py --workdir /tmp/tlp [--config.FIELD=VALUE ...]

Re-running the same command resumes from the workdir's latest checkpoint. See docs/TRAINING.md.
"""

import logging as py_logging

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from tlp_jax.train import config as config_lib
from tlp_jax.train import loop, runtime

FLAGS = flags.FLAGS

flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard events and metadata.")
config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


class _QuietCheckpointing(py_logging.Filter):
  """Drops Orbax's per-save INFO chatter (it logs every thread of every save); keeps warnings."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    return record.levelno >= py_logging.WARNING or "/orbax/" not in record.pathname


def _distributed_args(cfg) -> dict:
  """The explicitly set fields of ``config.distributed`` (the rest is auto-detected by JAX)."""
  args = {}
  if cfg.coordinator_address:
    args["coordinator_address"] = cfg.coordinator_address
  if cfg.num_processes > 0:
    args["num_processes"] = cfg.num_processes
  if cfg.process_id >= 0:
    args["process_id"] = cfg.process_id
  return args


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = config_lib.from_config_dict(FLAGS.config)  # fails on a misspelled field
  logging.get_absl_handler().addFilter(_QuietCheckpointing())
  # Importing JAX starts no backend; these two must run before anything does.
  runtime.apply_config(config)
  if config.distributed.enabled:
    jax.distributed.initialize(**_distributed_args(config.distributed))
  logging.info(
    "JAX process %d/%d, local devices: %s",
    jax.process_index(),
    jax.process_count(),
    jax.local_devices(),
  )
  loop.train_and_evaluate(config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
