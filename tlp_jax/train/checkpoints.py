"""Orbax checkpoints of a training run and the JSON files that tie a workdir to one run.

``workdir/checkpoints/latest`` holds the last ``checkpoints_to_keep`` states (every
``checkpoint_every_steps`` and at each validated epoch end), ``workdir/checkpoints/best`` the one
with the lowest target-head validation loss. Each checkpoint carries JSON metadata: the run's
identity, the data order state (epoch, step in epoch) and the validation metrics, so a restarted
run resumes exactly where it was and refuses a checkpoint of another run; a streamed run's
latest checkpoints also hold the grain iterator's state of every process (``DATA_ITEM``).
``workdir/model_config.json`` and ``dataset_meta.json`` describe the model for export; a second
run in the same workdir must match them, and so must its training config
(``train_config.json``) except for the fields ``config.RUNTIME_FIELDS`` names, or those of
``config.OVERRIDABLE_FIELDS`` changed on purpose, which ``train_config_history.json`` records. A
model of loop tokens also keeps a copy of the dataset's skeletons (``skeletons.json``), which its
export embeds.

Re-running always resumes: saves a kill interrupted (Orbax's ``*.orbax-checkpoint-tmp*``
folders) are removed, and a latest checkpoint that cannot be read is moved to
``checkpoints/unreadable/`` and the run resumes from the newest readable one, with a warning.
Orbax's per-save INFO and WARNING lines are silenced for every user of this module (errors stay).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from tlp_jax.core import atomic_file
from tlp_jax.train import config as config_lib
from tlp_jax.train.step import TrainState

MODEL_CONFIG_FILE = "model_config.json"
DATASET_META_FILE = "dataset_meta.json"
TRAIN_CONFIG_FILE = "train_config.json"
TRAIN_CONFIG_HISTORY_FILE = "train_config_history.json"
SKELETONS_FILE = "skeletons.json"
CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"
BEST = "best"
UNREADABLE = "unreadable"  # checkpoints that failed to restore, moved out of the managers' way
# Orbax writes a checkpoint into "<step>.orbax-checkpoint-tmp-<time>" and renames it when done.
TMP_MARKER = ".orbax-checkpoint-tmp"
# The checkpoint item holding the grain input iterator's state (data_placement="stream").
DATA_ITEM = "data"


class CheckpointError(RuntimeError):
  """A checkpoint in the workdir cannot be used (corrupted, or from an incompatible run)."""


class UnreadableCheckpointError(CheckpointError):
  """Restoring a checkpoint failed in Orbax (truncated or corrupted files)."""


class _QuietOrbax(logging.Filter):
  """Drops Orbax's INFO and WARNING records (it logs every thread of every save and restore,
  and warns about things that are normal here, e.g. restoring without sharding); keeps errors."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR or "/orbax/" not in record.pathname


_QUIET_ORBAX = _QuietOrbax()


def silence_orbax_logs() -> None:
  """Silences Orbax's INFO/WARNING log lines (idempotent). Orbax logs through absl, i.e. the
  ``absl`` Python logger; the filter sits on that logger, so it works with any handler."""
  logger = logging.getLogger("absl")
  if _QUIET_ORBAX not in logger.filters:
    logger.addFilter(_QUIET_ORBAX)


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
  silence_orbax_logs()
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
  manager: ocp.CheckpointManager,
  state: TrainState,
  meta: Mapping[str, Any],
  data_iterator: Any = None,
) -> None:
  """Saves an (unreplicated) state and its JSON metadata at ``state.step``.

  ``data_iterator``: a grain iterator (``data_placement="stream"``) whose state is saved too, as
  item ``DATA_ITEM``, one JSON file per process; it must have yielded exactly the batches of the
  steps before ``state.step``.
  """
  step = int(jax.device_get(state.step))
  if step in manager.all_steps():
    return
  items = dict(
    state=ocp.args.StandardSave(_state_to_tree(state)), meta=ocp.args.JsonSave(dict(meta))
  )
  if data_iterator is not None:
    import grain  # only the streamed path needs grain; importing it registers its Orbax handler

    items[DATA_ITEM] = grain.checkpoint.CheckpointSave(data_iterator)
  manager.save(step, args=ocp.args.Composite(**items))


def restore_data_iterator(manager: ocp.CheckpointManager, step: int, iterator: Any) -> str | None:
  """Sets a fresh grain ``iterator`` to the state saved with checkpoint ``step``.

  Returns None when restored, else why not (the checkpoint has no saved input state: it was
  written by another data placement, or by another number of processes); the caller then
  starts its pipeline at ``step`` instead. An iterator that failed to restore must not be used.
  """
  import grain

  path = os.path.join(str(manager.directory), str(step), DATA_ITEM)
  name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
  if not os.path.isfile(os.path.join(path, name)):
    return f"{path} has no {name}"
  manager.restore(
    step, args=ocp.args.Composite(**{DATA_ITEM: grain.checkpoint.CheckpointRestore(iterator)})
  )
  return None


def remove_interrupted_saves(workdir: str) -> list[str]:
  """Removes the temporary folders of saves that a kill interrupted; returns their paths.

  Orbax writes each checkpoint into ``<step>.orbax-checkpoint-tmp-<time>`` and renames it to
  ``<step>`` once complete, so such a folder is never a checkpoint and holds nothing to resume
  from. Call it on one process only, before any manager of the workdir saves.
  """
  root = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
  removed = []
  for which in (LATEST, BEST):
    directory = os.path.join(root, which)
    if not os.path.isdir(directory):
      continue
    for entry in sorted(os.listdir(directory)):
      if TMP_MARKER in entry:
        path = os.path.join(directory, entry)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        removed.append(path)
  for path in removed:
    logging.warning("removed %s: a checkpoint save that was interrupted (never complete)", path)
  return removed


def restore_newest_readable(
  manager: ocp.CheckpointManager, template: TrainState, workdir: str, move: bool = True
) -> tuple[TrainState, dict[str, Any]]:
  """Restores the newest checkpoint of ``manager`` that can be read.

  A checkpoint Orbax cannot restore (truncated or corrupted files) is moved to
  ``workdir/checkpoints/unreadable/`` (nothing is deleted, and the run can save that step
  again) with a warning, and the next older one is tried. ``move=False`` (processes other than
  the first, which moves them) only skips it. In a multi-process run every process then waits
  for the others before the managers re-read their directory.

  Raises:
    CheckpointError: no checkpoint can be restored although the directory has entries (never a
      silent fresh start), or one does not fit ``template`` (another model).
  """
  directory = str(manager.directory)
  steps = sorted(manager.all_steps(), reverse=True)
  if not steps:
    return restore_checkpoint(manager, template)  # raises, naming the entries it found
  failures = []
  for step in steps:
    try:
      state, meta = restore_checkpoint(manager, template, step)
    except UnreadableCheckpointError as e:
      failures.append(str(e))
      moved = _move_unreadable(workdir, directory, step) if move else "checkpoints/unreadable"
      logging.warning("%s; moved it to %s and trying the previous checkpoint", e, moved)
      continue
    if failures:
      _reload(manager)  # it still lists the moved steps
      logging.warning(
        "resuming from step %d of %s: the newer checkpoint(s) could not be read", step, directory
      )
    return state, meta
  _reload(manager)
  raise CheckpointError(
    f"no checkpoint in {directory} can be restored ({'; '.join(failures)}); they were moved to "
    f"{os.path.join(os.path.dirname(directory), UNREADABLE)}. Refusing to start over existing "
    "work: use another workdir to start fresh"
  )


def _reload(manager: ocp.CheckpointManager) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("tlp_jax.checkpoints.moved_unreadable")
  manager.reload()


def _move_unreadable(workdir: str, directory: str, step: int) -> str:
  dest_dir = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR, UNREADABLE)
  os.makedirs(dest_dir, exist_ok=True)
  stamp = time.strftime("%Y%m%dT%H%M%S")
  dest = os.path.join(dest_dir, f"{os.path.basename(directory)}-{step}-{stamp}")
  os.replace(os.path.join(directory, str(step)), dest)
  return dest


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
    raise UnreadableCheckpointError(
      f"cannot restore checkpoint {path}: {type(e).__name__}: {e}"
    ) from e
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
  """Writes ``obj`` as JSON to ``path`` atomically (:mod:`tlp_jax.core.atomic_file`)."""
  atomic_file.write_atomically(
    path, lambda f: json.dump(obj, f, indent=1, sort_keys=True, default=str)
  )


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


def reconcile_train_config(
  workdir: str, config: Mapping[str, Any], allow_changes: Sequence[str] = (), write: bool = True
) -> dict[str, tuple[Any, Any]]:
  """Checks a (re)run's training config against the one recorded in ``workdir``.

  A new workdir records ``config`` (``train_config.json``). A workdir that holds a run accepts
  the same config (``config.RUNTIME_FIELDS`` may differ) and, for the fields named in
  ``allow_changes`` (all of ``config.OVERRIDABLE_FIELDS``), a changed value; a field that only
  one of the two configs has (another version of the code) is accepted too. The new config is
  then recorded and the change appended to ``train_config_history.json``, with a warning. The
  file is never replaced silently. ``write=False`` only checks (processes other than the first,
  or a check before the run's other guards).

  Args:
    workdir: the run's workdir.
    config: ``TrainConfig.to_dict()``.
    allow_changes: dotted field names the user explicitly allows to change.
    write: whether this process writes the workdir's files.

  Returns:
    ``{field: (recorded, now)}`` of the allowed changes made (empty for a plain resume).

  Raises:
    CheckpointError: a field differs that is not allowed to (all of them named, with both
      values), or ``allow_changes`` names a field that cannot be changed.
  """
  bad = sorted(set(allow_changes) - config_lib.OVERRIDABLE_FIELDS)
  if bad:
    raise CheckpointError(
      f"these fields cannot be changed on a resumed run: {bad}; the ones that can are "
      f"{sorted(config_lib.OVERRIDABLE_FIELDS)}"
    )
  config = json.loads(json.dumps(config, default=str))
  path = os.path.join(workdir, TRAIN_CONFIG_FILE)
  history_path = os.path.join(workdir, TRAIN_CONFIG_HISTORY_FILE)
  now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
  if not os.path.exists(path):
    if write:
      write_json(path, config)
      write_json(history_path, [{"time": now, "event": "created"}])
    return {}
  recorded = read_json(path)
  changes = config_lib.config_changes(recorded, config)
  # A field that only one side has comes from another version of the code (added since the run
  # started, or removed), not from the user: accepted, with a warning, and recorded.
  old_fields, new_fields = set(config_lib.flatten(recorded)), set(config_lib.flatten(config))
  versioned = {k for k in changes if (k in old_fields) != (k in new_fields)}
  # A field added since the run started (config.ADDED_FIELDS) had, in effect, its "before"
  # value: only another value changes the run.
  for name, before in config_lib.ADDED_FIELDS.items():
    if name in versioned and name in new_fields and changes[name][1] != before:
      versioned.discard(name)
      changes[name] = (before, changes[name][1])
  refused = {k: v for k, v in changes.items() if k not in set(allow_changes) | versioned}
  if refused:
    listed = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in refused.items())
    hint = (
      f"; or, to change them on purpose, pass --allow_config_change={','.join(refused)}"
      if set(refused) <= config_lib.OVERRIDABLE_FIELDS
      else ""
    )
    raise CheckpointError(
      f"{workdir} holds a run with other settings ({listed}) (recorded in {path}). Rerun "
      f"with the recorded settings to resume it, or use another --workdir for a new run{hint}"
    )
  if changes and write:
    history = read_json(history_path) if os.path.exists(history_path) else []
    history.append(
      {"time": now, "event": "changed", "changes": {k: list(v) for k, v in changes.items()}}
    )
    write_json(history_path, history)
    write_json(path, config)
  if changes and write:
    logging.warning(
      "resuming %s with changed settings (allowed, or fields of another code version): %s "
      "(recorded in %s)",
      workdir,
      ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items()),
      history_path,
    )
  return changes


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
  with open(skeletons_path, "rb") as src:
    atomic_file.write_atomically(
      os.path.join(workdir, SKELETONS_FILE), lambda f: shutil.copyfileobj(src, f), binary=True
    )


def read_skeletons_json(workdir: str) -> str | None:
  """The workdir's copy of the dataset's skeletons (JSON text), or None when it has none."""
  path = os.path.join(workdir, SKELETONS_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return f.read()


def open_for_reading(workdir: str, which: str) -> ocp.CheckpointManager:
  """A read-only manager of the workdir's ``which`` (``BEST`` or ``LATEST``) checkpoints."""
  silence_orbax_logs()
  directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR, which)
  if not os.path.isdir(directory):
    raise CheckpointError(f"no {which} checkpoints in {directory}")
  return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True))
