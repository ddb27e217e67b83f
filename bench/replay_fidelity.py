r"""Fidelity of the pure-Python loop-nest replay against TVM (issue 15).

For every record: the nest from :func:`tlp_jax.core.replay.replay` (skeleton + steps, no TVM)
against TVM's ``task.compute_dag.infer_bound_from_state(state)``:

* structure: stage order and names, op types, compute locations, per stage the loop order
  (names), kinds, annotations and ``auto_unroll_max_step``, and the attachments (compared on
  TVM's own state printout, loop extents masked, trivial loops kept by neither side's mask);
* extents: every loop of every non-inlined stage (TVM's non-constant extents count as matched
  when the replay flags the loop symbolic).

Mismatches are grouped into patterns (which field, which stage kind, which step kinds) so
the causes can be read off the JSON.

  python -m bench.replay_fidelity --tenset_dir data/sample/tenset-mini
  python -m bench.replay_fidelity --tenset_dir /work/shared/tenset-mini \
      --out bench/results/replay_fidelity.json
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import time

from tlp_jax.core import atomic_file
from tlp_jax.core import replay as rp
from tlp_jax.core import skeleton as sk

_LOOP_LINE = re.compile(r"^(\s*)(\S+) (\S+) \((.*)\)$")


def load_tasks_and_skeletons(tenset_dir: str):
  """TVM SearchTasks (registered) and their skeletons, keyed by workload key."""
  from tlp_jax.tvm import (
    search_tasks,  # pylint: disable=import-outside-toplevel
    skeleton_extract,  # pylint: disable=import-outside-toplevel
  )

  tasks = search_tasks.load_search_tasks(os.path.join(tenset_dir, "network_info", "all_tasks.pkl"))
  by_key = {}
  for t in tasks:
    by_key.setdefault(t.workload_key, t)
  return by_key, skeleton_extract.skeletons_from_tasks(by_key.values())


def tvm_nest(task, line: str):
  """TVM's view of a record: per stage (name, op_type, compute_at, unroll, loops) and the
  printed state. Loops: (name, extent or None, kind, annotation, is_int)."""
  import tvm  # pylint: disable=import-outside-toplevel
  from tvm.auto_scheduler import measure_record  # pylint: disable=import-outside-toplevel

  inp, _ = measure_record.load_record_from_string(line)
  state = task.compute_dag.infer_bound_from_state(inp.state)
  stages = []
  for s in state.state_object.stages:
    loops = []
    for it in s.iters:
      ext = None
      is_int = True
      if it.range is not None:
        e = it.range.extent
        if isinstance(e, tvm.tir.IntImm):
          ext = int(e.value)
        else:
          is_int = False
          ext = str(e)
      loops.append((str(it.name), ext, int(it.iter_kind), int(it.annotation), is_int))
    stages.append((str(s.op.name), int(s.op_type), int(s.compute_at), loops))
  return stages, str(state)


def normalize_print(text: str) -> str:
  """TVM's printed state with loop ranges masked: keeps nesting, names, annotations."""
  out = []
  for ln in text.rstrip("\n").split("\n"):
    m = _LOOP_LINE.match(ln)
    if m and (m.group(2) in rp.ANNOTATIONS or m.group(2) == "for"):
      out.append(f"{m.group(1)}{m.group(2)} {m.group(3)}")
    else:
      out.append(ln.rstrip())
  return "\n".join(out)


def compare(nest: rp.LoopNest, tvm_stages, tvm_text: str):
  """(structure problems, loops compared, loops exact, extent problems) for one program."""
  problems, ext_problems = [], []
  n_loops = n_exact = 0
  if len(nest.stages) != len(tvm_stages):
    return [("stage_count", "", "")], 0, 0, []
  for a, b in zip(nest.stages, tvm_stages):
    name, op_type, cat, loops = b
    if a[rp.S_NAME] != name:
      problems.append(("stage_name", name, f"{a[rp.S_NAME]} vs {name}"))
      continue
    if a[rp.S_OP_TYPE] != op_type or a[rp.S_COMPUTE_AT] != cat:
      problems.append(("compute_at", name, f"{a[rp.S_COMPUTE_AT]} vs {cat}"))
    mine = a[rp.S_LOOPS]
    if len(mine) != len(loops):
      problems.append(("loop_count", name, f"{len(mine)} vs {len(loops)}"))
      continue
    for j, (x, y) in enumerate(zip(mine, loops)):
      if (x[rp.L_NAME], x[rp.L_KIND], x[rp.L_ANN]) != (y[0], y[2], y[3]):
        problems.append(("loop", name, f"{j}: {x[:4]} vs {y[:4]}"))
      if cat == rp.INLINED:
        continue
      n_loops += 1
      if y[4]:
        ok = x[rp.L_EXTENT] == y[1] and not x[rp.L_SYMBOLIC]
      else:
        ok = bool(x[rp.L_SYMBOLIC])
      if ok:
        n_exact += 1
      else:
        ext_problems.append((name, j, x[rp.L_NAME], x[rp.L_EXTENT], y[1]))
  if not problems:
    # Attachments are checked on TVM's printout, which hides extent-1 loops: print the replayed
    # nest with TVM's extents so that an extent mismatch is not counted twice.
    with_tvm_ext = rp.LoopNest(
      tuple(
        a[: rp.S_LOOPS]
        + (
          tuple(
            x[: rp.L_EXTENT] + ((y[1] if y[4] else -1),) + x[rp.L_KIND : -1] + (False,)
            for x, y in zip(a[rp.S_LOOPS], b[3])
          ),
        )
        for a, b in zip(nest.stages, tvm_stages)
      ),
      nest.concrete,
      nest.attach_order,
    )
    if normalize_print(with_tvm_ext.to_text(True)) != normalize_print(tvm_text):
      problems.append(("attach_or_print", "", ""))
  return problems, n_loops, n_exact, ext_problems


def _step_signature(steps) -> str:
  return " ".join(sorted({s[0] for s in steps}))


def _stage_kind(name: str) -> str:
  for suffix in (".local", ".rf", ".repl", ".shared", ".global"):
    if name.endswith(suffix):
      return suffix[1:]
  return "compute"


def run(tenset_dir: str, hardware=None, limit_per_file: int = 0, max_examples: int = 20):
  """Fidelity over every record file under ``tenset_dir`` (optionally one hardware)."""
  t0 = time.time()
  tasks, skels = load_tasks_and_skeletons(tenset_dir)
  pattern = os.path.join(tenset_dir, "measure_records", hardware or "*", "*.json")
  files = sorted(glob.glob(pattern))
  per_hw = collections.defaultdict(collections.Counter)
  struct_patterns = collections.Counter()
  ext_patterns = collections.Counter()
  examples = []
  for f in files:
    hw = os.path.basename(os.path.dirname(f))
    with open(f) as fh:
      lines = fh.readlines()
    if limit_per_file:
      lines = lines[:limit_per_file]
    for line in lines:
      rec = json.loads(line)
      key = rec["i"][0][0]
      steps = rec["i"][1][1]
      c = per_hw[hw]
      c["programs"] += 1
      try:
        nest = rp.replay(skels[key], steps)
      except rp.ReplayError as e:
        c["replay_errors"] += 1
        struct_patterns[f"replay_error: {str(e)[:80]}"] += 1
        continue
      try:
        tvm_stages, text = tvm_nest(tasks[key], line)
      except Exception:  # pylint: disable=broad-except
        c["tvm_errors"] += 1
        continue
      c["compared"] += 1
      problems, n_loops, n_exact, ext_problems = compare(nest, tvm_stages, text)
      c["loops"] += n_loops
      c["loops_exact"] += n_exact
      sig = _step_signature(steps)
      if not problems:
        c["structure_ok"] += 1
      else:
        for kind, stage, _ in problems[:1]:
          struct_patterns[f"{kind} [{_stage_kind(stage)}] steps: {sig}"] += 1
        if len(examples) < max_examples:
          examples.append(
            {"file": os.path.relpath(f, tenset_dir), "steps": steps, "problems": problems[:3]}
          )
      if not ext_problems:
        c["extents_ok"] += 1
      else:
        name = ext_problems[0][0]
        ext_patterns[f"[{_stage_kind(name)}] steps: {sig}"] += 1
        if len(examples) < max_examples:
          examples.append(
            {
              "file": os.path.relpath(f, tenset_dir),
              "steps": steps,
              "extent_problems": [list(map(str, p)) for p in ext_problems[:4]],
            }
          )
      if not problems and not ext_problems:
        c["identical"] += 1
  summary = {}
  for hw, c in sorted(per_hw.items()):
    n = max(c["compared"], 1)
    summary[hw] = {
      "programs": c["programs"],
      "compared": c["compared"],
      "replay_errors": c["replay_errors"],
      "tvm_errors": c["tvm_errors"],
      "structure_identical_pct": 100.0 * c["structure_ok"] / n,
      "extents_all_exact_pct": 100.0 * c["extents_ok"] / n,
      "loops": c["loops"],
      "loops_exact_pct": 100.0 * c["loops_exact"] / max(c["loops"], 1),
      "fully_identical_pct": 100.0 * c["identical"] / n,
    }
  return {
    "tenset_dir": tenset_dir,
    "files": len(files),
    "per_hardware": summary,
    "structure_mismatch_patterns": dict(struct_patterns.most_common(30)),
    "extent_mismatch_patterns": dict(ext_patterns.most_common(30)),
    "examples": examples,
    "skeletons": sk.collection_size_stats(skels),
    "seconds": time.time() - t0,
  }


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--tenset_dir", default="data/sample/tenset-mini")
  ap.add_argument("--hardware", default=None)
  ap.add_argument("--limit_per_file", type=int, default=0)
  ap.add_argument("--out", default="")
  ap.add_argument("--label", default="")
  args = ap.parse_args(argv)
  os.environ.setdefault("TOPHUB_LOCATION", "NONE")
  res = run(args.tenset_dir, args.hardware, args.limit_per_file)
  try:
    from bench import common

    res["machine"] = common.machine_info()
  except Exception:  # pylint: disable=broad-except
    res["machine"] = None
  print(
    json.dumps(
      {
        k: res[k]
        for k in (
          "per_hardware",
          "structure_mismatch_patterns",
          "extent_mismatch_patterns",
          "skeletons",
          "seconds",
        )
      },
      indent=1,
    )
  )
  if args.out:
    doc = {}
    if os.path.exists(args.out):
      with open(args.out) as f:
        doc = json.load(f)
    doc[args.label or os.path.basename(os.path.normpath(args.tenset_dir))] = res
    atomic_file.write_atomically(args.out, lambda f: json.dump(doc, f, indent=1))


if __name__ == "__main__":
  main()
