"""Replay of Ansor steps (tlp_jax.core.replay) against TVM's infer_bound_from_state.

The TVM comparison runs on a sample of the embedded tenset-mini records (every task, a few
records each, both hardware); the skeleton/replay unit tests need no TVM.
"""

import glob
import json
import os

import pytest

from tlp_jax.core import replay as rp
from tlp_jax.core import skeleton as sk

_DENSE = {
  "format": sk.FORMAT,
  "version": sk.VERSION,
  "workload_key": "dense",
  "stages": [
    {"name": "A", "type": "placeholder", "shape": [8, 16]},
    {"name": "B", "type": "placeholder", "shape": [4, 16]},
    {
      "name": "C",
      "type": "compute",
      "shape": [8, 4],
      "iters": [["i", "s", 8], ["j", "s", 4], ["k", "r", 16]],
      "reads": [[0, [[1, 0, 0, 0], [0, 0, 1, 0]]], [1, [[0, 1, 0, 0], [0, 0, 1, 0]]]],
      "output": False,
      "const_matrix": False,
      "num_outputs": 1,
    },
    {
      "name": "D",
      "type": "compute",
      "shape": [8, 4],
      "iters": [["i", "s", 8], ["j", "s", 4]],
      "reads": [[2, [[1, 0, 0], [0, 1, 0]]]],
      "output": True,
      "const_matrix": False,
      "num_outputs": 1,
    },
  ],
}


def test_skeleton_roundtrip_and_atomic_collection(tmp_path):
  s = sk.Skeleton.from_dict(_DENSE)
  assert sk.Skeleton.from_json(s.to_json()) == s
  path = str(tmp_path / "sk.json")
  old = os.umask(0o027)
  try:
    sk.save_collection(path, {"dense": s})
  finally:
    os.umask(old)
  assert sk.load_collection(path) == {"dense": s}
  # Shared data: the umask's mode, as open() gives (not a fixed 0o644 or mkstemp's 0600).
  assert os.stat(path).st_mode & 0o777 == 0o640
  assert os.listdir(tmp_path) == ["sk.json"]


@pytest.mark.parametrize(
  "mutate, match",
  [
    (lambda d: d.update(version=99), "version 99"),
    (lambda d: d["stages"][2]["reads"][0].__setitem__(0, 7), "producer stage index"),
    (lambda d: d["stages"][2]["iters"][2].__setitem__(1, "x"), "iters\\[2\\]"),
    (lambda d: d["stages"][3]["reads"][0][1].pop(), "has 1 indices"),
  ],
)
def test_skeleton_validation_names_the_field(mutate, match):
  d = json.loads(json.dumps(_DENSE))
  mutate(d)
  with pytest.raises(sk.SkeletonError, match=match):
    sk.Skeleton.from_dict(d, "f.json")


def test_replay_split_compute_at_bounds():
  s = sk.Skeleton.from_dict(_DENSE)
  steps = [
    ["SP", 3, 0, 8, [2], 1],
    ["CA", 2, 3, 1],
    ["AN", 3, 0, 3],
    ["PR", 2, 0, "auto_unroll_max_step$16"],
    ["SP", 2, 2, 16, [3], 1],
  ]
  nest = rp.replay(s, steps)
  c, d = nest.stages[2], nest.stages[3]
  assert (c[rp.S_COMPUTE_AT], c[rp.S_ATTACH_STAGE], c[rp.S_ATTACH_ITER]) == (rp.ITER, 3, 1)
  # One iteration of D's i.1 needs one row of C and all 4 columns; k split by 3 -> 6 x 3.
  assert [(lp[0], lp[1]) for lp in c[rp.S_LOOPS]] == [("i", 1), ("j", 4), ("k.0", 6), ("k.1", 3)]
  assert c[rp.S_UNROLL] == 16
  assert [(lp[0], lp[1], lp[3]) for lp in d[rp.S_LOOPS]] == [
    ("i.0", 4, 3),
    ("i.1", 2, 0),
    ("j", 4, 0),
  ]


def test_extent_one_loop_at_the_attach_point_is_a_constant_point():
  # C reads P[h // 4 + 2]; P is computed at h.0 (extent 1 when h is split 1 x 7). TVM's
  # InferRootBound takes the single point 0 for an extent-1 loop, so P's extent is the constant
  # 2; a loop variable of range [0, 0] there would leave floordiv(7p, 4) and floordiv(7p + 6, 4)
  # as two atoms and flag the extent symbolic.
  s = sk.Skeleton.from_dict(
    {
      "format": sk.FORMAT,
      "version": sk.VERSION,
      "workload_key": "div",
      "stages": [
        {"name": "A", "type": "placeholder", "shape": [4]},
        {
          "name": "P",
          "type": "compute",
          "shape": [4],
          "iters": [["i", "s", 4]],
          "reads": [[0, [[1, 0]]]],
          "output": False,
          "const_matrix": False,
          "num_outputs": 1,
        },
        {
          "name": "C",
          "type": "compute",
          "shape": [7],
          "iters": [["h", "s", 7]],
          "reads": [[1, [{"e": ["+", ["//", ["v", 0], 4], 2]}]]],
          "output": True,
          "const_matrix": False,
          "num_outputs": 1,
        },
      ],
    }
  )
  for n, want in ((7, 2), (1, 1)):
    p = rp.replay(s, [["SP", 2, 0, 7, [n], 1], ["CA", 1, 2, 0]]).stages[1]
    assert [(lp[rp.L_EXTENT], lp[rp.L_SYMBOLIC]) for lp in p[rp.S_LOOPS]] == [(want, False)]


def test_replay_errors_name_step():
  s = sk.Skeleton.from_dict(_DENSE)
  with pytest.raises(rp.ReplayError, match=r"step 1 \('XX'\)"):
    rp.replay(s, [["CI", 2], ["XX", 1]])
  with pytest.raises(rp.ReplayError, match=r"step 0 \(RE\)"):
    rp.replay(s, [["RE", 2, [0, 0, 1]]])


def _fidelity():
  # bench is a package of the checkout (python -m pytest runs from its root); the fidelity
  # checker imports TVM, so it is imported only by the tests that need it.
  from bench import replay_fidelity

  return replay_fidelity


def _sample_records(sample_dir, per_file):
  out = []
  for f in sorted(glob.glob(os.path.join(sample_dir, "measure_records", "*", "*.json"))):
    with open(f) as fh:
      out += [ln for _, ln in zip(range(per_file), fh)]
  return out


def test_replay_matches_tvm_on_sample(sample_tenset_dir):
  pytest.importorskip("tvm")
  rf = _fidelity()
  tasks, skels = rf.load_tasks_and_skeletons(sample_tenset_dir)
  lines = _sample_records(sample_tenset_dir, per_file=3)
  kinds = set()
  bad = []
  for line in lines:
    rec = json.loads(line)
    key, steps = rec["i"][0][0], rec["i"][1][1]
    kinds |= {s[0] for s in steps}
    # The skeleton survives JSON, as it would from a collection file.
    skel = sk.Skeleton.from_json(skels[key].to_json())
    nest = rp.replay(skel, steps)
    tvm_stages, text = rf.tvm_nest(tasks[key], line)
    problems, n_loops, n_exact, ext = rf.compare(nest, tvm_stages, text)
    if problems or ext or n_loops != n_exact:
      bad.append((key, steps, problems[:2], ext[:2]))
  assert len(lines) > 400
  assert {"SP", "FSP", "RE", "FU", "AN", "PR", "CA", "CI", "CR", "CHW", "RF"} <= kinds
  assert not bad, f"{len(bad)}/{len(lines)} differ from TVM, e.g. {bad[:2]}"


def test_compare_detects_a_wrong_extent(sample_tenset_dir):
  pytest.importorskip("tvm")
  rf = _fidelity()
  tasks, skels = rf.load_tasks_and_skeletons(sample_tenset_dir)
  line = _sample_records(sample_tenset_dir, per_file=1)[0]
  rec = json.loads(line)
  key = rec["i"][0][0]
  nest = rp.replay(skels[key], rec["i"][1][1])
  tvm_stages, text = rf.tvm_nest(tasks[key], line)
  i = next(i for i, s in enumerate(nest.stages) if s[rp.S_LOOPS] and s[rp.S_COMPUTE_AT] != 1)
  st = nest.stages[i]
  lp = st[rp.S_LOOPS][-1]
  broken = st[: rp.S_LOOPS] + (st[rp.S_LOOPS][:-1] + ((lp[0], lp[1] + 1) + lp[2:],),)
  nest2 = rp.LoopNest(nest.stages[:i] + (broken,) + nest.stages[i + 1 :], True, nest.attach_order)
  assert rf.compare(nest, tvm_stages, text)[3] == []
  assert rf.compare(nest2, tvm_stages, text)[3]
