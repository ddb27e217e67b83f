r"""Throughput of the pure-Python loop-nest replay vs TVM's per-store extraction (issue 15).

Same records, same process, one core (TVM_NUM_THREADS=1): programs/s of
:func:`tlp_jax.core.replay.replay` (steps already parsed, and JSON line -> nest), of replay +
loop tokens (full path, and the traced-template path of :mod:`tlp_jax.core.replay_cache`:
cold cache, first pass, steady state; template counts per task), a tuner-like case (batches of
500 states per task whose split lengths / unroll values are resampled the way Ansor samples
them, on the task's own step structures), and of TVM's own per-store feature extraction on the
first ``--tvm_records`` records (record line -> ``MeasureInput`` -> rebuilt state ->
``tvm.auto_scheduler.feature.get_per_store_features_from_states`` per task: TVM lowers every
program), measured in the same run.

``featurize_build_path``: what a dataset build computes per task file, end to end (the goal of
issue 15 is 20k programs/s on one core): record lines -> JSON -> TLP step tokens
(``features.Featurizer.featurize_many``) + replay + loop tokens (``loop_tokens.plan_and_values``,
``replay_cache.fill_padded``), with per-process CPU time next to wall time (on a shared machine
the CPU-time rate is the one that does not count other processes' time slices).

  taskset -c 0 python -m bench.replay_throughput --tenset_dir ../shared/tenset-mini \
      --out bench/results/replay_throughput.json

(TVM_NUM_THREADS=1 is set here; ``taskset`` pins the whole process to one core.) The machine's
load average at the start and the end is recorded with the numbers.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import time

os.environ.setdefault("TVM_NUM_THREADS", "1")
os.environ.setdefault("TOPHUB_LOCATION", "NONE")

from tlp_jax.core import loop_tokens as lt  # noqa: E402
from tlp_jax.core import replay as rp  # noqa: E402
from tlp_jax.core import replay_cache as rc  # noqa: E402
from tlp_jax.core import skeleton as sk  # noqa: E402


def _best_rate(fn, n, repeats):
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t)
  return n / best, best


def build_path_bench(lines, skels, repeats):
  """Step tokens + replay + loop tokens of record lines grouped by task (as a build reads task
  files): programs/s by wall clock and by this process' CPU time (best of ``repeats``)."""
  from tlp_jax.core import features  # pylint: disable=import-outside-toplevel

  by: dict = {}
  for ln in lines:
    by.setdefault(features.json_loads(ln)["i"][0][0], []).append(ln)
  featurizer = features.Featurizer("llvm")

  def run():
    for key, group in by.items():
      steps = [features.json_loads(ln)["i"][1][1] for ln in group]
      featurizer.featurize_many(steps)
      items = [lt.plan_and_values(rp.replay(skels[key], st)) for st in steps]
      rc.fill_padded(items, lt.DEFAULT_MAX_TOKENS)

  run()  # the per-task caches of a build are warm after its first records of a task
  wall = cpu = float("inf")
  for _ in range(repeats):
    t, c = time.perf_counter(), time.process_time()
    run()
    wall = min(wall, time.perf_counter() - t)
    cpu = min(cpu, time.process_time() - c)
  return {
    "programs_per_s_wall": len(lines) / wall,
    "programs_per_s_cpu_time": len(lines) / cpu,
    "steps": "json -> step tokens + replay + plan_and_values + fill_padded, per task",
  }


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--tenset_dir", default="data/sample/tenset-mini")
  ap.add_argument("--max_records", type=int, default=0, help="0: all")
  ap.add_argument("--tuner_tasks", type=int, default=20)
  ap.add_argument("--tuner_batch", type=int, default=500)
  ap.add_argument("--tvm_records", type=int, default=1000)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--out", default="")
  args = ap.parse_args(argv)
  load_at_start = os.getloadavg()
  from bench import common, replay_fidelity

  t0 = time.perf_counter()
  # Also registers the workloads, so TVM can rebuild the records' states below.
  _, skels = replay_fidelity.load_tasks_and_skeletons(args.tenset_dir)
  extract_s = time.perf_counter() - t0
  lines = []
  for f in sorted(glob.glob(os.path.join(args.tenset_dir, "measure_records", "*", "*.json"))):
    with open(f, "rb") as fh:
      lines += fh.readlines()
  # Interleave tasks (every k-th line) so a prefix is not one task.
  if args.max_records:
    step = max(1, len(lines) // args.max_records)
    lines = lines[::step][: args.max_records]
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

  def run_full_tokens():
    for s, st in parsed:
      lt.loop_tokens(rp.replay(s, st))

  full_tok_rate, _ = _best_rate(run_full_tokens, len(parsed), 1)
  tmpl = template_bench(parsed, skels)
  tuner = tuner_bench(parsed, skels, args.tuner_tasks, args.tuner_batch)
  line_rate, _ = _best_rate(run_lines, len(lines), args.repeats)
  build_path = build_path_bench(lines, skels, args.repeats)
  tvm_lines = lines[: args.tvm_records]
  c = time.process_time()
  tvm_rate, _ = _best_rate(lambda: tvm_per_store(tvm_lines), len(tvm_lines), 1)
  tvm_cpu_rate = len(tvm_lines) / (time.process_time() - c)
  res = {
    "tenset_dir": args.tenset_dir,
    "records": len(lines),
    "replay_programs_per_s": replay_rate,
    "replay_from_json_line_programs_per_s": line_rate,
    "replay_first_pass_programs_per_s": cold_rate,
    "replay_plus_tokens_full_programs_per_s": full_tok_rate,
    "featurize_build_path": build_path,
    "templates": tmpl,
    "tuner_like": tuner,
    "token_layout": {
      "version": lt.LAYOUT_VERSION,
      "width": lt.WIDTH,
      "max_tokens": lt.DEFAULT_MAX_TOKENS,
      "bytes_per_example_float16": lt.DEFAULT_MAX_TOKENS * lt.WIDTH * 2,
    },
    "tvm_per_store_programs_per_s": tvm_rate,
    "tvm_per_store_programs_per_s_cpu_time": tvm_cpu_rate,
    "tvm_records": len(tvm_lines),
    "speedup_vs_tvm": replay_rate / tvm_rate,
    "build_path_speedup_vs_tvm": build_path["programs_per_s_wall"] / tvm_rate,
    "build_path_speedup_vs_tvm_cpu_time": build_path["programs_per_s_cpu_time"] / tvm_cpu_rate,
    "skeleton_extraction_s": extract_s,
    "skeletons": sk.collection_size_stats(skels),
    "goal_programs_per_s": 20000,
    "machine": common.machine_info(single_core=True, load_average_start=load_at_start),
  }
  print(json.dumps(res, indent=1))
  if args.out:
    common.write_json(args.out, res)


def tvm_per_store(lines):
  """TVM's per-store features of record lines, as Ansor's XGBModel computes them: each line
  loaded into a ``MeasureInput``, its state rebuilt from the steps, then
  ``get_per_store_features_from_states`` once per task (the workloads must be registered)."""
  from tvm.auto_scheduler import feature, measure_record
  from tvm.auto_scheduler.measure import recover_measure_input

  by_task: dict = {}
  for ln in lines:
    inp, _ = measure_record.load_record_from_string(ln.decode())
    inp = recover_measure_input(inp, rebuild_state=True)
    by_task.setdefault(inp.task.workload_key, (inp.task, []))[1].append(inp.state)
  return [
    feature.get_per_store_features_from_states(states, task) for task, states in by_task.values()
  ]


def _by_task(parsed):
  by: dict = {}
  for s, st in parsed:
    by.setdefault(s.workload_key, []).append(st)
  return by


def _templated_pass(by, skels, caches, trace_after=1):
  t = time.perf_counter()
  n = 0
  for key, lists in by.items():
    c = caches.setdefault(key, rc.TemplateCache(trace_after))
    for i in range(0, len(lists), 512):
      rc.featurize_many(skels[key], lists[i : i + 512], c)
    n += len(lists)
  return n / (time.perf_counter() - t)


def template_bench(parsed, skels):
  """Traced-template path on the records: cold cache (fresh skeletons), steady state."""
  by = _by_task(parsed)
  out = {}
  for after in (1, 2):
    fresh = {k: sk.Skeleton.from_json(skels[k].to_json()) for k in by}
    caches: dict = {}
    out[f"trace_after_{after}"] = {
      "first_pass_cold_programs_per_s": _templated_pass(by, fresh, caches, after),
      "second_pass_programs_per_s": _templated_pass(by, fresh, caches, after),
      "steady_state_programs_per_s": _templated_pass(by, fresh, caches, after),
    }
    if after == 1:
      stats: dict = {}
      for c in caches.values():
        for k, v in c.stats.items():
          stats[k] = stats.get(k, 0) + v
      per_task = sorted(len(c.entries) for c in caches.values())
      variants = [
        len(e[1]) for c in caches.values() for e in c.entries.values() if e != rc._UNTRACEABLE
      ]  # pylint: disable=protected-access
      out["stats_three_passes"] = stats
      out["templates_total"] = sum(per_task)
      out["templates_per_task"] = {
        q: per_task[int(q / 100 * (len(per_task) - 1))] for q in (0, 25, 50, 75, 90, 100)
      }
      out["records_per_template"] = len(parsed) / max(1, sum(per_task))
      out["variants_per_template_mean"] = sum(variants) / max(1, len(variants))
      out["variants_per_template_max"] = max(variants, default=0)
  return out


def _factorizations(n, k, rng):
  # Ansor samples split lengths as a random factorization of the extent into k + 1 parts.
  out = []
  for _ in range(k):
    divs = [d for d in range(1, n + 1) if n % d == 0]
    d = divs[rng.randrange(len(divs))]
    out.append(d)
    n //= d
  return out


def tuner_like_batches(by: dict, keys, batch: int, n_batches: int, seed: int = 0) -> dict:
  """``{task: [n_batches lists of batch step lists]}`` for ``keys`` (in order): states the way
  Ansor's search makes them, the task's own step structures (``by``: task -> parsed step
  lists) with split lengths and auto_unroll values resampled, from one ``random.Random(seed)``.
  """
  import random  # pylint: disable=import-outside-toplevel

  rng = random.Random(seed)
  out = {}
  for key in keys:
    bs = []
    for _ in range(n_batches):
      b = []
      for _ in range(batch):
        st = [list(x) for x in by[key][rng.randrange(len(by[key]))]]
        for x in st:
          if x[0] == "SP" and all(n is not None for n in x[4]) and x[3]:
            x[4] = _factorizations(int(x[3]), len(x[4]), rng)
          elif x[0] == "PR" and x[3].startswith("auto_unroll_max_step$"):
            x[3] = "auto_unroll_max_step$" + str(rng.choice((0, 16, 64, 512)))
        b.append(st)
      bs.append(b)
    out[key] = bs
  return out


def tuner_bench(parsed, skels, n_tasks, batch):
  """Batches of ``batch`` states per task: the task's own step structures with resampled
  split lengths and auto_unroll values; rates of the first and of the second batch (cache
  warm from the first), checked bit-identical to the full path on a slice."""
  by = _by_task(parsed)
  keys = sorted(by)[:n_tasks]
  batches = tuner_like_batches(by, keys, batch, 2)
  fresh = {k: sk.Skeleton.from_json(skels[k].to_json()) for k in keys}
  caches = {k: rc.TemplateCache() for k in keys}
  rates = []
  for r in range(2):
    t = time.perf_counter()
    for k in keys:
      rc.featurize_many(fresh[k], batches[k][r], caches[k])
    rates.append(len(keys) * batch / (time.perf_counter() - t))
  t = time.perf_counter()
  bad = 0
  n = 0
  for k in keys:
    got = rc.featurize_many(fresh[k], batches[k][1][:50], caches[k])
    for st, row in zip(batches[k][1][:50], got):
      n += 1
      bad += not (row == lt.loop_tokens(rp.replay(fresh[k], st))).all()
  full_rate = n / (time.perf_counter() - t)
  return {
    "tasks": len(keys),
    "batch": batch,
    "first_batch_cold_programs_per_s": rates[0],
    "second_batch_programs_per_s": rates[1],
    "checked": n,
    "mismatches": bad,
    "full_path_plus_check_programs_per_s": full_rate,
    "templates_per_task_mean": sum(len(c.entries) for c in caches.values()) / len(keys),
  }


if __name__ == "__main__":
  main()
