r"""Do replay templates pay at TenSet's scale? Template counts and featurize rates on programs
sampled under TenSet's protocol (needs TVM).

TenSet holds ~4,000 random programs per task; the shared data holds at most 48, too few to see
how often a task's step templates (:func:`tlp_jax.core.replay_cache.signature`: the step list
with split lengths and unroll values abstracted) repeat. This script samples ``--programs``
programs for each of ``--tasks`` tasks of ``--tenset_dir``, with TenSet's ``dump_programs``
sampling (``tlp_jax.tvm.collect.sample_programs``: a ``SketchPolicy`` with a random cost model,
distinct states), seeded by the task's position. Tasks are shuffled with seed 0. It then
featurizes each task's programs in one pass from a cold cache, as a build reads a task file,
in two ways:

* ``full``: replay + loop tokens of every program (``loop_tokens.plan_and_values`` of
  ``replay.replay``, ``replay_cache.fill_padded``): what ``data_pipelines`` does;
* ``templates``: ``replay_cache.featurize_many`` with a fresh ``TemplateCache`` (the tuner's
  path: trace a template, evaluate its trace on later programs, replay fully on guard failures).

Both must give the same tokens (checked). It reports per task: templates, the share of the 10
most common, programs/s of each path by process CPU time, and the cache's hit, trace and guard
counts. Samples are kept in ``--samples_dir``, so a rerun skips the sampling (~20-90 s per task
here).

  python -m bench.template_scale --tenset_dir /work/shared/tenset-mini --tasks 12 \
      --programs 4000 --out bench/results/template_scale_tenset_protocol.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import time

os.environ.setdefault("TVM_NUM_THREADS", "1")
os.environ.setdefault("TOPHUB_LOCATION", "NONE")

import numpy as np  # noqa: E402

from tlp_jax.core import features  # noqa: E402
from tlp_jax.core import loop_tokens as lt  # noqa: E402
from tlp_jax.core import replay as rp  # noqa: E402
from tlp_jax.core import replay_cache as rc  # noqa: E402
from tlp_jax.core import skeleton as sk  # noqa: E402


def sample(tasks: dict, keys: list[str], programs: int, samples_dir: str) -> list[str]:
  """Record files of ``programs`` sampled programs per task (made once, then reused)."""
  from tlp_jax.tvm import collect  # pylint: disable=import-outside-toplevel

  os.makedirs(samples_dir, exist_ok=True)
  paths = []
  for i, key in enumerate(keys):
    path = os.path.join(samples_dir, f"{i:03d}_{programs}.json")
    if not os.path.exists(path):
      t = time.perf_counter()
      collect.dump_task(tasks[key], path + ".tmp", programs, seed=i)
      os.replace(path + ".tmp", path)
      print(f"sampled task {i} in {time.perf_counter() - t:.1f} s", flush=True)
    paths.append(path)
  return paths


def measure(path: str, skeletons: dict) -> dict:
  """Templates and both featurize paths of one task's sampled programs."""
  with open(path, "rb") as f:
    lines = f.readlines()
  key = json.loads(lines[0])["i"][0][0]
  steps = [features.json_loads(ln)["i"][1][1] for ln in lines]
  sigs = collections.Counter(rc.signature(s)[0] for s in steps)
  fresh = sk.Skeleton.from_json(skeletons[key].to_json())
  c = time.process_time()
  items = [lt.plan_and_values(rp.replay(fresh, s)) for s in steps]
  full = rc.fill_padded(items, lt.DEFAULT_MAX_TOKENS)
  full_s = time.process_time() - c
  fresh = sk.Skeleton.from_json(skeletons[key].to_json())
  cache = rc.TemplateCache()
  c = time.process_time()
  traced = rc.featurize_many(fresh, steps, cache)
  tmpl_s = time.process_time() - c
  return {
    "workload_key": key,
    "programs": len(steps),
    "templates": len(sigs),
    "top10_template_share": sum(n for _, n in sigs.most_common(10)) / len(steps),
    "full_programs_per_s_cpu": len(steps) / full_s,
    "templates_programs_per_s_cpu": len(steps) / tmpl_s,
    "same_tokens": bool(np.array_equal(full, traced)),
    "template_cache": dict(cache.stats),
  }


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--tenset_dir", default="data/sample/tenset-mini")
  ap.add_argument("--tasks", type=int, default=12)
  ap.add_argument("--programs", type=int, default=4000)
  ap.add_argument("--samples_dir", default="/tmp/tlp_template_scale")
  ap.add_argument("--out", default="")
  args = ap.parse_args(argv)
  from bench import common, replay_fidelity  # pylint: disable=import-outside-toplevel

  load_at_start = os.getloadavg()
  tasks, skeletons = replay_fidelity.load_tasks_and_skeletons(args.tenset_dir)
  keys = sorted(tasks)
  random.Random(0).shuffle(keys)
  keys = [k for k in keys if k in skeletons][: args.tasks]
  paths = sample(tasks, keys, args.programs, args.samples_dir)
  rows = []
  for path in paths:
    row = measure(path, skeletons)
    rows.append(row)
    print(
      f"{row['programs']} programs, {row['templates']} templates "
      f"(top 10: {row['top10_template_share']:.0%}), full {row['full_programs_per_s_cpu']:.0f}/s,"
      f" templates {row['templates_programs_per_s_cpu']:.0f}/s, same {row['same_tokens']}",
      flush=True,
    )
  n = sum(r["programs"] for r in rows)

  def rate(field: str) -> float:
    return n / sum(r["programs"] / r[field] for r in rows)

  res = {
    "tenset_dir": args.tenset_dir,
    "sampling": "tlp_jax.tvm.collect.sample_programs (TenSet's dump_programs), seed = task index",
    "tasks": rows,
    "all": {
      "programs": n,
      "full_programs_per_s_cpu": rate("full_programs_per_s_cpu"),
      "templates_programs_per_s_cpu": rate("templates_programs_per_s_cpu"),
      "all_same_tokens": all(r["same_tokens"] for r in rows),
    },
    "machine": common.machine_info(single_core=True, load_average_start=load_at_start),
  }
  print(json.dumps(res["all"], indent=1))
  if args.out:
    common.write_json(args.out, res)


if __name__ == "__main__":
  main()
