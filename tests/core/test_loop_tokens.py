"""Loop tokens (tlp_jax.core.loop_tokens) on a hand-worked nest; no TVM needed."""

import math

import numpy as np
import pytest

from tests.core.test_replay import _DENSE
from tlp_jax.core import loop_tokens as lt
from tlp_jax.core import replay as rp
from tlp_jax.core import skeleton as sk

# The nest of test_replay.test_replay_split_compute_at_bounds:
#   parallel D.i.0 (4) / D.i.1 (2) / [C at D.i.1: C.i (1) / C.j (4) / C.k.0 (6) / C.k.1 (3)]
#   / D.j (4); C has auto_unroll_max_step 16. C.i (extent 1, not annotated) is not a token.
_STEPS = [
  ["SP", 3, 0, 8, [2], 1],
  ["CA", 2, 3, 1],
  ["AN", 3, 0, 3],
  ["PR", 2, 0, "auto_unroll_max_step$16"],
  ["SP", 2, 2, 16, [3], 1],
]


def _l(x):
  return math.log2(x)


# Per token: stage, output, attached, depth, reduce, log2 extent, parallel, log2(1+unroll),
# log2 outer, log2 inner, log2(1+out stride), log2(1+read stride).
_EXPECTED = [
  # D.i.0: coefficient 2 (D.i.1's extent) times row stride 4 of D[8, 4] and of C[8, 4].
  (0, 1, 0, 0, 0, 2, 1, 0, 0, 3, _l(9), _l(9)),
  (0, 1, 0, 1, 0, 1, 0, 0, 2, 2, _l(5), _l(5)),  # D.i.1
  # C.j: enclosed by D.i.0, D.i.1 (C.i is dropped); reads B[4, 16] with stride 16 in j.
  (1, 0, 1, 2, 0, 2, 0, _l(17), 3, _l(18), 1, _l(17)),
  (1, 0, 1, 3, 1, _l(6), 0, _l(17), 5, _l(3), 0, 2),  # C.k.0: coef 3
  (1, 0, 1, 4, 1, _l(3), 0, _l(17), _l(192), 0, 0, 1),  # C.k.1
  (0, 1, 0, 2, 0, 2, 0, 0, 3, 0, 1, 1),  # D.j
]
_COLS = (
  lt.C_STAGE,
  lt.C_OUTPUT,
  lt.C_ATTACHED,
  lt.C_DEPTH,
  lt.C_REDUCE,
  lt.C_LOG_EXT,
  lt.C_PARALLEL,
  lt.C_LOG_UNROLL,
  lt.C_LOG_OUTER,
  lt.C_LOG_INNER,
  lt.C_OUT_STRIDE,
  lt.C_READ_STRIDE,
)


# Footprints per token (C[i, j] = sum_k A[i, k] * B[j, k], D[i, j] = C[i, j]; float32):
# log2(1 + read bytes), log2(1 + write bytes), log2(1 + reuse), over the loop and its stage's
# loops inside it.
_FOOTPRINT = [
  # D.i.0 (coef 2, 4) + D.i.1 (2) + D.j (4): C rows 1 + 2*3 + 1*1 = 8, cols 4: 32 elements.
  (_l(129), _l(129), 1),
  (_l(33), _l(33), 1),  # D.i.1: 2 x 4
  # C.j + C.k.0 (coef 3, 6) + C.k.1 (3): k spans 1 + 3*5 + 2 = 18, capped at 16; A 1 x 16,
  # B 4 x 16: 80 elements read 4*6*3 times each by 2 reads; C 1 x 4 written.
  (_l(321), _l(17), _l(1 + 144 / 80)),
  (_l(129), _l(5), _l(1 + 36 / 32)),  # C.k.0: A, B 1 x 16; C one element
  (_l(25), _l(5), 1),  # C.k.1: A, B 1 x 3
  (_l(17), _l(17), 1),  # D.j: C 1 x 4
]
_FOOT_COLS = (lt.C_READ_BYTES, lt.C_WRITE_BYTES, lt.C_REUSE)


def _nest():
  return rp.replay(sk.Skeleton.from_dict(_DENSE), _STEPS)


def test_layout_constants():
  assert lt.WIDTH == len(lt.COLUMNS) == 24
  assert len(set(lt.COLUMNS)) == lt.WIDTH
  assert lt.LAYOUT_VERSION == 2
  assert lt.COLUMNS[lt.C_READ_BYTES :] == ("log2_read_bytes", "log2_write_bytes", "log2_reuse")


def test_hand_worked_tokens():
  tok = lt.loop_tokens(_nest(), max_tokens=8)
  assert tok.shape == (8, lt.WIDTH) and tok.dtype == np.float16
  assert not tok[6:].any()  # padding
  assert (tok[:6, lt.C_IS_LOOP] == 1).all()
  want = np.array(_EXPECTED, np.float64).astype(np.float16)
  np.testing.assert_array_equal(tok[:6][:, list(_COLS)], want)
  assert not tok[:6, [lt.C_CACHE, lt.C_RFACTOR, lt.C_SYMBOLIC, lt.C_VECTORIZE]].any()


def test_hand_worked_footprints():
  tok = lt.loop_tokens(_nest(), max_tokens=8)
  want = np.array(_FOOTPRINT, np.float64).astype(np.float16)
  np.testing.assert_array_equal(tok[:6][:, list(_FOOT_COLS)], want)


def test_non_affine_index_counts_the_whole_dimension():
  # C[i] = A[i // 2] + B[i]: the floordiv index counts A's full size (4), B's is affine.
  d = {
    "format": sk.FORMAT,
    "version": sk.VERSION,
    "workload_key": "na",
    "stages": [
      {"name": "A", "type": "placeholder", "shape": [4]},
      {"name": "B", "type": "placeholder", "shape": [8]},
      {
        "name": "C",
        "type": "compute",
        "shape": [8],
        "iters": [["i", "s", 8]],
        "reads": [[0, [{"e": ["//", ["v", 0], 2]}]], [1, [[1, 0]]]],
        "output": True,
        "const_matrix": False,
        "num_outputs": 1,
      },
    ],
  }
  skel = sk.Skeleton.from_dict(d)
  tok = lt.loop_tokens(rp.replay(skel, [["SP", 2, 0, 8, [4], 1]]), max_tokens=4)
  # C.i.0 (2, coef 4) + C.i.1 (4): A whole (4), B 8; C.i.1 alone: A whole, B 4.
  want = np.array(
    [(_l(1 + 4 * 12), _l(33), _l(1 + 16 / 12)), (_l(1 + 4 * 8), _l(17), _l(1 + 8 / 8))]
  ).astype(np.float16)
  np.testing.assert_array_equal(tok[:2][:, list(_FOOT_COLS)], want)


def test_crop_keeps_outermost_and_values_are_float16_exact():
  tok = lt.loop_tokens(_nest(), max_tokens=3)
  np.testing.assert_array_equal(tok, lt.loop_tokens(_nest(), max_tokens=8)[:3])
  # Storage as float16 loses nothing: the values were rounded when the token was made.
  assert (tok.astype(np.float32).astype(np.float16) == tok).all()


def test_annotated_trivial_loop_is_kept():
  steps = _STEPS + [["AN", 2, 0, 1]]  # unroll C.i (extent 1)
  tok = lt.loop_tokens(rp.replay(sk.Skeleton.from_dict(_DENSE), steps), max_tokens=8)
  assert (tok[:, lt.C_IS_LOOP] == 1).sum() == 7
  assert tok[2, lt.C_UNROLL] == 1 and tok[2, lt.C_LOG_EXT] == 0
  assert tok[3, lt.C_DEPTH] == 3  # C.j now has C.i above it


def test_deterministic_and_batch_equals_single():
  nests = [_nest(), rp.replay(sk.Skeleton.from_dict(_DENSE), _STEPS[:3]), _nest()]
  many = lt.loop_tokens_many(nests, max_tokens=8)
  assert many.shape == (3, 8, lt.WIDTH)
  for k, n in enumerate(nests):
    np.testing.assert_array_equal(many[k], lt.loop_tokens(n, max_tokens=8))
  np.testing.assert_array_equal(many[0], many[2])


def test_unbound_nest_is_an_error():
  nest = rp.replay(sk.Skeleton.from_dict(_DENSE), _STEPS, infer_bounds=False)
  with pytest.raises(ValueError, match="no bounds"):
    lt.loop_tokens(nest)


def test_plan_cached_per_structure_values_per_nest():
  s = sk.Skeleton.from_dict(_DENSE)
  a = rp.replay(s, _STEPS)
  b = rp.replay(s, [["SP", 3, 0, 8, [4], 1]] + _STEPS[1:])  # same structure, other lengths
  c = rp.replay(s, _STEPS[:2])  # no annotation, no split of C: another structure
  assert lt.structure_key(a) == lt.structure_key(b) != lt.structure_key(c)
  pa, pb, pc = lt.plan_and_values(a), lt.plan_and_values(b), lt.plan_and_values(c)
  assert pa[0] is pb[0] and pc[0] is not pa[0]
  assert not np.array_equal(pa[1], pb[1])  # the extents are the nest's own
  for nest, item in ((a, pa), (b, pb), (c, pc)):
    fresh = lt.plan_of(nest)  # uncached
    for name in ("static", "anc", "inner", "always", "d_idx", "s_idx", "o_idx"):
      np.testing.assert_array_equal(getattr(item[0], name), getattr(fresh, name))
    want = lt.fill(fresh, *(v[None] for v in item[1:]), max_tokens=8)[0]
    np.testing.assert_array_equal(lt.loop_tokens(nest, max_tokens=8), want)


def test_plan_cache_is_bounded(monkeypatch):
  monkeypatch.setattr(lt, "PLAN_CACHE_SIZE", 1)
  monkeypatch.setattr(lt, "_PLAN_CACHE", {})
  s = sk.Skeleton.from_dict(_DENSE)
  for steps in (_STEPS, _STEPS[:2], _STEPS[:1]):
    lt.plan_and_values(rp.replay(s, steps))
    assert len(lt._PLAN_CACHE) == 1  # pylint: disable=protected-access
