"""Tests of tlp_jax.core.metrics: hand-computed top-k, exact random expectation, oracle, ties."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tlp_jax.core import metrics

# Three tasks, worked by hand below.
#   task 0: latency [1, 2, 4],     pred [0.1, 0.9, 0.5]      -> ranked 2, 4, 1
#   task 1: latency [3, 6],        pred [0.2, 0.8]           -> ranked 6, 3
#   task 2: latency [5, 10, 20, 8], pred [0.3, 0.1, 0.9, 0.2] -> ranked 20, 5, 8, 10
# The programs are interleaved on purpose (grouping must not rely on contiguity).
_TASK = np.array([0, 1, 2, 0, 2, 1, 0, 2, 2])
_LAT = np.array([1.0, 3.0, 5.0, 2.0, 10.0, 6.0, 4.0, 20.0, 8.0])
_PRED = np.array([0.1, 0.2, 0.3, 0.9, 0.1, 0.8, 0.5, 0.9, 0.2])
_NETS = [
  metrics.NetworkTasks("A", np.array([0, 1]), np.array([2, 1])),
  metrics.NetworkTasks("B", np.array([1, 2]), np.array([3, 1])),
]


def test_hand_computed_top_k():
  r = metrics.top_k_scores(_PRED, _LAT, _TASK, _NETS, ks=(1, 2))
  # A: best = 2*1 + 1*3 = 5; top-1 = 2*2 + 1*6 = 10; top-2 = 2*2 + 1*3 = 7.
  # B: best = 3*3 + 1*5 = 14; top-1 = 3*6 + 1*20 = 38; top-2 = 3*3 + 1*5 = 14.
  np.testing.assert_allclose(r.per_network, [[5 / 10, 5 / 7], [14 / 38, 14 / 14]])
  np.testing.assert_allclose(r.mean, [(5 / 10 + 14 / 38) / 2, (5 / 7 + 1) / 2])
  np.testing.assert_allclose(r.pooled, [19 / 48, 19 / 21])
  np.testing.assert_allclose(r.best_latency, [5, 14])
  np.testing.assert_allclose(r.topk_latency, [[10, 7], [38, 14]])
  assert r.tasks_used.tolist() == [2, 2] and r.tasks_skipped.tolist() == [0, 0]
  d = r.to_dict()
  assert d["pooled"]["top-1"] == pytest.approx(19 / 48)
  assert d["per_network"]["B"]["top-2"] == pytest.approx(1.0)


def test_per_task_best_latency_and_k_larger_than_task():
  best = metrics.best_latency_in_top_k(_PRED, _LAT, _TASK, ks=(1, 2, 3, 50))
  np.testing.assert_allclose(best, [[2, 2, 1, 1], [6, 3, 3, 3], [20, 5, 5, 5]])
  np.testing.assert_allclose(metrics.min_latency_per_task(_LAT, _TASK), [1, 3, 5])


def test_tasks_without_programs_are_skipped_and_counted():
  nets = [
    metrics.NetworkTasks("C", np.array([0, 3]), np.array([2, 7])),
    metrics.NetworkTasks("empty", np.array([3]), np.array([1])),
  ]
  r = metrics.top_k_scores(_PRED, _LAT, _TASK, nets, ks=(1,), num_tasks=4)
  assert r.tasks_skipped.tolist() == [1, 1] and r.tasks_used.tolist() == [1, 0]
  np.testing.assert_allclose(r.per_network[0], [1 / 2])
  assert np.isnan(r.per_network[1, 0])
  # The empty network is left out of the mean and contributes nothing to the pooled ratio.
  np.testing.assert_allclose(r.mean, [0.5])
  np.testing.assert_allclose(r.pooled, [0.5])
  assert r.to_dict()["per_network"]["empty"]["top-1"] is None


def test_bad_network_task_index_raises():
  with pytest.raises(ValueError, match="refers to task"):
    metrics.top_k_scores(_PRED, _LAT, _TASK, [metrics.NetworkTasks("X", [5], [1])], ks=(1,))
  with pytest.raises(ValueError, match="weights"):
    metrics.NetworkTasks("X", [0, 1], [1])


def test_latency_from_score_matches_original_floor():
  np.testing.assert_allclose(
    metrics.latency_from_score([1.0, 0.5, 0.0], 2.0), [2.0, 4.0, 2.0 / 1e-5]
  )


def test_ties_break_by_program_index_then_nan_last():
  task = np.array([0, 0, 0, 0])
  lat = np.array([4.0, 1.0, 2.0, 3.0])
  # All predictions tied: ranking is the program order, so top-1 is program 0.
  best = metrics.best_latency_in_top_k(np.zeros(4), lat, task, ks=(1, 2))
  np.testing.assert_allclose(best, [[4.0, 1.0]])
  # Tie between programs 2 and 3 at the top (with -0.0 == 0.0): program 2 wins.
  pred = np.array([-1.0, np.nan, 0.0, -0.0])
  order, rank, _ = metrics.rank_within_tasks(pred, task)
  assert order.tolist() == [2, 3, 0, 1] and rank.tolist() == [0, 1, 2, 3]
  # Deterministic under a float32 input too.
  order32, _, _ = metrics.rank_within_tasks(pred.astype(np.float32), task)
  assert order32.tolist() == [2, 3, 0, 1]


def test_oracle_is_one():
  rng = np.random.default_rng(0)
  task = rng.integers(0, 20, size=500)
  lat = rng.choice([1e-3, 2e-3, 5e-3], size=500) * rng.integers(1, 4, size=500)  # many ties
  nets = [
    metrics.NetworkTasks(f"n{i}", rng.choice(20, 5, replace=False), rng.integers(1, 5, 5))
    for i in range(3)
  ]
  r = metrics.oracle_top_k_scores(lat, task, nets)
  np.testing.assert_array_equal(r.per_network, np.ones((3, 4)))
  np.testing.assert_array_equal(r.pooled, np.ones(4))


def _brute_force_random_best(lat, k):
  perms = list(itertools.permutations(range(len(lat))))
  return np.mean([min(lat[list(p[:k])]) for p in perms])


@pytest.mark.parametrize(
  "lat",
  [
    [1.0, 2.0, 4.0],
    [3.0, 1.0, 1.0, 7.0, 2.0],
    [5.0, 5.0, 5.0, 1.0],
    [2.0, 9.0, 4.0, 8.0, 6.0, 1.0],
  ],
)
def test_random_expectation_matches_enumeration_of_all_orderings(lat):
  lat = np.array(lat)
  ks = tuple(range(1, len(lat) + 2))
  got = metrics.expected_random_best_latency(lat, np.zeros(len(lat), int), ks=ks)[0]
  want = [_brute_force_random_best(lat, k) for k in ks]
  np.testing.assert_allclose(got, want, rtol=1e-12)


def test_random_expectation_hand_values():
  got = metrics.expected_random_best_latency(
    np.array([1.0, 2.0, 4.0]), np.zeros(3, int), ks=(1, 2, 3)
  )
  np.testing.assert_allclose(got, [[7 / 3, 4 / 3, 1.0]])


def test_random_network_score_is_ratio_to_expected_latency():
  # Two tasks, enumerate all joint orderings: the denominator is the expected weighted latency.
  lat = np.array([1.0, 2.0, 4.0, 3.0, 6.0])
  task = np.array([0, 0, 0, 1, 1])
  net = [metrics.NetworkTasks("A", [0, 1], [2, 1])]
  r = metrics.random_top_k_scores(lat, task, net, ks=(1, 2))
  for j, k in enumerate((1, 2)):
    dens = [
      2 * min(lat[list(p[:k])]) + 1 * min(lat[3 + np.array(q[:k])])
      for p in itertools.permutations(range(3))
      for q in itertools.permutations(range(2))
    ]
    np.testing.assert_allclose(r.per_network[0, j], (2 * 1 + 3) / np.mean(dens), rtol=1e-12)


def test_random_expectation_monte_carlo():
  rng = np.random.default_rng(1)
  n, k, draws = 300, 10, 20000
  lat = rng.lognormal(size=n)
  got = metrics.expected_random_best_latency(lat, np.zeros(n, int), ks=(k,))[0, 0]
  samples = np.array([lat[rng.permutation(n)[:k]].min() for _ in range(draws)])
  se = samples.std() / np.sqrt(draws)
  assert abs(samples.mean() - got) < 5 * se


def test_random_expectation_large_task_is_finite():
  # TenSet tasks have up to 4000 programs; the log-factorial path must not overflow.
  lat = np.linspace(1.0, 2.0, 4000)
  got = metrics.expected_random_best_latency(lat, np.zeros(4000, int), ks=(1, 20, 4000))[0]
  np.testing.assert_allclose(got[0], 1.5, rtol=1e-9)
  assert 1.0 < got[1] < got[0] and got[2] == pytest.approx(1.0)


def _naive_best(pred, lat, task, ks, num_tasks):
  out = np.full((num_tasks, len(ks)), np.nan)
  for t in range(num_tasks):
    idx = np.flatnonzero(task == t)
    if idx.size == 0:
      continue
    ranked = sorted(idx, key=lambda i: (-pred[i], i))
    for j, k in enumerate(ks):
      out[t, j] = min(lat[ranked[:k]])
  return out


@settings(max_examples=60, deadline=None)
@given(
  st.lists(
    st.tuples(st.integers(0, 5), st.integers(0, 4), st.integers(1, 9)), min_size=1, max_size=40
  )
)
def test_vectorised_ranking_matches_naive(rows):
  task = np.array([r[0] for r in rows])
  pred = np.array([r[1] for r in rows], dtype=np.float64)  # small range: many ties
  lat = np.array([r[2] for r in rows], dtype=np.float64)
  ks = (1, 2, 5)
  got = metrics.best_latency_in_top_k(pred, lat, task, ks, num_tasks=6)
  np.testing.assert_array_equal(got, _naive_best(pred, lat, task, ks, 6))


def test_quick_top_k_hand_values_and_heads():
  mins = metrics.min_latency_per_task(_LAT, _TASK)[_TASK]
  score = mins / _LAT
  q = metrics.quick_top_ks(_PRED, score, _TASK, ks=(1, 2))
  # task scores of the top-1: 0.5, 0.5, 0.25; best in top-2: 0.5, 1, 1.
  assert q[1] == pytest.approx((0.5 + 0.5 + 0.25) / 3)
  assert q[2] == pytest.approx(2.5 / 3)
  assert metrics.quick_top_k(_PRED, score, _TASK, k=2) == pytest.approx(2.5 / 3)
  # Two heads; the second masks out program 3 (task 0's top-1), so task 0's top-1 becomes
  # program 6 (pred 0.5, score 0.25).
  mask = np.ones((9, 2), bool)
  mask[3, 1] = False
  q2 = metrics.quick_top_k(
    np.stack([_PRED, _PRED], 1), np.stack([score, score], 1), _TASK, k=1, mask=mask
  )
  np.testing.assert_allclose(q2, [(0.5 + 0.5 + 0.25) / 3, (0.25 + 0.5 + 0.25) / 3])


def test_quick_top_k_matches_full_metric_per_task():
  rng = np.random.default_rng(3)
  task = rng.integers(0, 30, 2000)
  lat = rng.lognormal(size=2000)
  pred = rng.normal(size=2000)
  mins = metrics.min_latency_per_task(lat, task)
  best = metrics.best_latency_in_top_k(pred, lat, task, ks=(1, 5))
  want = (mins[:, None] / best).mean(axis=0)
  q = metrics.quick_top_ks(pred, mins[task] / lat, task, ks=(1, 5))
  np.testing.assert_allclose([q[1], q[5]], want, rtol=1e-12)


def test_quick_top_k_is_normalised_within_the_given_programs():
  """Scores normalised over a larger set (each task's best over all splits) are renormalised by
  the task's best among the programs given: a perfect ranking scores 1.0 on any split."""
  rng = np.random.default_rng(0)
  task = rng.integers(0, 20, 500)
  lat = rng.lognormal(size=500)
  mins = metrics.min_latency_per_task(lat, task)
  split = rng.random(500) < 0.3  # a validation split: most tasks miss their best program
  score = (mins[task] / lat)[split]
  in_split = metrics.min_latency_per_task(lat[split], task[split], 20)
  assert np.sum(in_split > mins) >= 5  # most tasks' best program is not in the split
  q = metrics.quick_top_ks(score, score, task[split], ks=(1, 5))
  assert q[1] == pytest.approx(1.0) and q[5] == pytest.approx(1.0)
  # The same ranking on scores of any per-task scale gives the same values.
  scale = rng.uniform(0.1, 1.0, 20)[task[split]]
  pred = rng.normal(size=score.shape)
  a = metrics.quick_top_ks(pred, score, task[split], ks=(1, 5))
  b = metrics.quick_top_ks(pred, score * scale, task[split], ks=(1, 5))
  np.testing.assert_allclose([a[1], a[5]], [b[1], b[5]], rtol=1e-12)
  # A task whose best score is 0 (no finite latency) is left out, not a NaN mean.
  zero = np.where(task[split] == task[split][0], 0.0, score)
  assert np.isfinite(metrics.quick_top_k(pred, zero, task[split], k=1))
