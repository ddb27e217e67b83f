r"""TenSet's pickled TVM ``SearchTask`` files, read with a restricted unpickler (needs TVM).

Records hold only workload keys; TVM needs each workload's compute DAG registered to replay a
record's steps (loop-nest features, the XGBoost baseline). TenSet ships them as pickles:

* ``network_info/all_tasks.pkl``: a list of every ``SearchTask`` (:func:`load_search_tasks`,
  :func:`register_tenset_tasks`);
* ``network_info/((NAME,[(SHAPE)]),TARGET).task.pkl``: one network's ``(tasks, weights)``, which
  :func:`convert_pickles` turns once into the JSON network info the rest of the project reads
  (``python -m tlp_jax.tvm.search_tasks convert --tenset_dir DIR --allow_pickle``).

These files are the user's own TenSet download, so they are trusted, but they are still read
with an unpickler that constructs only the handful of TVM classes a ``SearchTask`` pickle
contains (:data:`_ALLOWED_PICKLE_GLOBALS`), so a tampered file cannot run arbitrary code.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import re
import sys
from collections.abc import Sequence

from absl import app, flags

from tlp_jax.core import atomic_file, network_info, tenset
from tlp_jax.tvm import tvm_import

# (module, name) pairs a pickled list of auto-scheduler SearchTasks needs, and nothing else.
_ALLOWED_PICKLE_GLOBALS = frozenset(
  {
    ("tvm.runtime.object", "Object"),
    ("tvm.runtime.object", "_new_object"),
    ("tvm.runtime.container", "String"),
    ("tvm.ir.container", "Array"),
    ("tvm.target.target", "Target"),
    ("tvm.auto_scheduler.search_task", "SearchTask"),
    ("tvm.auto_scheduler.search_task", "HardwareParams"),
    ("tvm.auto_scheduler.compute_dag", "ComputeDAG"),
  }
)

_PKL_NAME = re.compile(
  r"^\(\((?P<name>[^,()\[\]]+),\[\((?P<shape>[0-9, ]+)\)\]\),(?P<target>.+)\)\.task\.pkl$"
)


class SearchTaskFileError(ValueError):
  """A file is not a readable TVM SearchTask pickle (the message names it and says why)."""


class _SearchTaskUnpickler(pickle.Unpickler):
  """Constructs only the TVM classes of a SearchTask pickle; anything else is refused."""

  def find_class(self, module, name):
    if (module, name) not in _ALLOWED_PICKLE_GLOBALS:
      raise pickle.UnpicklingError(
        f"refusing to load {module}.{name}: not part of a TVM SearchTask pickle"
      )
    return super().find_class(module, name)


def _unpickle(path: str):
  """The object pickled in ``path`` (restricted unpickler).

  Raises:
    SearchTaskFileError: unreadable, truncated, corrupt, or refused by the restricted
      unpickler; one line naming the file and the reason.
  """
  tvm_import.require_tvm()  # registers the SearchTask / ComputeDAG pickle hooks
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise SearchTaskFileError(f"{path}: cannot read: {e.strerror or e}") from None
  try:
    return _SearchTaskUnpickler(io.BytesIO(data)).load()
  except Exception as e:  # noqa: BLE001  corrupt bytes can fail anywhere in unpickling/TVM
    reason = (str(e).splitlines() or [""])[0][:300]
    raise SearchTaskFileError(
      f"{path}: not a readable TVM SearchTask pickle ({type(e).__name__}: {reason})"
    ) from None


def _check_search_tasks(path: str, tasks) -> None:
  from tvm import auto_scheduler

  for t in tasks:
    if not isinstance(t, auto_scheduler.SearchTask):
      raise SearchTaskFileError(f"{path}: expected SearchTask entries, got {type(t).__name__}")


def load_search_tasks(path: str) -> list:
  """Loads a pickled list of ``SearchTask`` (``all_tasks.pkl``); registers every workload.

  Raises:
    SearchTaskFileError: the file is no readable pickled list of SearchTask (one line).
  """
  tasks = _unpickle(path)
  if not isinstance(tasks, list):
    raise SearchTaskFileError(
      f"{path}: expected a pickled list of SearchTask, got {type(tasks).__name__}"
    )
  _check_search_tasks(path, tasks)
  from tvm import auto_scheduler

  for t in tasks:
    # Unpickling registers the DAG only for unseen keys; re-register so the file always wins.
    auto_scheduler.workload_registry.register_workload_tensors(
      t.workload_key, t.compute_dag.tensors
    )
  return tasks


def register_tenset_tasks(tenset_dir: str) -> int:
  """Registers every workload of ``TENSET/network_info/all_tasks.pkl``; returns the count.

  Raises:
    FileNotFoundError: the directory has no ``all_tasks.pkl``.
  """
  path = tenset.all_tasks_path(tenset_dir)
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"{path}: not found. Replaying records with TVM (loop-nest features, the XGBoost "
      f"baseline) needs the compute DAG of every workload; TenSet ships them in "
      f"{tenset.ALL_TASKS_FILE}"
    )
  return len(load_search_tasks(path))


def network_info_from_pickle(path: str) -> network_info.NetworkInfo:
  """Reads one TenSet ``*.task.pkl`` (a pickled ``(tasks, weights)`` pair) as network info."""
  m = _PKL_NAME.match(os.path.basename(path))
  if not m:
    raise network_info.NetworkInfoError(f"{path}: name is not ((NAME,[(SHAPE)]),TARGET).task.pkl")
  loaded = _unpickle(path)
  try:
    search_tasks, weights = loaded
    num_tasks, num_weights = len(search_tasks), len(weights)
  except (TypeError, ValueError):
    raise network_info.NetworkInfoError(
      f"{path}: expected a pickled (tasks, weights) pair"
    ) from None
  if not num_tasks:
    raise network_info.NetworkInfoError(f"{path}: no tasks (a network has at least one)")
  if num_tasks != num_weights:
    raise network_info.NetworkInfoError(f"{path}: {num_tasks} tasks but {num_weights} weights")
  _check_search_tasks(path, search_tasks)
  shape = [int(s) for s in m.group("shape").split(",")]
  merged: dict[str, network_info.NetworkTask] = {}
  for task, weight in zip(search_tasks, weights):
    wk = str(task.workload_key)
    flop_ct = float(task.compute_dag.flop_ct)
    prev = merged.get(wk)
    # A network can list one workload under two descs; its occurrences add up.
    merged[wk] = network_info.NetworkTask(
      wk,
      int(weight) + (prev.weight if prev else 0),
      flop_ct if math.isfinite(flop_ct) else float("nan"),
      prev.desc if prev else str(getattr(task, "desc", "")),
    )
  return network_info.NetworkInfo(
    name=m.group("name"),
    batch_size=shape[0],
    input_size=shape[-1],
    tasks=tuple(merged.values()),
    target=m.group("target").split()[0],
    path=path,
  )


def convert_pickles(
  tenset_dir: str, allow_pickle: bool = False, overwrite: bool = False
) -> list[str]:
  """Converts every ``network_info/*.task.pkl`` of a TenSet dir to the JSON form, once.

  Args:
    tenset_dir: TenSet root.
    allow_pickle: must be True: the explicit opt-in to reading pickles.
    overwrite: replace JSON files that already exist.

  Returns:
    The JSON paths written.
  """
  if not allow_pickle:
    raise network_info.NetworkInfoError(
      "refusing to unpickle TenSet network info without allow_pickle=True (--allow_pickle)"
    )
  folder = os.path.join(tenset_dir, tenset.NETWORK_INFO_DIR)
  pkls = sorted(n for n in os.listdir(folder) if n.endswith(".task.pkl"))
  if not pkls:
    raise network_info.NetworkInfoError(f"{folder}: no *.task.pkl files to convert")
  written = []
  for name in pkls:
    net = network_info_from_pickle(os.path.join(folder, name))
    out = os.path.join(folder, network_info.json_file_name(net))
    if os.path.exists(out) and not overwrite:
      continue
    doc = net.to_json_dict()
    atomic_file.write_atomically(out, lambda f, doc=doc: json.dump(doc, f, indent=1))
    written.append(out)
  return written


def main(argv: Sequence[str]) -> None:
  """``convert``: TenSet's pickled network info to the JSON form."""
  if len(argv) != 2 or argv[1] != "convert":
    raise app.UsageError(
      "usage: python -m tlp_jax.tvm.search_tasks convert "
      "--tenset_dir DIR --allow_pickle [--overwrite]"
    )
  fv = flags.FLAGS
  try:
    written = convert_pickles(fv.tenset_dir, fv.allow_pickle, fv.overwrite)
  except (OSError, ImportError, SearchTaskFileError, network_info.NetworkInfoError) as e:
    sys.exit(f"error: {e}")
  for path in written:
    print(f"wrote {path}")


if __name__ == "__main__":
  flags.DEFINE_string("tenset_dir", None, "TenSet root directory.", required=True)
  flags.DEFINE_bool(
    "allow_pickle",
    False,
    "Allow reading TenSet *.task.pkl (restricted to TVM's SearchTask classes).",
  )
  flags.DEFINE_bool("overwrite", False, "Replace existing JSON files.")
  app.run(main)
