r"""Host-side throughput on this (CPU-only) machine, aggregated from the per-stage benchmarks.

Runs, each in its own process (so one stage's memory and threads don't colour the next):

* ``bench.featurize_throughput`` -- TenSet records -> TLP features, records/s;
* ``bench.dataset_build`` -- TFDS dataset build, first (decode + cache) and cached array
  loads, examples/s (``--scale_records`` replicated records for a TenSet-scale build);
* ``bench.predictor_throughput`` -- the pure-NumPy predictor, programs/s;
* ``bench.input_throughput`` -- the training input path alone (no model step), samples/s: host
  placement's gather vs the grain stream at 0 / 2 / 4 / 8 worker processes;

then writes one summary ``bench/results/host-<cpu>-<N>core.json`` (the stage reports inside)
and prints a table. ``--reuse`` aggregates the stage JSONs already in ``--stage_dir`` instead of
running the stages again.

    python -m bench.host_throughput [--scale_records 200000] [--reuse]
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
from typing import Any

from absl import app, flags, logging

from bench import common
from tlp_jax.core import tenset

_BENCH = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_BENCH)
_RESULTS = os.path.join(_BENCH, "results")

_TENSET_DIR = flags.DEFINE_string("tenset_dir", "/work/shared/tenset-mini", "TenSet root.")
_SCALE = flags.DEFINE_integer(
  "scale_records", 200_000, "dataset_build.py --scale_records (0 = skip the scale run)."
)
_STAGE_DIR = flags.DEFINE_string("stage_dir", _RESULTS, "Where the stage JSONs are written/read.")
_OUT = flags.DEFINE_string("out", None, "Summary JSON (default results/host-<cpu>-<N>core.json).")
_REUSE = flags.DEFINE_bool("reuse", False, "Aggregate existing stage JSONs; run nothing.")
_TIMEOUT = flags.DEFINE_integer("stage_timeout_s", 3600, "Per-stage time limit.")
_INPUT_ROWS = flags.DEFINE_integer("input_rows", 200_000, "input_throughput.py --rows.")

STAGES = {  # name -> (module, its JSON, extra arguments builder)
  "featurize": (
    "bench.featurize_throughput",
    "featurize_throughput.json",
    lambda: ["--tenset_dir", _TENSET_DIR.value],
  ),
  "dataset_build": (
    "bench.dataset_build",
    "dataset_build.json",
    lambda: ["--tenset_dir", _TENSET_DIR.value, "--scale_records", str(_SCALE.value)],
  ),
  "predictor": (
    "bench.predictor_throughput",
    "predictor_throughput.json",
    lambda: ["--records", tenset.measure_records_dir(_TENSET_DIR.value, "epyc-9004")],
  ),
  "input": (
    "bench.input_throughput",
    "input_throughput.json",
    lambda: ["--rows", str(_INPUT_ROWS.value), "--devices", "1"],
  ),
}


def run_stage(name: str) -> dict[str, Any]:
  """Runs one stage script; returns its JSON plus wall time (or the error)."""
  module, out_name, extra = STAGES[name]
  out = os.path.join(_STAGE_DIR.value, out_name)
  cmd = [sys.executable, "-m", module, "--out", out] + extra()
  logging.info("running %s", " ".join(cmd))
  t0 = time.time()
  proc = subprocess.run(
    cmd, cwd=_REPO, capture_output=True, text=True, timeout=_TIMEOUT.value, check=False
  )
  wall = time.time() - t0
  if proc.returncode != 0:
    logging.error("%s failed (rc %d):\n%s", name, proc.returncode, proc.stderr[-3000:])
    return {"error": f"rc {proc.returncode}: {proc.stderr[-1000:]}", "wall_s": wall}
  return {"report": load_stage(name), "wall_s": wall}


def load_stage(name: str) -> dict[str, Any]:
  path = os.path.join(_STAGE_DIR.value, STAGES[name][1])
  with open(path) as f:
    return json.load(f)


def summarize(stages: dict[str, dict[str, Any]]) -> list[tuple[str, str, str]]:
  """(stage, quantity, value) rows of the headline numbers."""
  rows: list[tuple[str, str, str]] = []

  def rep(name):
    return stages.get(name, {}).get("report") or {}

  feat = rep("featurize").get("results", {})
  for method, r in feat.items():
    rows.append(
      (
        "featurize",
        f"{method} records/s (wall, best)",
        f"{r.get('records_per_s_wall_best', float('nan')):,.0f}",
      )
    )
  build = rep("dataset_build")
  if "tenset_mini_build" in build:
    b = build["tenset_mini_build"]
    n = sum(b.get("records_read", {}).values())
    rows.append(
      (
        "dataset_build",
        f"tenset-mini build, {len(b['configs'])} configs (s)",
        f"{b['seconds']:.1f} ({n / b['seconds']:,.0f} records/s)",
      )
    )
  for r in build.get("tenset_mini_load", []):
    rows.append(
      (
        "array_load",
        f"{r['config']}: first / cached full read (examples/s)",
        f"{r['first_load_examples_per_s']:,.0f} / {r['cached_full_read_examples_per_s']:,.0f}",
      )
    )
  if "scale_run" in build:
    s = build["scale_run"]
    rows.append(
      (
        "dataset_build",
        f"scale run {s['records']:,} replicated records",
        f"{s['build_records_per_s']:,.0f} records/s build; "
        f"{s['load']['first_load_examples_per_s']:,.0f} ex/s first load; "
        f"{s['load']['cached_full_read_examples_per_s']:,.0f} ex/s cached",
      )
    )
  for k, v in rep("predictor").get("programs_per_s", {}).items():
    rows.append(("numpy_predictor", f"{k} programs/s", f"{v:,.0f}"))
  for k, r in rep("input").get("results", {}).items():
    rows.append(("input_path", f"{k} samples/s (no step)", f"{r['samples_per_s']:,.0f}"))
  for name, st in stages.items():
    if "error" in st:
      rows.append((name, "ERROR", st["error"][:120].replace("\n", " ")))
  return rows


def main(argv):
  del argv
  stages: dict[str, dict[str, Any]] = {}
  load_start = os.getloadavg()[0]
  for name in STAGES:
    if _REUSE.value:
      try:
        stages[name] = {"report": load_stage(name)}
      except (OSError, json.JSONDecodeError) as e:
        stages[name] = {"error": f"cannot read stage JSON: {e}"}
    else:
      stages[name] = run_stage(name)
  rows = summarize(stages)
  cpu = common.cpu_model()
  ncpu = os.cpu_count() or 0
  out = _OUT.value or os.path.join(_RESULTS, f"host-{common.slug(cpu)}-{ncpu}core.json")
  summary = {
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "machine": common.machine_info(loadavg_1m_start=load_start, loadavg_1m_end=os.getloadavg()[0]),
    "note": "shared 2-core machine: other processes ran at the same time (see load averages "
    "in each stage's machine info); treat numbers as lower bounds",
    "reused_stage_json": _REUSE.value,
    "table": [list(r) for r in rows],
    "stages": stages,
  }
  common.write_json(out, summary, announce=False)
  width = max(len(r[1]) for r in rows) if rows else 10
  print(f"{'stage':<16} {'quantity':<{width}} value")
  for stage, what, value in rows:
    print(f"{stage:<16} {what:<{width}} {value}")
  print(f"wrote {out}")


if __name__ == "__main__":
  app.run(main)
