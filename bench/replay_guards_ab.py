r"""Before/after, in one process, of a change to :mod:`tlp_jax.core.replay`: template misses and
programs/s of the traced-template path (:mod:`tlp_jax.core.replay_cache`), and optionally
``TLPCostModel.predict`` (needs TVM), all by this process' CPU time.

The "before" code is ``--base``'s ``tlp_jax/core/replay.py``: every top-level function and class
method whose source differs from the working tree's is compiled from the base source and swapped
into the imported module (run against the module's own globals), so both variants run in the
same process, interleaved (``--rounds`` rounds of base then new; best CPU time of each). Only
function bodies may differ (a changed signature, class or constant is refused).

* ``tuner_like``: ``--tuner_tasks`` tasks of ``--tenset_dir``, three batches of ``--tuner_batch``
  states each whose split lengths / auto_unroll values are resampled as Ansor samples them
  (``bench.replay_throughput``'s generator), fresh caches per variant: programs/s per batch and
  the third batch's template misses (states whose template holds traces and all of them fail
  their guards: those are replayed in full);
* ``records``: every record of the dir, one call per task and 512 programs, three passes;
* ``predict`` (``--predict``): ``bench.tuner_predict_cost``'s tasks and SketchPolicy states, a
  fresh ``TLPCostModel`` (default model, random weights) per variant, first call then the best of
  ``--repeats`` steady-state calls.

Tokens of both variants are compared on every program measured (``mismatches``).

  OPENBLAS_NUM_THREADS=1 taskset -c 0 python -m bench.replay_guards_ab --base 858d74d \
      --tenset_dir ../shared/tenset-mini --skeletons SKELETONS.json --predict \
      --out bench/results/replay_guards_ab_tenset_mini.json

(``../shared/tenset-mini`` has no ``network_info/skeletons.json``: extract one with TVM,
``skeleton_extract.skeletons_from_tasks`` + ``skeleton.save_collection``.)
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import glob
import json
import os
import subprocess
import tempfile
import time
import types

import numpy as np

os.environ.setdefault("TVM_NUM_THREADS", "1")
os.environ.setdefault("TOPHUB_LOCATION", "NONE")

from bench import common  # noqa: E402
from bench import replay_throughput as rt  # noqa: E402
from tlp_jax.core import replay as rp  # noqa: E402
from tlp_jax.core import replay_cache as rc  # noqa: E402
from tlp_jax.core import skeleton as sk  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _defs(src: str) -> dict:
  """{(class or None, name): source} of top-level functions and class methods."""
  out = {}
  for node in ast.parse(src).body:
    if isinstance(node, (ast.FunctionDef,)):
      out[(None, node.name)] = ast.get_source_segment(src, node)
    elif isinstance(node, ast.ClassDef):
      for sub in node.body:
        if isinstance(sub, ast.FunctionDef):
          out[(node.name, sub.name)] = ast.get_source_segment(src, sub)
  return out


def base_swaps(base: str) -> dict:
  """{(class or None, name): function} of the base revision's versions of the functions whose
  source differs from the imported module's."""
  rel = "tlp_jax/core/replay.py"
  old_src = subprocess.run(
    ["git", "show", f"{base}:{rel}"], cwd=REPO, check=True, capture_output=True, text=True
  ).stdout
  with open(rp.__file__, encoding="utf-8") as f:
    new_src = f.read()
  old, new = _defs(old_src), _defs(new_src)
  if set(old) != set(new):
    raise SystemExit(f"{base}: the functions of {rel} differ, not only their bodies")
  swaps = {}
  for key, text in old.items():
    if text == new[key]:
      continue
    ns: dict = {}
    exec(compile(ast.Module([ast.parse(text).body[0]], []), rel, "exec"), ns)  # pylint: disable=exec-used
    fn = ns[key[1]]
    swaps[key] = types.FunctionType(fn.__code__, rp.__dict__, fn.__name__, fn.__defaults__)
  if not swaps:
    raise SystemExit(f"{base}: {rel} is the same as the working tree's")
  return swaps


@contextlib.contextmanager
def variant(swaps: dict | None):
  """The module as in the base revision (``swaps``), or as imported (None)."""
  saved = {}
  for (cls, name), fn in (swaps or {}).items():
    owner = getattr(rp, cls) if cls else rp
    saved[(cls, name)] = getattr(owner, name) if cls else rp.__dict__[name]
    setattr(owner, name, fn)
  try:
    yield
  finally:
    for (cls, name), fn in saved.items():
      setattr(getattr(rp, cls) if cls else rp, name, fn)


def tuner_batches(by: dict, n_tasks: int, batch: int, n_batches: int = 3) -> dict:
  """{task: [batch of step lists]}: ``replay_throughput.tuner_like_batches`` of the first
  ``n_tasks`` tasks, seed 0."""
  return rt.tuner_like_batches(by, sorted(by)[:n_tasks], batch, n_batches)


def _passes(skels, batches: dict, chunk: int) -> tuple[list, list, list]:
  """Per pass: CPU s, cache stats delta, tokens; fresh skeletons and caches."""
  fresh = {k: sk.Skeleton.from_json(skels[k].to_json()) for k in batches}
  caches = {k: rc.TemplateCache() for k in batches}
  n_pass = len(next(iter(batches.values())))
  secs, stats, toks = [], [], []
  for p in range(n_pass):
    before = {k: dict(c.stats) for k, c in caches.items()}
    out = []
    t = time.process_time()
    for k, bs in batches.items():
      lists = bs[p]
      for i in range(0, len(lists), chunk):
        out.append(rc.featurize_many(fresh[k], lists[i : i + chunk], caches[k]))
    secs.append(time.process_time() - t)
    d: dict = {}
    for k, c in caches.items():
      for s, v in c.stats.items():
        d[s] = d.get(s, 0) + v - before[k].get(s, 0)
    stats.append(d)
    toks.append(out)
  return secs, stats, toks


def ab_passes(skels, batches, chunk, swaps, rounds) -> dict:
  """Both variants, interleaved: best CPU s per pass, stats, token mismatches."""
  n = sum(len(bs[0]) for bs in batches.values())
  best = {"base": None, "new": None}
  stats = {}
  toks = {}
  for _ in range(rounds):
    for name in ("base", "new"):
      with variant(swaps if name == "base" else None):
        secs, st, tk = _passes(skels, batches, chunk)
      best[name] = secs if best[name] is None else [min(a, b) for a, b in zip(best[name], secs)]
      stats[name] = st
      toks[name] = tk
  bad = sum(
    int((a != b).any(axis=(1, 2)).sum())
    for pa, pb in zip(toks["base"], toks["new"])
    for a, b in zip(pa, pb)
  )
  out = {"programs_per_pass": n, "token_mismatches_base_vs_new": bad}
  for name in ("base", "new"):
    out[name] = {
      "programs_per_s_cpu": [n / s for s in best[name]],
      "stats_per_pass": stats[name],
      "full_replay_pct_per_pass": [100 * s.get("full", 0) / n for s in stats[name]],
      "all_traces_missed_pct_per_pass": [100 * s.get("guard_fail", 0) / n for s in stats[name]],
    }
  return out


def ab_predict(tenset_dir, swaps, n_states, n_tasks, repeats, rounds) -> dict:
  """TLPCostModel.predict (default model) on bench.tuner_predict_cost's tasks and states."""
  from tvm import auto_scheduler  # pylint: disable=import-outside-toplevel

  from bench import tuner_predict_cost as tpc  # pylint: disable=import-outside-toplevel
  from tlp_jax.core import network_info, tenset  # pylint: disable=import-outside-toplevel
  from tlp_jax.tvm import cost_model, search_tasks  # pylint: disable=import-outside-toplevel

  tasks = {
    t.workload_key: t for t in search_tasks.load_search_tasks(tenset.all_tasks_path(tenset_dir))
  }
  nets = network_info.load_network_infos(tenset_dir)
  chosen = []
  for net in network_info.select_holdout(nets, network_info.default_holdout(nets)):
    for t in sorted(net.tasks, key=lambda t: -np.nan_to_num(t.flop_ct) * t.weight):
      if t.workload_key in tasks and t.workload_key not in chosen:
        chosen.append(t.workload_key)
        break
  chosen = chosen[:n_tasks]
  states = {}
  for wk in chosen:
    policy = auto_scheduler.SketchPolicy(
      tasks[wk], params={"evolutionary_search_population": n_states}, seed=0, verbose=0
    )
    states[wk] = list(policy.sample_initial_population())[:n_states]
  n = sum(len(s) for s in states.values())
  res = {"tasks": len(chosen), "states": n}
  best = {"base": [None, None], "new": [None, None]}
  preds = {}
  with tempfile.TemporaryDirectory() as tmp:
    path = tpc.export_default_model(
      os.path.join(tmp, "tlp.npz"), sk.tenset_skeletons_path(tenset_dir), "required"
    )
    for _ in range(rounds):
      for name in ("base", "new"):
        with variant(swaps if name == "base" else None):
          model = cost_model.TLPCostModel(path, cost_model.CostModelConfig(cache_size=0))
          t = time.process_time()
          first = [np.asarray(model.predict(tasks[wk], states[wk])) for wk in chosen]
          first_s = time.process_time() - t
          steady_s = float("inf")
          for _ in range(repeats):
            t = time.process_time()
            for wk in chosen:
              model.predict(tasks[wk], states[wk])
            steady_s = min(steady_s, time.process_time() - t)
        b = best[name]
        b[0] = first_s if b[0] is None else min(b[0], first_s)
        b[1] = steady_s if b[1] is None else min(b[1], steady_s)
        preds[name] = first
  res["prediction_mismatches_base_vs_new"] = int(
    sum((a != b).sum() for a, b in zip(preds["base"], preds["new"]))
  )
  for name in ("base", "new"):
    res[name] = {
      "first_call_states_per_s_cpu": n / best[name][0],
      "steady_states_per_s_cpu": n / best[name][1],
    }
  return res


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--base", default="HEAD~1", help="git revision of the 'before' replay.py")
  ap.add_argument("--tenset_dir", default=os.path.join(REPO, "data", "sample", "tenset-mini"))
  ap.add_argument("--skeletons", default="", help="default: the dir's network_info/skeletons.json")
  ap.add_argument("--tuner_tasks", type=int, default=5)
  ap.add_argument("--tuner_batch", type=int, default=500)
  ap.add_argument("--rounds", type=int, default=2)
  ap.add_argument("--predict", action="store_true", help="also TLPCostModel.predict (TVM)")
  ap.add_argument(
    "--predict_tenset_dir", default=os.path.join(REPO, "data", "sample", "tenset-mini")
  )
  ap.add_argument("--predict_states", type=int, default=512)
  ap.add_argument("--predict_tasks", type=int, default=3)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--out", default="")
  args = ap.parse_args(argv)
  common.log_to_stderr()
  load_at_start = os.getloadavg()
  swaps = base_swaps(args.base)
  skels = sk.load_collection(args.skeletons or sk.tenset_skeletons_path(args.tenset_dir))
  by: dict = {}
  for f in sorted(glob.glob(os.path.join(args.tenset_dir, "measure_records", "*", "*.json"))):
    with open(f, "rb") as fh:
      for ln in fh:
        rec = json.loads(ln)
        by.setdefault(rec["i"][0][0], []).append(rec["i"][1][1])
  res = {
    "base": args.base,
    "base_commit": subprocess.run(
      ["git", "rev-parse", args.base], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout.strip(),
    "swapped": sorted(f"{c}.{n}" if c else n for c, n in swaps),
    "tenset_dir": args.tenset_dir,
    "args": vars(args),
  }
  batches = tuner_batches(by, args.tuner_tasks, args.tuner_batch)
  res["tuner_like"] = ab_passes(skels, batches, args.tuner_batch, swaps, args.rounds)
  records = {k: [v] * 3 for k, v in by.items()}
  res["records"] = ab_passes(skels, records, 512, swaps, args.rounds)
  if args.predict:
    res["predict"] = ab_predict(
      args.predict_tenset_dir,
      swaps,
      args.predict_states,
      args.predict_tasks,
      args.repeats,
      args.rounds,
    )
  res["machine"] = common.machine_info(
    single_core=True,
    load_average_start=load_at_start,
    affinity=sorted(os.sched_getaffinity(0)),
  )
  print(json.dumps(res, indent=1))
  if args.out:
    common.write_json(args.out, res)


if __name__ == "__main__":
  main()
