"""TenSet's directory layout: the one place that knows its folder and file names (NumPy only).

A TenSet(-layout) directory::

    network_info/            one JSON file per network configuration (tlp_jax.core.network_info)
      all_tasks.pkl          pickled TVM SearchTasks of every workload (tlp_jax.tvm.search_tasks)
    to_measure_programs/     sampled programs before measurement (tlp_jax.tvm.collect)
    measure_records/
      <hardware>/            one measure-record file per task (tlp_jax.core.records)
        ([WORKLOAD_KEY,...],llvm).json
"""

from __future__ import annotations

import os

MEASURE_RECORDS_DIR = "measure_records"
NETWORK_INFO_DIR = "network_info"
TO_MEASURE_DIR = "to_measure_programs"
ALL_TASKS_FILE = os.path.join(NETWORK_INFO_DIR, "all_tasks.pkl")
RECORD_SUFFIX = ".json"


class TensetLayoutError(FileNotFoundError):
  """A folder the TenSet layout requires is missing or empty (the message says which)."""


def measure_records_dir(tenset_dir: str, hardware: str | None = None) -> str:
  """``TENSET/measure_records`` or, with ``hardware``, ``TENSET/measure_records/<hardware>``."""
  root = os.path.join(tenset_dir, MEASURE_RECORDS_DIR)
  return root if hardware is None else os.path.join(root, hardware)


def all_tasks_path(tenset_dir: str) -> str:
  """``TENSET/network_info/all_tasks.pkl``."""
  return os.path.join(tenset_dir, ALL_TASKS_FILE)


def hardware_folders(tenset_dir: str) -> list[str]:
  """Sorted hardware folder names under ``measure_records/``.

  Raises:
    TensetLayoutError: no ``measure_records`` folder, or no hardware folder in it.
  """
  root = measure_records_dir(tenset_dir)
  if not os.path.isdir(root):
    raise TensetLayoutError(f"{root}: no measure_records folder (is {tenset_dir} a TenSet dir?)")
  found = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
  if not found:
    raise TensetLayoutError(f"{root}: no hardware folders")
  return found


def task_files(tenset_dir: str, hardware: str) -> list[str]:
  """Paths of the measure-record files of one hardware, sorted by file name.

  Hidden files are left out: they are the staging files of an interrupted collection
  (``tlp_jax.tvm.collect`` writes ``.<name>.staging.*`` files through
  :mod:`tlp_jax.core.atomic_file` and renames them when complete).

  Raises:
    TensetLayoutError: no such hardware folder (the message lists the available ones).
  """
  folder = measure_records_dir(tenset_dir, hardware)
  if not os.path.isdir(folder):
    raise TensetLayoutError(
      f"{folder}: no such hardware folder; available: {', '.join(hardware_folders(tenset_dir))}"
    )
  return [
    os.path.join(folder, n)
    for n in sorted(os.listdir(folder))
    if n.endswith(RECORD_SUFFIX) and not n.startswith(".")
  ]


def clean_name(x) -> str:
  """TenSet's ``clean_name``: ``str(x)`` without spaces and quotes."""
  return str(x).replace(" ", "").replace('"', "").replace("'", "")


def record_filename(workload_key: str, target_kind: str = "llvm") -> str:
  """TenSet's measure-record / to-measure file name of a task (no folder)."""
  return clean_name((workload_key, target_kind)) + RECORD_SUFFIX
