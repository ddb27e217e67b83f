"""Do separate training processes agree bit for bit under a given ``XLA_FLAGS``? And how fast?

Trains the same config with the same seed in ``--processes`` fresh processes (``train.py``, one
after the other, no shared compilation cache) for each ``--settings`` entry, then compares the
latest checkpoints' parameters and reports the largest absolute difference and each process's
wall time. A setting is ``NAME=FLAGS`` with FLAGS the ``XLA_FLAGS`` of its processes
(``+`` separates flags, ``{dir}`` is replaced by a folder shared by the setting's processes,
e.g. for an autotune cache). The config's own ``deterministic_gpu_ops`` is turned off so the
setting's flags alone decide.

  python -m bench.gpu_determinism --data_dir DIR --out $OUT/det.json \
      --settings det=--xla_gpu_deterministic_ops=true \
      --settings excl=--xla_gpu_exclude_nondeterministic_ops=true
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

from bench import common

_DATA = flags.DEFINE_string("data_dir", None, "Built dataset dir.", required=True)
_DATASET = flags.DEFINE_string("dataset", "epyc-9004", "Dataset config.")
_CONFIG = flags.DEFINE_string("config", "configs/default.py", "Training config file.")
_EPOCHS = flags.DEFINE_integer("num_epochs", 10, "Epochs of each run.")
_PROCESSES = flags.DEFINE_integer("processes", 2, "Fresh processes per setting.")
_SETTINGS = flags.DEFINE_multi_string("settings", [], "NAME=XLA_FLAGS ('+' separates flags).")
_SET = flags.DEFINE_multi_string("set", [], "Extra --config.KEY=VALUE overrides (KEY=VALUE).")
_OUT = flags.DEFINE_string("out", None, "Results JSON.", required=True)

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _flatten(tree, prefix=""):
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f"{prefix}/{k}"))
    return out
  return {prefix: np.asarray(tree)}


# The children's environment; this process reads checkpoints on the CPU so that it holds no GPU
# memory while they train.
_CHILD_ENV = dict(os.environ)


def _train(workdir: str, xla_flags: str) -> float:
  env = dict(_CHILD_ENV, XLA_FLAGS=xla_flags, PYTHONUNBUFFERED="1")
  cmd = [
    sys.executable,
    os.path.join(_REPO, "train.py"),
    "--config",
    os.path.join(_REPO, _CONFIG.value),
    "--workdir",
    workdir,
    f"--config.data_dir={_DATA.value}",
    f"--config.dataset={_DATASET.value}",
    f"--config.num_epochs={_EPOCHS.value}",
    "--config.deterministic_gpu_ops=False",
  ] + [f"--config.{kv}" for kv in _SET.value]
  start = time.perf_counter()
  done = subprocess.run(cmd, cwd=_REPO, env=env, capture_output=True, text=True)
  wall = time.perf_counter() - start
  if done.returncode:
    raise RuntimeError(f"train.py failed ({done.returncode}): {done.stderr[-2000:]}")
  return wall


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  os.environ["JAX_PLATFORMS"] = "cpu"
  from tlp_jax.train import export  # after the switch to the CPU backend

  results = []
  for spec in _SETTINGS.value:
    name, sep, raw = spec.partition("=")
    if not sep:
      raise app.UsageError(f"--settings {spec!r}: expected NAME=XLA_FLAGS")
    shared = tempfile.mkdtemp(prefix=f"det_{name}_")
    xla_flags = raw.replace("+", " ").replace("{dir}", shared)
    walls, params = [], []
    for p in range(_PROCESSES.value):
      workdir = tempfile.mkdtemp(prefix=f"det_{name}_{p}_")
      walls.append(_train(workdir, xla_flags))
      tree, _, meta = export.restore_for_export(workdir, "latest")
      params.append(_flatten(tree))
    diffs = [
      max(float(np.max(np.abs(params[0][k] - other[k]))) for k in params[0]) for other in params[1:]
    ]
    row = {
      "setting": name,
      "xla_flags": xla_flags,
      "wall_s": walls,
      "max_abs_param_diff_vs_first": diffs,
      "identical": all(d == 0.0 for d in diffs),
      "steps": int(meta["step"]),
    }
    print(row, flush=True)
    results.append(row)
  common.write_json(
    _OUT.value,
    {
      "machine": common.machine_info(gpu=common.gpu_name()),
      "config": _CONFIG.value,
      "dataset": _DATASET.value,
      "num_epochs": _EPOCHS.value,
      "overrides": _SET.value,
      "results": results,
    },
  )


if __name__ == "__main__":
  app.run(main)
