"""Copies a small, deterministic subset of a TenSet-layout directory (the embedded sample).

Keeps TenSet's exact layout and copies files byte for byte:

* ``network_info/*.json`` for every network (not ``*.task.pkl``);
* ``network_info/all_tasks.pkl`` cut down to the sampled tasks, when the source has one and TVM
  is installed (the TVM tests, the skeleton extractor and the XGBoost baseline replay records
  with it). Read with
  ``tlp_jax.tvm.search_tasks``'s restricted unpickler, written back as the same pickled list of
  ``SearchTask``;
* ``network_info/skeletons.json`` cut down to the sampled tasks, when a skeleton collection is
  found (``--skeletons``, default the source's ``network_info/skeletons.json``; no TVM needed):
  the loop tokens of the sample are built from it;
* ``measure_records/HW/*.json`` of every task of the hold-out networks, on every hardware that
  measured it (so evaluation covers all hold-out networks);
* plus training tasks, round-robin over the non-hold-out networks (each network's tasks in
  SHA-1-of-workload-key order, tasks measured on every hardware first), until the byte budget is
  spent. ``to_measure_programs`` is skipped: its programs are the records' programs again.

Usage::

  python -m data_pipelines.make_sample --tenset_dir /work/shared/tenset-mini \
      --out_dir data/sample/tenset-mini
"""

from __future__ import annotations

import hashlib
import itertools
import os
import pickle
import shutil
from collections.abc import Sequence

from absl import app, flags, logging

from tlp_jax.core import network_info as network_info_lib
from tlp_jax.core import records, tenset
from tlp_jax.core import skeleton as skeleton_lib


def record_file_workload_key(path: str) -> str | None:
  """Workload key of a measure-record file (its first well-formed record), None if none."""
  first = records.first_record(path)
  return first.workload_key if first is not None else None


def _sha1(text: str) -> str:
  return hashlib.sha1(text.encode()).hexdigest()


def plan_sample(
  tenset_dir: str, holdout: Sequence[str] | None = None, budget_bytes: int = 3_700_000
) -> dict[str, list[str]]:
  """Chooses the record files to copy: ``{hardware: [file names]}`` (deterministic)."""
  nets = network_info_lib.load_network_infos(tenset_dir)
  holdout = holdout or network_info_lib.default_holdout(nets)
  held = network_info_lib.select_holdout(nets, holdout)
  held_keys = network_info_lib.holdout_workload_keys(held)

  root = tenset.measure_records_dir(tenset_dir)
  hardware = tenset.hardware_folders(tenset_dir)
  # workload key -> {hw: file name}
  files: dict[str, dict[str, str]] = {}
  for hw in hardware:
    for path in tenset.task_files(tenset_dir, hw):
      wk = record_file_workload_key(path)
      if wk is not None:
        files.setdefault(wk, {})[hw] = os.path.basename(path)

  def size(wk):
    return sum(os.path.getsize(os.path.join(root, hw, n)) for hw, n in files[wk].items())

  used = sum(os.path.getsize(n.path) for n in nets)
  chosen = [wk for wk in sorted(files) if wk in held_keys]
  used += sum(size(wk) for wk in chosen)
  if used > budget_bytes:
    raise ValueError(f"hold-out tasks alone take {used} bytes > budget {budget_bytes}")

  # Round-robin over training networks so the sample mixes operator kinds.
  queues = []
  for net in nets:
    if net in held:
      continue
    keys = [
      t.workload_key
      for t in net.tasks
      if t.workload_key in files and t.workload_key not in held_keys
    ]
    keys.sort(key=lambda wk: (-len(files[wk]), _sha1(wk)))
    queues.append(keys)
  taken = set(chosen)
  for wk in itertools.chain.from_iterable(itertools.zip_longest(*queues)):
    if wk is None or wk in taken:
      continue
    if used + size(wk) > budget_bytes:
      continue
    taken.add(wk)
    chosen.append(wk)
    used += size(wk)
  plan = {hw: sorted(files[wk][hw] for wk in chosen if hw in files[wk]) for hw in hardware}
  logging.info(
    "sample: %d tasks (%d hold-out), %d bytes",
    len(chosen),
    sum(wk in held_keys for wk in chosen),
    used,
  )
  return plan


def make_sample(
  tenset_dir: str,
  out_dir: str,
  holdout: Sequence[str] | None = None,
  budget_bytes: int = 3_700_000,
  skeletons: str | None = None,
) -> dict[str, list[str]]:
  """Writes the sample into ``out_dir`` (replacing it) and returns the plan.

  ``skeletons``: skeleton collection of the source's tasks (default: the source's
  ``network_info/skeletons.json`` if it exists); its sampled tasks go to the sample.
  """
  plan = plan_sample(tenset_dir, holdout, budget_bytes)
  if os.path.exists(out_dir):
    shutil.rmtree(out_dir)
  os.makedirs(os.path.join(out_dir, tenset.NETWORK_INFO_DIR))
  for net in network_info_lib.load_network_infos(tenset_dir):
    shutil.copyfile(
      net.path, os.path.join(out_dir, tenset.NETWORK_INFO_DIR, os.path.basename(net.path))
    )
  for hw, names in plan.items():
    os.makedirs(tenset.measure_records_dir(out_dir, hw))
    for name in names:
      shutil.copyfile(
        os.path.join(tenset.measure_records_dir(tenset_dir, hw), name),
        os.path.join(tenset.measure_records_dir(out_dir, hw), name),
      )
  keys = set()
  for hw, names in plan.items():
    for name in names:
      keys.add(
        record_file_workload_key(os.path.join(tenset.measure_records_dir(out_dir, hw), name))
      )
  keys.discard(None)
  skeletons = skeletons or skeleton_lib.tenset_skeletons_path(tenset_dir)
  if os.path.isfile(skeletons):
    have = skeleton_lib.load_collection(skeletons)
    missing = sorted(keys - set(have))
    if missing:
      raise ValueError(
        f"{skeletons}: no skeleton for {len(missing)} sampled workloads, e.g. {missing[0]}"
      )
    skeleton_lib.save_collection(
      skeleton_lib.tenset_skeletons_path(out_dir), {k: have[k] for k in keys}
    )
    logging.info("sample: %d skeletons in %s", len(keys), skeleton_lib.TENSET_SKELETONS_FILE)
  src_tasks = tenset.all_tasks_path(tenset_dir)
  if os.path.isfile(src_tasks):
    try:
      n = write_task_subset(src_tasks, keys, tenset.all_tasks_path(out_dir))
      logging.info("sample: %d tasks in %s", n, tenset.ALL_TASKS_FILE)
    except ImportError:
      logging.warning(
        "TVM not installed: the sample gets no %s (loop features need it)", tenset.ALL_TASKS_FILE
      )
  return plan


def write_task_subset(src: str, workload_keys: set[str], dst: str) -> int:
  """Writes the ``SearchTask`` entries of ``src`` whose workload key is wanted; returns how many.

  Raises:
    ValueError: some wanted workload has no task in ``src``.
  """
  # Needs TVM (an optional extra); the rest of the sample does not.
  from tlp_jax.tvm import search_tasks

  tasks = [t for t in search_tasks.load_search_tasks(src) if t.workload_key in workload_keys]
  missing = workload_keys - {t.workload_key for t in tasks}
  if missing:
    raise ValueError(
      f"{src}: no task for {len(missing)} sampled workloads, e.g. {sorted(missing)[0]}"
    )
  tasks.sort(key=lambda t: t.workload_key)
  with open(dst, "wb") as f:
    pickle.dump(tasks, f)
  return len(tasks)


def main(argv: Sequence[str]) -> None:
  del argv
  fv = flags.FLAGS
  plan = make_sample(
    fv.tenset_dir, fv.out_dir, fv.holdout or None, fv.budget_bytes, fv.skeletons or None
  )
  for hw, names in plan.items():
    print(f"{hw}: {len(names)} task files")


if __name__ == "__main__":
  flags.DEFINE_string("tenset_dir", None, "TenSet-layout source directory.", required=True)
  flags.DEFINE_string("out_dir", "data/sample/tenset-mini", "Where to write the sample.")
  flags.DEFINE_list("holdout", [], "Hold-out specs NAME[@SIZE]; default by dataset.")
  flags.DEFINE_integer("budget_bytes", 3_700_000, "Byte budget for the copied files.")
  flags.DEFINE_string(
    "skeletons",
    "",
    "Skeleton collection of the source (default: "
    "TENSET_DIR/network_info/skeletons.json if it exists).",
  )
  app.run(main)
