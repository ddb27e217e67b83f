"""Trains a TLP / MTL-TLP cost model.

    python train.py --config configs/default.py --workdir /tmp/tlp --config.data_dir DATA \
        [--config.FIELD=VALUE ...] [--allow_config_change=num_epochs]

Re-running the same command resumes from the workdir's latest checkpoint; a rerun with other
settings is refused, except the fields named in --allow_config_change. See docs/TRAINING.md.
"""

import re

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from data_pipelines import loader
from tlp_jax.train import checkpoints, init_from, loop, runtime
from tlp_jax.train import config as config_lib

FLAGS = flags.FLAGS

flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard events and metadata.")
config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
flags.DEFINE_list(
  "allow_config_change",
  [],
  "Config fields a rerun may change in a workdir that holds a run (e.g. num_epochs, to extend "
  f"it); recorded in {checkpoints.TRAIN_CONFIG_HISTORY_FILE}. One of "
  f"{sorted(config_lib.OVERRIDABLE_FIELDS)}.",
)
flags.mark_flags_as_required(["config", "workdir"])

# Errors a user makes and fixes (a config field, the data dir, the workdir of another run):
# one line, no traceback.
_USER_ERRORS = (
  config_lib.ConfigError,
  loader.DatasetNotFoundError,
  checkpoints.CheckpointError,
  init_from.InitFromError,
)


def _fail(message: str) -> None:
  raise SystemExit(f"train.py: error: {message}")


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing; a ``--config.FIELD`` that the config lacks (a misspelling) is one line.

  ml_collections raises a KeyError/AttributeError (with a "did you mean") from inside the
  parser for those, which absl would print as a traceback.
  """
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
    text = str(e.args[0] if e.args else e).replace("\\", "")
    key = re.search(r"'([^']+)'", text)
    suggestion = re.search(r'Did you mean "([^"]+)"', text)
    flag = [a.split("=")[0] for a in argv[1:] if key and a.split("=")[0].endswith("." + key[1])]
    _fail(
      f"unknown config field {flag[0] if flag else (key[1] if key else text)}"
      + (f" (did you mean {suggestion[1]}?)" if suggestion else "")
      + "; configs/default.py lists every field"
    )


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
  try:
    config = config_lib.from_config_dict(FLAGS.config)  # fails on a misspelled field
  except config_lib.ConfigError as e:
    _fail(str(e))
  checkpoints.silence_orbax_logs()
  runtime.quiet_backend_probe_logs()
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
  try:
    loop.train_and_evaluate(config, FLAGS.workdir, allow_changes=FLAGS.allow_config_change)
  except _USER_ERRORS as e:
    _fail(str(e))


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
