"""Read + label + featurize throughput on TenSet-layout measure records, one process.

Compares, on the same files:
  * ``fast``: ``tlp_jax.core.records.read_task_file`` (text fast path, cached step rows), one
    featurizer shared by all files of a platform (all hardware folders), as the dataset builder
    uses it; it starts cold (empty cache) in every repeat;
  * ``full_parse``: the same reader with ``fast=False`` (json.loads of every line, every step
    featurized from scratch): the reference the fast path is tested against;
  * ``original_loop``: a faithful re-implementation of the original TLP extraction loop
    (json.loads per line, ``features.original_tlp_features``, mean/min/score per file), without
    TVM's RecordReader, which the original also runs (and which makes it slower still).

Prints a table and writes ``bench/results/featurize_throughput.json``.

  python -m bench.featurize_throughput [--tenset_dir /work/shared/tenset-mini] [--repeats 5]
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import time

import numpy as np
from absl import app, flags

from bench import common
from tlp_jax.core import features as features_lib
from tlp_jax.core import records as records_lib
from tlp_jax.core import tenset

_TENSET_DIR = flags.DEFINE_string(
  "tenset_dir", "/work/shared/tenset-mini", "TenSet-layout root holding measure_records/."
)
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repeats per method (best and median kept).")
_OUT = flags.DEFINE_string(
  "out",
  os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "featurize_throughput.json"),
  "Where to write the JSON results.",
)


def _platform_of_folder(files: list[str]) -> str:
  return features_lib.platform_of_target(records_lib.first_record(files[0]).target)


def read_all(groups: dict[str, list[str]], fast: bool = True) -> tuple[int, records_lib.ReadStats]:
  """Reads every file with one featurizer per platform, shared by its hardware folders (as
  the dataset builder does); returns the number of records kept and the read statistics."""
  kept = 0
  stats = records_lib.ReadStats()
  featurizers: dict[str, features_lib.Featurizer] = {}
  for files in groups.values():
    plat = _platform_of_folder(files)
    featurizer = featurizers.setdefault(plat, features_lib.Featurizer(plat))
    for path in files:
      task = records_lib.read_task_file(path, featurizer=featurizer, fast=fast)
      kept += len(task)
      stats += task.stats
  return kept, stats


def run_fast(groups: dict[str, list[str]], fast: bool = True) -> int:
  """``read_all``'s number of records kept (what the timed methods return)."""
  return read_all(groups, fast)[0]


def run_original(groups: dict[str, list[str]]) -> int:
  """The original per-file loop (labels over all records, as the original does)."""
  kept = 0
  for files in groups.values():
    plat = _platform_of_folder(files)
    for path in files:
      with open(path) as f:
        lines = f.read().strip().split("\n")
      line_vecs = []
      min_cost = 1000000
      for line in lines:
        inp = json.loads(line)
        step_vecs = features_lib.original_tlp_features(inp["i"][1][1], plat)
        cost = np.mean(inp["r"][0])
        line_vecs.append((step_vecs, cost))
        min_cost = min(min_cost, cost)
      out = [(vecs, min_cost / cost, min_cost) for vecs, cost in line_vecs]
      kept += len(out)
  return kept


def _time(fn, groups, repeats: int) -> dict:
  walls, cpus, n = [], [], 0
  for _ in range(repeats):
    w0, c0 = time.perf_counter(), time.process_time()
    n = fn(groups)
    walls.append(time.perf_counter() - w0)
    cpus.append(time.process_time() - c0)
  return {"records_out": n, "wall_s": walls, "cpu_s": cpus}


def main(argv):
  del argv
  groups = {
    hw: tenset.task_files(_TENSET_DIR.value, hw)
    for hw in tenset.hardware_folders(_TENSET_DIR.value)
  }
  groups = {hw: files for hw, files in groups.items() if files}
  num_files = sum(len(f) for f in groups.values())
  num_lines = 0
  num_bytes = 0
  for files in groups.values():
    for path in files:
      with open(path, "rb") as f:
        data = f.read()
      num_bytes += len(data)
      num_lines += data.count(b"\n") + (0 if data.endswith(b"\n") or not data else 1)

  _, read_stats = read_all(groups)
  read_stats.examples = read_stats.examples[:5]

  load_at_start = os.getloadavg()[0]
  methods = {
    "fast": run_fast,
    "full_parse": lambda g: run_fast(g, fast=False),
    "original_loop": run_original,
  }
  results = {}
  for name, fn in methods.items():
    results[name] = _time(fn, groups, _REPEATS.value)
    for key in ("wall_s", "cpu_s"):
      vals = results[name][key]
      results[name][f"records_per_s_{key[:-2]}_best"] = num_lines / min(vals)
      results[name][f"records_per_s_{key[:-2]}_median"] = num_lines / statistics.median(vals)

  base = results["original_loop"]["records_per_s_cpu_best"]
  print(
    f"{num_lines} records ({num_files} files, {num_bytes / 1e6:.1f} MB) in "
    f"{_TENSET_DIR.value}, {_REPEATS.value} repeats, one process"
  )
  print(
    f"{'method':<15}{'rec/s (cpu, best)':>19}{'rec/s (cpu, median)':>21}"
    f"{'rec/s (wall, best)':>20}{'x original':>12}"
  )
  for name, r in results.items():
    print(
      f"{name:<15}{r['records_per_s_cpu_best']:>19,.0f}"
      f"{r['records_per_s_cpu_median']:>21,.0f}{r['records_per_s_wall_best']:>20,.0f}"
      f"{r['records_per_s_cpu_best'] / base:>12.1f}"
    )

  report = {
    "benchmark": "featurize_throughput",
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "data": {
      "tenset_dir": _TENSET_DIR.value,
      "hardware": list(groups),
      "files": num_files,
      "records": num_lines,
      "bytes": num_bytes,
    },
    "machine": common.machine_info(
      load_avg_1m_at_start=load_at_start, load_avg_1m_at_end=os.getloadavg()[0]
    ),
    "note": (
      "records/s counts input lines (kept + failed + malformed) per second of one "
      "process; cpu = process_time, wall = perf_counter; the machine may be shared, "
      "so cpu time is the steadier measure."
    ),
    "read_stats": read_stats.to_dict(),
    "repeats": _REPEATS.value,
    "results": results,
  }
  common.write_json(_OUT.value, report)


if __name__ == "__main__":
  app.run(main)
