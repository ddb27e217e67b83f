"""Starter weights: the models that ship in ``tlp_jax/pretrained/`` (docs/MODELS.md).

Each starter model is a shipped config trained on *every* record of a built dataset: the
train, validation and test splits are joined into the training set (the hold-out networks
included, no validation), so a user gets a model that has seen all the data. Its final
parameters are exported, weights as float16 by default (half the file; scores within about
1e-3 relative of float32's), to ``OUT_DIR/NAME.npz``:

* ``epyc-9004``: ``configs/default.py`` on the ``epyc-9004`` config;
* ``xeon-emr-16c``: ``configs/default.py`` on the ``xeon-emr-16c`` config;
* ``mtl``: ``configs/mtl.py`` (heads xeon-emr-16c, epyc-9004) on the joined ``all`` config.

An all-data model has no test split left, so its accuracy is measured on its *twin*: the same
config, seed and data build, trained on the standard split (hold-out networks excluded) and
scored on validation and on the hold-out networks' test split. ``--twin_dir`` trains the twins
too, scores them and exports them (float32) as ``TWIN_DIR/NAME_no_holdout.npz``: the models for
experiments that must not have seen the hold-out networks (tuning them, for one).

Reproduce the shipped files (a GPU takes about a minute; deterministic GPU kernels, seed 0)::

  python -m tlp_jax.tvm.skeleton_extract --tenset_dir ../shared/tenset-mini --out skeletons.json
  python -m data_pipelines.build --tenset_dir ../shared/tenset-mini --data_dir DATA \\
      --validation by_task --loop_tokens on --skeletons skeletons.json
  python -m bench.make_starter_weights --data_dir DATA --out_dir tlp_jax/pretrained \\
      --twin_dir models --json bench/results/starter_weights.json

The JSON records the device, each model's data, steps, wall time, file size and SHA-256, the
float16 export's largest score change against float32, and the twins' top-k.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib
import os
import tempfile

import numpy as np

from bench import accuracy_sweep, common
from data_pipelines import loader
from tlp_jax.core import atomic_file
from tlp_jax.core import loop_tokens as loop_tokens_lib
from tlp_jax.core import predictor as npred
from tlp_jax.evaluation.data import eval_data
from tlp_jax.train import config as config_lib
from tlp_jax.train import data as train_data
from tlp_jax.train import export, loop, runtime

# name -> (config module, overrides, target head). The name is the file stem users load with
# tlp_jax.core.pretrained.load(NAME) / --load_model pretrained:NAME.
STARTERS = {
  "epyc-9004": ("default", {"dataset": "epyc-9004", "hardware": ("epyc-9004",)}, "epyc-9004"),
  "xeon-emr-16c": (
    "default",
    {"dataset": "xeon-emr-16c", "hardware": ("xeon-emr-16c",)},
    "xeon-emr-16c",
  ),
  "mtl": ("mtl", {}, "xeon-emr-16c"),
}
WEIGHTS_DTYPES = ("float16", "float32")


def starter_config(name: str, data_dir: str, seed: int, extra: dict | None = None):
  """The starter's ConfigDict: its config module and overrides (then ``extra``, dotted keys),
  validated and saved only at the end (no validation split to check against)."""
  module, overrides, _ = STARTERS[name]
  config = importlib.import_module(f"configs.{module}").get_config()
  config.data_dir = data_dir
  for key, value in {**overrides, **(extra or {})}.items():
    node = config
    *path, leaf = key.split(".")
    for p in path:
      node = node[p]
    node[leaf] = value
  config.seed = seed
  config.eval_every_epochs = int(config.num_epochs)
  config.checkpoint_every_steps = 0
  config.log_every_steps = 10_000
  return config


def all_in_train(arrays):
  """``arrays`` with every record of every split in ``train`` and empty validation / test."""
  splits = [arrays.train, arrays.validation, arrays.test]
  fields = {}
  for f in dataclasses.fields(arrays.train):
    parts = [getattr(s, f.name) for s in splits]
    fields[f.name] = None if parts[0] is None else np.concatenate([np.asarray(p) for p in parts])
  train = type(arrays.train)(**fields)
  empty = type(arrays.train)(**{k: (None if v is None else v[:0]) for k, v in fields.items()})
  return dataclasses.replace(arrays, train=train, validation=empty, test=empty)


def write_npz(path: str, arrays: dict[str, np.ndarray]) -> dict:
  """Writes ``arrays`` atomically, zip-compressed; its size and SHA-256.

  Compressed because the embedded skeleton JSON is a NumPy unicode array (4 bytes a character,
  1.6 MB for tenset-mini's tasks) that deflates about 20x; ``np.load`` (the predictor) reads
  both kinds of ``.npz``."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  atomic_file.write_atomically(path, lambda f: np.savez_compressed(f, **arrays), binary=True)
  with open(path, "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()
  return {"path": os.path.basename(path), "bytes": os.path.getsize(path), "sha256": digest}


def _model_input(features, tokens):
  return features if tokens is None else loop_tokens_lib.model_input(features, tokens)


def float16_change(arrays, params, model_config, half: dict[str, np.ndarray]) -> dict:
  """How much float16 weights move the scores, on every training program: the largest change
  relative to the scores' spread, and the share of tasks whose top-1 pick changes."""
  predict = export.make_predict_fn(model_config, 4096)
  x = _model_input(arrays.train.features, arrays.train.loop_tokens)
  full = predict(params, x)
  half_params = {
    k[len(npred.PARAMS_PREFIX) :]: v.astype(np.float32)
    for k, v in half.items()
    if k.startswith(npred.PARAMS_PREFIX)
  }
  tree: dict = {}
  for key, value in half_params.items():
    *parents, leaf = key.split("/")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  low = predict(tree, x)
  changed, tasks = 0, np.unique(arrays.train.task_index)
  for t in tasks:
    sel = np.flatnonzero(arrays.train.task_index == t)
    changed += int(np.any(np.argmax(full[sel], 0) != np.argmax(low[sel], 0)))
  return {
    "max_abs_change_over_score_std": float(np.max(np.abs(full - low)) / (np.std(full) + 1e-12)),
    "tasks_with_a_changed_top1_pick": changed,
    "tasks": int(tasks.size),
  }


def train_starter(
  name: str, data_dir: str, out_dir: str, seed: int, weights_dtype: str, extra: dict
) -> dict:
  """Trains one starter on all records and exports it to ``OUT_DIR/NAME.npz``."""
  config = starter_config(name, data_dir, seed, extra)
  arrays = all_in_train(loader.load_arrays(data_dir, config.dataset))
  with tempfile.TemporaryDirectory() as workdir:
    wall: dict = {}
    with common.timed(wall, "train"):
      result = loop.train_and_evaluate(config, workdir, dataset=arrays)
    params, model_config, meta = export.restore_for_export(workdir, "latest")
  full = export.export_params(params, model_config, **export.meta_kwargs(meta))
  half = export.cast_weights(full, weights_dtype)
  out = {
    "config": f"configs/{STARTERS[name][0]}.py",
    "overrides": {k: list(v) if isinstance(v, tuple) else v for k, v in STARTERS[name][1].items()},
    "dataset": config.dataset,
    "hardware": list(result.hardware),
    "records": int(arrays.train.features.shape[0]),
    "labels_per_head": np.asarray(arrays.train.mask).sum(axis=0).tolist(),
    "steps": int(result.state.step),
    "seed": seed,
    "train_wall_s": wall["train"],
    "weights_dtype": weights_dtype,
    "file": write_npz(os.path.join(out_dir, f"{name}.npz"), half),
  }
  if weights_dtype != "float32":
    out["float16_vs_float32"] = float16_change(arrays, params, model_config, half)
  return out


def train_twin(name: str, data_dir: str, twin_dir: str, seed: int, extra: dict) -> dict:
  """The starter's standard-split twin: validation and test top-k of its target head, exported
  (float32) to ``TWIN_DIR/NAME_no_holdout.npz``."""
  config = starter_config(name, data_dir, seed, extra)
  target = STARTERS[name][2]
  arrays = loader.load_arrays(data_dir, config.dataset)
  splits = {s: eval_data(arrays, target, s) for s in ("validation", "test")}
  with tempfile.TemporaryDirectory() as workdir:
    wall: dict = {}
    with common.timed(wall, "train"):
      result = loop.train_and_evaluate(config, workdir, dataset=arrays)
    params, model_config, meta = export.restore_for_export(workdir, "latest")
  head = list(result.hardware).index(target)
  predict = export.make_predict_fn(model_config, 4096)
  typed = config_lib.from_config_dict(config)
  tokens = (
    train_data.reads_loop_tokens(typed.loop_tokens, arrays)
    and train_data.loop_token_shape(arrays)[0] > 0
  )
  out = {"target": target, "train_wall_s": wall["train"], "steps": int(result.state.step)}
  for split, data in splits.items():
    out[split] = accuracy_sweep._scores(params, predict, head, data, tokens)[0]
  arrays_out = export.export_params(params, model_config, **export.meta_kwargs(meta))
  out["file"] = write_npz(os.path.join(twin_dir, f"{name}_no_holdout.npz"), arrays_out)
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir", required=True, help="a built dataset (all three configs)")
  parser.add_argument("--out_dir", default="tlp_jax/pretrained")
  parser.add_argument("--models", default=",".join(STARTERS), help="of " + ", ".join(STARTERS))
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--weights_dtype", default="float16", choices=WEIGHTS_DTYPES)
  parser.add_argument("--twin_dir", default=None, help="also train, score and export the twins")
  parser.add_argument("--json", default="bench/results/starter_weights.json")
  parser.add_argument(
    "--set",
    action="append",
    default=[],
    help="extra config override KEY=PYTHON_LITERAL (smoke runs: --set num_epochs=1)",
  )
  args = parser.parse_args()
  extra = common.parse_overrides(args.set)
  runtime.enable_deterministic_gpu_ops()  # before JAX starts a backend
  common.log_to_stderr()
  names = [n for n in args.models.split(",") if n]
  unknown = [n for n in names if n not in STARTERS]
  if unknown:
    raise SystemExit(f"unknown starter models {unknown}; known: {', '.join(STARTERS)}")
  results = {}
  for name in names:
    results[name] = train_starter(
      name, args.data_dir, args.out_dir, args.seed, args.weights_dtype, extra
    )
    if args.twin_dir:
      results[name]["twin"] = train_twin(name, args.data_dir, args.twin_dir, args.seed, extra)
    r = results[name]
    print(
      f"{name}: {r['records']} records, {r['steps']} steps, {r['train_wall_s']:.1f} s, "
      f"{r['file']['bytes'] / 1e6:.2f} MB -> {r['file']['path']}",
      flush=True,
    )
  total = sum(r["file"]["bytes"] for r in results.values())
  print(f"starter weights: {total / 1e6:.2f} MB in {len(results)} files")
  common.write_json(
    args.json, {**common.device_info(), "total_bytes": total, "models": results}, announce=True
  )


if __name__ == "__main__":
  main()
