"""Traced-template replay (tlp_jax.core.replay_cache) is bit-identical to replay + loop_tokens."""

import collections
import glob
import json
import os

import numpy as np
import pytest

from tests.core.test_loop_tokens import _STEPS
from tests.core.test_replay import _DENSE
from tlp_jax.core import loop_tokens as lt
from tlp_jax.core import replay as rp
from tlp_jax.core import replay_cache as rc
from tlp_jax.core import skeleton as sk


def test_template_hit_guard_fallback_and_identity():
  s = sk.Skeleton.from_dict(_DENSE)
  cache = rc.TemplateCache()
  progs = [
    _STEPS,
    [["SP", 3, 0, 8, [4], 1]] + _STEPS[1:],  # same template, new lengths
    _STEPS[:3] + [["PR", 2, 0, "auto_unroll_max_step$64"]] + _STEPS[4:],
    _STEPS[:4] + [["SP", 2, 2, 16, [32], 1]],  # factor > extent: other branch
    _STEPS,
  ]
  got = rc.featurize_many(s, progs, cache, max_tokens=8)
  for st, row in zip(progs, got):
    np.testing.assert_array_equal(row, lt.loop_tokens(rp.replay(s, st), max_tokens=8))
  assert cache.stats["traced"] >= 1 and cache.stats["hits"] >= 2
  assert rc.signature(progs[0])[0] == rc.signature(progs[1])[0]


def test_split_length_one_on_a_relaxed_loop_shares_the_trace():
  # D's j loops are inside C's attach point (relaxed in C's bound inference): a length of 1 on
  # either part gives the same numbers as the range formula, so it must not need its own trace.
  s = sk.Skeleton.from_dict(_DENSE)
  cache = rc.TemplateCache()
  progs = [[["SP", 3, 0, 8, [2], 1], ["SP", 3, 2, 4, [n], 1], ["CA", 2, 3, 1]] for n in (2, 1, 4)]
  got = rc.featurize_many(s, progs, cache, max_tokens=8)
  for st, row in zip(progs, got):
    np.testing.assert_array_equal(row, lt.loop_tokens(rp.replay(s, st), max_tokens=8))
  assert cache.stats["traced"] == 1 and cache.stats["hits"] == 2, cache.stats


def test_floormod_bounds_take_no_branch_on_traced_values():
  # The bounds of a floormod atom are [lo % c, hi % c] when lo and hi share a quotient, else
  # [0, c - 1] (also for an empty range, lo > hi); a traced replay records no comparison on them.
  for lo, hi, c in ((0, 3, 4), (5, 6, 4), (3, 4, 4), (0, 11, 4), (2, 1, 4), (4, 3, 4), (7, 7, 3)):
    want = (lo % c, hi % c) if lo // c == hi // c else (0, c - 1)
    tr = rc._Trace(2)  # pylint: disable=protected-access
    rc._ACTIVE[0] = tr  # pylint: disable=protected-access
    try:
      t_lo, t_hi = rc.TInt(lo), rc.TInt(hi)
      t_lo.nid, t_hi.nid = 0, 1
      sym = rp._Sym()  # pylint: disable=protected-access
      a = sym.atom(("x", 0), t_lo, t_hi)
      got = sym.floormod(("S", 0, ((a, 1),)), c)
    finally:
      rc._ACTIVE[0] = None  # pylint: disable=protected-access
    assert tuple(int.__int__(x) for x in sym.bounds[got[2][0][0]]) == want, (lo, hi, c)
    assert all(g[0] == "!=" and g[2] == ("c", 0) and g[3] for g in tr.guards), tr.guards


def test_traced_int_refuses_untraceable_use():
  tr = rc._Trace(1)  # pylint: disable=protected-access
  rc._ACTIVE[0] = tr  # pylint: disable=protected-access
  try:
    t = rc.TInt(3)
    t.nid = 0
    with pytest.raises(rc.TraceError):
      hash(t)
    with pytest.raises(rc.TraceError):
      float(t)
    assert (t * 2 + 1) < 8 and tr.guards[-1][-1] is True
  finally:
    rc._ACTIVE[0] = None  # pylint: disable=protected-access


def test_every_sample_record_both_paths(sample_tenset_dir):
  pytest.importorskip("tvm")
  from tests.core.test_replay import _fidelity  # pylint: disable=import-outside-toplevel

  _, skels = _fidelity().load_tasks_and_skeletons(sample_tenset_dir)
  by = collections.defaultdict(list)
  for f in sorted(glob.glob(os.path.join(sample_tenset_dir, "measure_records", "*", "*.json"))):
    with open(f) as fh:
      for ln in fh:
        rec = json.loads(ln)
        by[rec["i"][0][0]].append(rec["i"][1][1])
  n = bad = 0
  stats = collections.Counter()
  for key, lists in by.items():
    skel = sk.Skeleton.from_json(skels[key].to_json())
    cache = rc.TemplateCache()
    # Two passes: the first traces, the second runs on the traces.
    for _ in range(2):
      fast = rc.featurize_many(skel, lists, cache)
      for st, row in zip(lists, fast):
        n += 1
        bad += not np.array_equal(row, lt.loop_tokens(rp.replay(skel, st)))
    stats.update(cache.stats)
  assert n > 8000 and stats["hits"] > n // 2
  assert bad == 0, f"{bad}/{n} differ"


def test_fill_padded_buckets_keep_program_order(monkeypatch):
  # Programs of different loop counts, in mixed order, over several buckets: each row is that
  # program's own tokens.
  monkeypatch.setattr(rc, "FILL_BUCKET", 2)
  s = sk.Skeleton.from_dict(_DENSE)
  progs = [_STEPS, _STEPS[:1], _STEPS[:2], [["SP", 3, 0, 8, [4], 1]] + _STEPS[1:], [], _STEPS[:4]]
  nests = [rp.replay(s, st) for st in progs]
  assert len({lt.plan_and_values(n)[0].n for n in nests}) > 1
  got = rc.fill_padded([lt.plan_and_values(n) for n in nests], 8)
  for nest, row in zip(nests, got):
    np.testing.assert_array_equal(row, lt.loop_tokens(nest, max_tokens=8))
  assert rc.fill_padded([], 8).shape == (0, 8, lt.WIDTH)


def _with_new_values(steps, bump):
  """``steps`` with every abstracted value (split lengths, auto_unroll_max_step values) moved by
  ``bump``, and the new values in step order."""
  out, vals = [], []
  for st in steps:
    st = list(st)
    if st[0] == "SP":
      st[4] = [None if n is None else n + bump for n in st[4]]
      vals += [n for n in st[4] if n is not None]
    elif st[0] == "PR" and st[3].startswith("auto_unroll_max_step"):
      head, sep, num = st[3].partition("$")
      if sep:
        st[3] = f"{head}${int(num) + bump}"
      vals.append(int(num) + bump if sep else 0)
    out.append(st)
  return out, vals


def test_signature_abstracts_exactly_the_split_lengths_and_unroll_values(sample_tenset_dir):
  lists = []
  for f in sorted(glob.glob(os.path.join(sample_tenset_dir, "measure_records", "*", "*.json"))):
    with open(f) as fh:
      lists += [json.loads(ln)["i"][1][1] for ln in fh]
  lists += [
    [["SP", 2, 0, 64, [None, 4, None], 1], ["SP", 2, 4, 8, [], 0]],
    [["PR", 1, 0, "auto_unroll_max_step"], ["PR", 1, 0, "auto_unroll_max_step$512"]],
    [["PR", 1, 0, "debug_skip_region"], ["AN", 1, 2, 3], ["CA", 2, 3, 1], ["CI", 4]],
    [["FSP", 3, 1, 2, 1], ["RE", 2, [0, 2, 1]], ["FU", 2, [0, 1]], ["CHW", 2, "local"]],
  ]
  assert len(lists) > 4000
  for steps in lists:
    sig, vals = rc.signature(steps)
    hash(sig)
    same, _ = _with_new_values(steps, 0)
    assert rc.signature(same) == (sig, vals)
    moved, moved_vals = _with_new_values(steps, 3)
    assert rc.signature(moved) == (sig, moved_vals)  # the same template, its own values
  # Anything else is part of the template.
  base = [["SP", 2, 0, 64, [4, 4], 1], ["AN", 2, 0, 3], ["RE", 2, [0, 1]]]
  for i, j, value in [(0, 1, 3), (0, 5, 0), (1, 3, 2), (2, 2, [1, 0]), (0, 4, [4, None])]:
    other = json.loads(json.dumps(base))
    other[i][j] = value
    assert rc.signature(other)[0] != rc.signature(base)[0], (i, j, value)


def test_a_malformed_step_takes_the_full_replay_and_its_error():
  skel = sk.Skeleton.from_dict(_DENSE)
  bad = [["AN", 2, [1], 3]]  # a list where TVM writes an int: the signature cannot be hashed
  cache = rc.TemplateCache()
  with pytest.raises(rp.ReplayError) as got:
    cache.values(skel, bad)
  with pytest.raises(rp.ReplayError) as want:
    rp.replay(skel, bad)
  assert str(got.value) == str(want.value) and cache.stats["full"] == 1
