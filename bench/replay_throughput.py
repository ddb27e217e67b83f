r"""Throughput of the pure-Python loop-nest replay vs TVM's per-store extraction (issue 15).

Same records, same process, one core (TVM_NUM_THREADS=1): programs/s of
:func:`tlp_jax.core.replay.replay` (steps already parsed, and JSON line -> nest) and of
``tlp_jax.loop_features.store_features_from_lines`` (TVM lowers every program).

  TVM_NUM_THREADS=1 python bench/replay_throughput.py --tenset_dir data/sample/tenset-mini \
      --out bench/results/replay_throughput.json
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

os.environ.setdefault("TVM_NUM_THREADS", "1")
os.environ.setdefault("TOPHUB_LOCATION", "NONE")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tlp_jax.core import replay as rp  # noqa: E402
from tlp_jax.core import skeleton as sk  # noqa: E402


def _best_rate(fn, n, repeats):
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t)
  return n / best, best


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--tenset_dir", default="data/sample/tenset-mini")
  ap.add_argument("--max_records", type=int, default=4000)
  ap.add_argument("--tvm_records", type=int, default=1000)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--out", default="")
  args = ap.parse_args(argv)
  from bench import machine_info  # pylint: disable=import-outside-toplevel
  from bench import replay_fidelity  # pylint: disable=import-outside-toplevel
  from tlp_jax import loop_features  # pylint: disable=import-outside-toplevel

  t0 = time.perf_counter()
  _, skels = replay_fidelity.load_tasks_and_skeletons(args.tenset_dir)
  extract_s = time.perf_counter() - t0
  loop_features.register_tenset_tasks(args.tenset_dir)
  lines = []
  for f in sorted(glob.glob(os.path.join(args.tenset_dir, "measure_records", "*", "*.json"))):
    with open(f, "rb") as fh:
      lines += fh.readlines()
  # Interleave tasks (every k-th line) so a prefix is not one task.
  step = max(1, len(lines) // args.max_records)
  lines = lines[::step][:args.max_records]
  parsed = []
  for ln in lines:
    rec = json.loads(ln)
    parsed.append((skels[rec["i"][0][0]], rec["i"][1][1]))
  # Fresh skeleton objects: the first pass pays the per-task caches, as a real run would.
  cold = [(sk.Skeleton.from_json(s.to_json()), st) for s, st in parsed]
  t = time.perf_counter()
  for s, st in cold:
    rp.replay(s, st)
  cold_rate = len(cold) / (time.perf_counter() - t)

  def run_replay():
    for s, st in parsed:
      rp.replay(s, st)

  def run_lines():
    for ln in lines:
      rp.replay_record_line(skels, ln)

  replay_rate, _ = _best_rate(run_replay, len(parsed), args.repeats)
  line_rate, _ = _best_rate(run_lines, len(lines), args.repeats)
  tvm_lines = lines[:args.tvm_records]
  tvm_rate, _ = _best_rate(lambda: loop_features.store_features_from_lines(tvm_lines, 16),
                           len(tvm_lines), 1)
  res = {
      "tenset_dir": args.tenset_dir, "records": len(lines),
      "replay_programs_per_s": replay_rate,
      "replay_from_json_line_programs_per_s": line_rate,
      "replay_first_pass_programs_per_s": cold_rate,
      "tvm_store_features_programs_per_s": tvm_rate, "tvm_records": len(tvm_lines),
      "speedup_vs_tvm": replay_rate / tvm_rate,
      "skeleton_extraction_s": extract_s, "skeletons": sk.collection_size_stats(skels),
      "goal_programs_per_s": 20000,
      "machine": machine_info.machine_info(single_core=True),
  }
  print(json.dumps(res, indent=1))
  if args.out:
    machine_info.write_json(args.out, res)


if __name__ == "__main__":
  main()
