"""tlp_jax.train.losses: LambdaRank against hand arithmetic and a NumPy port of TLP's formula;
MSE; this project's pairwise_log by hand."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tlp_jax.train import losses


def _lambdarank_reference(preds, labels, k=None, eps=1e-10, sigma=1.0):
  """TLP's LambdaRankLoss.forward transcribed to NumPy (sort-based, one list)."""
  preds = np.asarray(preds, np.float64)[None, :]
  labels = np.asarray(labels, np.float64)[None, :]
  n = preds.shape[1]
  order = np.argsort(-preds, axis=-1, kind="stable")
  y_pred_sorted = np.take_along_axis(preds, order, axis=1)
  y_true_sorted = -np.sort(-labels, axis=-1)
  true_by_pred = np.take_along_axis(labels, order, axis=1)
  true_diffs = true_by_pred[:, :, None] - true_by_pred[:, None, :]
  pair_mask = np.isfinite(true_diffs) & (true_diffs > 0)
  kk = n if k is None else k
  at_k = np.zeros((n, n), bool)
  at_k[:kk, :kk] = True
  true_by_pred = np.maximum(true_by_pred, 0)
  y_true_sorted = np.maximum(y_true_sorted, 0)
  d = np.log2(1.0 + np.arange(1, n + 1))[None, :]
  max_dcg = np.maximum(np.sum(((2.0**y_true_sorted - 1) / d)[:, :kk], axis=-1), eps)
  g = (2.0**true_by_pred - 1) / max_dcg[:, None]
  w = np.abs(1 / d[:, :, None] - 1 / d[:, None, :]) * np.abs(g[:, :, None] - g[:, None, :])
  diffs = np.clip(y_pred_sorted[:, :, None] - y_pred_sorted[:, None, :], -1e8, 1e8)
  diffs[np.isnan(diffs)] = 0
  with np.errstate(over="ignore"):  # exp overflow -> sigmoid 0 -> eps clamp, as in torch
    probs = np.maximum(np.maximum(1 / (1 + np.exp(-sigma * diffs)), eps) ** w, eps)
  return -np.sum(np.log2(probs)[pair_mask & at_k])


def _loss(name="lambdarank", group_by_task=False, **kw):
  return losses.LossConfig(name, group_by_task, **kw)


def _one_head(preds, labels, mask=None, task_index=None, **cfg):
  preds = jnp.asarray(preds, jnp.float32)[:, None]
  labels = jnp.asarray(labels, jnp.float32)[:, None]
  mask = jnp.ones_like(preds, bool) if mask is None else jnp.asarray(mask)[:, None]
  return float(
    losses.multi_head_loss(
      _loss(**cfg), preds, labels, mask, None if task_index is None else jnp.asarray(task_index)
    )
  )


def test_lambdarank_hand_computed_four_items():
  s = [0.3, -0.2, 0.9, 0.1]
  y = [1.0, 0.5, 0.0, 0.0]
  # Ranked by prediction: item2 (pos 1), item0 (pos 2), item3 (pos 3), item1 (pos 4).
  inv_d = {2: 1.0, 0: 1 / math.log2(3), 3: 1 / math.log2(4), 1: 1 / math.log2(5)}
  # Ideal order: item0 (gain 1), item1 (gain sqrt(2)-1), then zero gains.
  max_dcg = 1.0 / 1.0 + (math.sqrt(2) - 1) / math.log2(3)
  g = {0: 1.0 / max_dcg, 1: (math.sqrt(2) - 1) / max_dcg, 2: 0.0, 3: 0.0}
  expected = 0.0
  for i, j in [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3)]:  # pairs with y_i > y_j
    w = abs(inv_d[i] - inv_d[j]) * abs(g[i] - g[j])
    expected -= w * math.log2(1 / (1 + math.exp(-(s[i] - s[j]))))
  assert _one_head(s, y) == pytest.approx(expected, rel=1e-5)


def test_lambdarank_hand_computed_three_items():
  # preds rank item2, item1, item0; only item0 has gain, so maxDCG = 1 and G = (1, 0, 0).
  s, y = [0.0, 1.0, 2.0], [1.0, 0.0, 0.0]
  w01 = abs(1 / 2 - 1 / math.log2(3))
  w02 = abs(1 / 2 - 1)
  expected = -(w01 * math.log2(1 / (1 + math.exp(1.0))) + w02 * math.log2(1 / (1 + math.exp(2.0))))
  assert _one_head(s, y) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("k", [None, 5])
def test_lambdarank_matches_numpy_reference(seed, k):
  rng = np.random.default_rng(seed)
  n = 37
  preds = rng.normal(size=n) * 3
  labels = rng.uniform(size=n)
  labels[rng.integers(0, n, 5)] = 0.0  # ties in the labels
  expected = _lambdarank_reference(preds, labels, k=k)
  assert _one_head(preds, labels, k=k) == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_lambdarank_saturated_pairs_hit_eps_clamp():
  # Huge wrong-way gaps make sigmoid underflow: the original clamps at eps, so the loss is finite.
  preds = np.array([-1e4, 0.0, 1e4])
  labels = np.array([1.0, 0.5, 0.0])
  got = _one_head(preds, labels)
  assert np.isfinite(got)
  assert got == pytest.approx(_lambdarank_reference(preds, labels), rel=1e-4)


def test_masked_labels_are_ignored():
  rng = np.random.default_rng(0)
  preds = rng.normal(size=20)
  labels = rng.uniform(size=20)
  mask = rng.uniform(size=20) > 0.4
  garbage = labels.copy()
  garbage[~mask] = np.nan
  for name in ("lambdarank", "mse"):
    full = _one_head(preds[mask], labels[mask], name=name)
    masked = _one_head(preds, garbage, mask=mask, name=name)
    assert masked == pytest.approx(full, rel=1e-5), name
    # Changing masked predictions must not change the loss either.
    preds2 = preds.copy()
    preds2[~mask] = 100.0
    assert _one_head(preds2, garbage, mask=mask, name=name) == pytest.approx(full, rel=1e-5)


def test_group_ranking_is_sum_of_per_group_losses():
  rng = np.random.default_rng(1)
  preds = rng.normal(size=30)
  labels = rng.uniform(size=30)
  groups = rng.integers(0, 4, size=30)
  expected = sum(
    _lambdarank_reference(preds[groups == t], labels[groups == t]) for t in np.unique(groups)
  )
  got = _one_head(preds, labels, task_index=groups, group_by_task=True)
  assert got == pytest.approx(expected, rel=1e-4)
  # Default ranks across the whole batch: a different number.
  assert _one_head(preds, labels, task_index=groups) != pytest.approx(expected, rel=1e-3)


def test_group_ranking_requires_task_index():
  with pytest.raises(ValueError, match="task_index"):
    _one_head([0.0, 1.0], [1.0, 0.0], group_by_task=True)


def test_heads_are_summed_with_their_own_masks():
  rng = np.random.default_rng(2)
  preds = rng.normal(size=(16, 3)).astype(np.float32)
  labels = rng.uniform(size=(16, 3)).astype(np.float32)
  mask = rng.uniform(size=(16, 3)) > 0.3
  total = float(losses.multi_head_loss(_loss(), preds, labels, mask))
  expected = sum(
    _lambdarank_reference(preds[mask[:, h], h], labels[mask[:, h], h]) for h in range(3)
  )
  assert total == pytest.approx(expected, rel=1e-4)


def test_mse_matches_mean_squared_error():
  preds = np.array([1.0, 2.0, 3.0])
  labels = np.array([1.5, 2.0, 1.0])
  assert _one_head(preds, labels, name="mse") == pytest.approx((0.25 + 0 + 4) / 3, rel=1e-6)


def test_loss_is_jittable_and_differentiable():
  fn = jax.jit(functools.partial(losses.multi_head_loss, _loss(group_by_task=True)))
  rng = np.random.default_rng(3)
  preds = jnp.asarray(rng.normal(size=(8, 2)), jnp.float32)
  labels = jnp.asarray(rng.uniform(size=(8, 2)), jnp.float32)
  mask = jnp.asarray(rng.uniform(size=(8, 2)) > 0.2)
  tasks = jnp.asarray([0, 0, 0, 1, 1, 1, 2, 2])
  grad = jax.grad(lambda p: fn(p, labels, mask, tasks))(preds)
  assert grad.shape == preds.shape
  assert np.all(np.isfinite(np.asarray(grad)))
  assert np.all(np.asarray(grad)[~np.asarray(mask)] == 0)
  assert np.any(np.asarray(grad) != 0)


def test_unknown_loss_name():
  with pytest.raises(ValueError, match="unknown loss"):
    _loss(name="hinge")
  for removed in ("mse_log", "listwise_log", "centered_mse_log"):
    with pytest.raises(ValueError, match="unknown loss"):
      _loss(name=removed)


# ---- pairwise_log (not in TLP) ----


def _log_sigmoid(x):
  return -math.log1p(math.exp(-x))


def test_pairwise_log_matches_hand_computation():
  preds, labels = [0.0, 1.0, 0.5], [1.0, 0.5, 0.1]
  # Pairs (i better than j) and their weights log(y_i / y_j), worked out by hand.
  pairs = [(0, 1, math.log(2.0)), (0, 2, math.log(10.0)), (1, 2, math.log(5.0))]
  expected = -sum(w * _log_sigmoid(preds[i] - preds[j]) for i, j, w in pairs)
  expected /= sum(w for _, _, w in pairs)
  got = losses.pairwise_log_head(
    jnp.array(preds),
    jnp.array(labels),
    jnp.ones(3, bool),
    jnp.zeros(3, jnp.int32),
    _loss("pairwise_log"),
  )
  assert float(got) == pytest.approx(expected, rel=1e-6)


def test_pairwise_log_ignores_masked_labels_and_other_groups():
  cfg = losses.LossConfig("pairwise_log", group_by_task=True)
  preds = jnp.array([0.0, 1.0, 3.0, -2.0])
  labels = jnp.array([1.0, 0.25, 1.0, jnp.nan])  # the NaN label is masked out
  mask = jnp.array([[True], [True], [True], [False]])
  task = jnp.array([0, 0, 1, 0])
  got = losses.multi_head_loss(cfg, preds[:, None], labels[:, None], mask, task)
  # Only the pair (0, 1) is comparable: same task, both present.
  assert float(got) == pytest.approx(-_log_sigmoid(0.0 - 1.0), rel=1e-6)


@pytest.mark.parametrize("name", ["lambdarank", "mse", "pairwise_log"])
def test_losses_prefer_the_faster_program(name):
  """A gradient step on the loss must move the faster program's score above the slower one's."""
  cfg = losses.LossConfig(name, group_by_task=False)
  labels = jnp.array([[0.01], [1.0]])
  mask = jnp.ones((2, 1), bool)
  preds = jnp.array([[1.0], [-1.0]])  # wrong order, and both off their targets
  grad = jax.grad(lambda p: losses.multi_head_loss(cfg, p, labels, mask))(preds)
  assert float(grad[0, 0]) > 0 > float(grad[1, 0])
  assert np.all(np.isfinite(np.asarray(grad)))
