"""Orbax checkpoints of a training run and the JSON files that tie a workdir to one run.

``workdir/checkpoints/latest`` holds the last ``checkpoints_to_keep`` states (every
``checkpoint_every_steps`` and at each validated epoch end), ``workdir/checkpoints/best`` the one
with the lowest target-head validation loss. Each checkpoint carries JSON metadata: the run's
identity, the data order state (epoch, step in epoch) and the validation metrics, so a restarted
run resumes exactly where it was and refuses a checkpoint of another run.
``workdir/model_config.json`` and ``dataset_meta.json`` describe the model for export; a second
run in the same workdir must match them. A model of loop tokens also keeps a copy of the
dataset's skeletons (``skeletons.json``), which its export embeds.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from tlp_jax.train.step import TrainState

MODEL_CONFIG_FILE = "model_config.json"
DATASET_META_FILE = "dataset_meta.json"
TRAIN_CONFIG_FILE = "train_config.json"
SKELETONS_FILE = "skeletons.json"
CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"
BEST = "best"


class CheckpointError(RuntimeError):
  """A checkpoint in the workdir cannot be used (corrupted, or from an incompatible run)."""


def _state_to_tree(state: TrainState) -> dict[str, Any]:
  return {
    "step": state.step,
    "params": state.params,
    "opt_state": state.opt_state,
    "rng": state.rng,
  }


def checkpoint_managers(
  workdir: str, keep: int
) -> tuple[ocp.CheckpointManager, ocp.CheckpointManager]:
  """``(latest, best)`` Orbax managers under ``workdir/checkpoints``."""
  root = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
  latest = ocp.CheckpointManager(
    os.path.join(root, LATEST),
    options=ocp.CheckpointManagerOptions(max_to_keep=max(int(keep), 1), create=True),
  )
  best = ocp.CheckpointManager(
    os.path.join(root, BEST), options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True)
  )
  return latest, best


def save_checkpoint(
  manager: ocp.CheckpointManager, state: TrainState, meta: Mapping[str, Any]
) -> None:
  """Saves an (unreplicated) state and its JSON metadata at ``state.step``."""
  step = int(jax.device_get(state.step))
  if step in manager.all_steps():
    return
  manager.save(
    step,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave(_state_to_tree(state)), meta=ocp.args.JsonSave(dict(meta))
    ),
  )


def step_entries(directory: str) -> list[str]:
  """Entries of a manager's directory that look like (possibly partial) checkpoints."""
  if not os.path.isdir(directory):
    return []
  return [e for e in os.listdir(directory) if not e.startswith(".") and e != "_CHECKPOINT_METADATA"]


def restore_checkpoint(
  manager: ocp.CheckpointManager, template: TrainState | None, step: int | None = None
) -> tuple[Any, dict[str, Any]]:
  """Restores ``(state, meta)`` of ``step`` (default: latest); ``template`` gives the structure.

  With ``template=None`` the raw tree (nested dicts of NumPy arrays) is returned.

  Raises:
    CheckpointError: naming the directory, when there is no readable checkpoint although the
      directory has entries, or when restoring fails (corrupted or incompatible checkpoint).
  """
  directory = str(manager.directory)
  if step is None:
    step = manager.latest_step()
  if step is None:
    entries = step_entries(directory)
    if entries:
      raise CheckpointError(
        f"checkpoint directory {directory} has entries {sorted(entries)[:5]} but no complete "
        "checkpoint; refusing to start over existing work (move the directory away to start "
        "fresh)"
      )
    raise CheckpointError(f"no checkpoint in {directory}")
  path = os.path.join(directory, str(step))
  try:
    if template is None:
      state_args = ocp.args.StandardRestore()
    else:
      target = jax.tree_util.tree_map(
        lambda x: np.zeros(np.shape(x), np.asarray(x).dtype), _state_to_tree(template)
      )
      state_args = ocp.args.StandardRestore(target)
    restored = manager.restore(
      step, args=ocp.args.Composite(state=state_args, meta=ocp.args.JsonRestore())
    )
    tree, meta = restored["state"], restored["meta"]
  except Exception as e:  # Orbax raises many types; all mean the same thing here.
    raise CheckpointError(f"cannot restore checkpoint {path}: {type(e).__name__}: {e}") from e
  if template is None:
    return tree, dict(meta)
  _check_same_structure(template, tree, path)
  state = TrainState(
    step=jnp.asarray(tree["step"], jnp.int32),
    params=tree["params"],
    opt_state=tree["opt_state"],
    rng=jnp.asarray(tree["rng"]),
  )
  return state, dict(meta)


def _check_same_structure(template: TrainState, tree: Mapping[str, Any], path: str) -> None:
  want = jax.tree_util.tree_map(
    lambda x: (np.shape(x), np.asarray(x).dtype.name), _state_to_tree(template)
  )
  got = jax.tree_util.tree_map(lambda x: (np.shape(x), np.asarray(x).dtype.name), dict(tree))
  if jax.tree_util.tree_structure(want) != jax.tree_util.tree_structure(got) or (
    jax.tree_util.tree_leaves(want) != jax.tree_util.tree_leaves(got)
  ):
    raise CheckpointError(
      f"checkpoint {path} does not match this run's model/optimizer "
      "(different parameter shapes or optimizer state)"
    )


def write_json(path: str, obj: Any) -> None:
  """Writes ``obj`` as JSON to ``path`` atomically."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, sort_keys=True, default=str)
  os.replace(tmp, path)


def read_json(path: str) -> Any:
  """Reads a workdir JSON file; ``CheckpointError`` when it is not valid JSON."""
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise CheckpointError(f"{path}: not valid JSON ({e})") from e


def check_or_write_json(path: str, obj: Any, what: str, write: bool) -> None:
  """Writes ``obj`` to ``path``, or checks it equals what an earlier run wrote there."""
  obj = json.loads(json.dumps(obj, sort_keys=True, default=str))
  if os.path.exists(path):
    old = read_json(path)
    if old != obj:
      diff = sorted(k for k in set(old) | set(obj) if old.get(k) != obj.get(k))
      raise CheckpointError(
        f"{path}: this workdir holds a run with a different {what} "
        f"(differs in {diff}); use another workdir to start a new run"
      )
    return
  if write:
    write_json(path, obj)


def copy_skeletons(skeletons_path: str | None, workdir: str) -> None:
  """Copies the dataset's skeleton collection into ``workdir`` (atomically), for the export.

  Without one (``None``: a dataset passed in memory) the export embeds no skeletons and its
  predictor needs a skeleton per call to featurize raw steps; a warning says so.
  """
  if not skeletons_path:
    logging.warning(
      "the dataset has loop tokens but no skeletons file: the exported model will "
      "not embed skeletons (Predictor.predict_steps then needs skeleton=...)"
    )
    return
  dest = os.path.join(workdir, SKELETONS_FILE)
  tmp = dest + ".tmp"
  shutil.copyfile(skeletons_path, tmp)
  os.replace(tmp, dest)


def read_skeletons_json(workdir: str) -> str | None:
  """The workdir's copy of the dataset's skeletons (JSON text), or None when it has none."""
  path = os.path.join(workdir, SKELETONS_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return f.read()


def open_for_reading(workdir: str, which: str) -> ocp.CheckpointManager:
  """A read-only manager of the workdir's ``which`` (``BEST`` or ``LATEST``) checkpoints."""
  directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR, which)
  if not os.path.isdir(directory):
    raise CheckpointError(f"no {which} checkpoints in {directory}")
  return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True))
