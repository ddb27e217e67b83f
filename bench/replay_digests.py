r"""Per-program digests of the replay, to check that a change to it is output-identical.

For every record of ``--tenset_dir`` and for ``--tuner_per_task`` resampled states per task
(``bench.replay_throughput``'s tuner-like generator, seed 1): a hash of the replayed nest (stages,
loops, attachment, access info) and of its loop tokens (float16 bit patterns) by the full path,
and of the tokens by the traced templates (three passes of one call per task and 512 programs;
each must equal the full path's). Writes them to ``--out``; ``--compare A B`` counts the programs
whose digests differ between two such files.

  python -m bench.replay_digests --tenset_dir ../shared/tenset-mini --out /tmp/before.json
  (change the replay)
  python -m bench.replay_digests --tenset_dir ../shared/tenset-mini --out /tmp/after.json
  python -m bench.replay_digests --compare /tmp/before.json /tmp/after.json
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os

import numpy as np

from bench import common
from bench import replay_throughput as rt
from tlp_jax.core import loop_tokens as lt
from tlp_jax.core import replay as rp
from tlp_jax.core import replay_cache as rc
from tlp_jax.core import skeleton as sk


def _h(b: bytes) -> str:
  return hashlib.sha1(b).hexdigest()[:16]


def _tuner_states(by: dict, per_task: int) -> dict:
  """``{task: per_task step lists}``: one tuner-like batch per task (seed 1)."""
  batches = rt.tuner_like_batches(by, sorted(by), per_task, 1, seed=1)
  return {key: bs[0] for key, bs in batches.items()}


def digests(skels: dict, src: dict, name: str) -> dict:
  """{name_nest, name_tok, name_tmpl_pass{0,1,2}: [digest per program], name_stats}."""
  nest_h, tok_h = [], []
  for key in sorted(src):
    for st in src[key]:
      try:
        n = rp.replay(skels[key], st)
      except rp.ReplayError as e:
        nest_h.append(f"error: {e}")
        tok_h.append("error")
        continue
      nest_h.append(_h(repr((n.stages, n.concrete, n.attach_order, n.access)).encode()))
      tok_h.append(_h(lt.loop_tokens(n).view(np.uint16).tobytes()))
  res = {f"{name}_nest": nest_h, f"{name}_tok": tok_h}
  fresh = {k: sk.Skeleton.from_json(skels[k].to_json()) for k in src}
  caches = {k: rc.TemplateCache() for k in src}
  for p in range(3):
    th = []
    for key in sorted(src):
      lists = src[key]
      for i in range(0, len(lists), 512):
        chunk = lists[i : i + 512]
        try:
          t = rc.featurize_many(fresh[key], chunk, caches[key])
        except rp.ReplayError:
          th += ["error"] * len(chunk)
        else:
          th += [_h(r.view(np.uint16).tobytes()) for r in t]
    res[f"{name}_tmpl_pass{p}"] = th
    res[f"{name}_tmpl_pass{p}_vs_full_mismatches"] = sum(
      a != b for a, b in zip(tok_h, th) if a != "error"
    )
  stats: dict = {}
  for c in caches.values():
    for k, v in c.stats.items():
      stats[k] = stats.get(k, 0) + v
  res[f"{name}_stats"] = stats
  return res


def compare(a_path: str, b_path: str) -> dict:
  """{key: programs whose digests differ} between two digest files."""
  with open(a_path) as f:
    a = json.load(f)
  with open(b_path) as f:
    b = json.load(f)
  out = {}
  for k, v in a.items():
    if isinstance(v, list):
      if len(v) != len(b[k]):
        raise SystemExit(f"{k}: {len(v)} programs in {a_path}, {len(b[k])} in {b_path}")
      out[k] = {"programs": len(v), "differing": sum(x != y for x, y in zip(v, b[k]))}
    else:
      out[k] = {"a": v, "b": b[k]}
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--tenset_dir", default="data/sample/tenset-mini")
  ap.add_argument("--skeletons", default="", help="default: the dir's network_info/skeletons.json")
  ap.add_argument("--tuner_per_task", type=int, default=40)
  ap.add_argument("--out", default="")
  ap.add_argument("--compare", nargs=2, metavar=("A", "B"))
  args = ap.parse_args(argv)
  if args.compare:
    res = compare(*args.compare)
    print(json.dumps(res, indent=1))
    return
  if not args.out:
    raise SystemExit("--out is required (or --compare A B)")
  skels = sk.load_collection(args.skeletons or sk.tenset_skeletons_path(args.tenset_dir))
  by: dict = {}
  for f in sorted(glob.glob(os.path.join(args.tenset_dir, "measure_records", "*", "*.json"))):
    with open(f, "rb") as fh:
      for ln in fh:
        rec = json.loads(ln)
        by.setdefault(rec["i"][0][0], []).append(rec["i"][1][1])
  res = digests(skels, by, "records")
  res.update(digests(skels, _tuner_states(by, args.tuner_per_task), "tuner"))
  summary = {k: v for k, v in res.items() if not isinstance(v, list)}
  print(json.dumps(summary, indent=1))
  common.write_json(args.out, res)


if __name__ == "__main__":
  main()
