"""The log-scale losses (this project's additions to TLP's LambdaRank/MSE), checked by hand."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tlp_jax import losses


def _log_sigmoid(x):
  return -math.log1p(math.exp(-x))


def test_pairwise_log_matches_hand_computation():
  preds, labels = [0.0, 1.0, 0.5], [1.0, 0.5, 0.1]
  # Pairs (i better than j) and their weights log(y_i / y_j), worked out by hand.
  pairs = [(0, 1, math.log(2.0)), (0, 2, math.log(10.0)), (1, 2, math.log(5.0))]
  expected = -sum(w * _log_sigmoid(preds[i] - preds[j]) for i, j, w in pairs)
  expected /= sum(w for _, _, w in pairs)
  got = losses.pairwise_log_head(jnp.array(preds), jnp.array(labels), jnp.ones(3, bool),
                                 jnp.zeros(3, jnp.int32), losses.LossConfig("pairwise_log"))
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


def test_mse_log_regresses_log_scores():
  preds = jnp.array([[0.0], [-1.0], [5.0]])
  labels = jnp.array([[1.0], [0.1], [0.5]])
  mask = jnp.array([[True], [True], [False]])
  got = losses.multi_head_loss(losses.LossConfig("mse_log"), preds, labels, mask)
  expected = ((0.0 - 0.0) ** 2 + (-1.0 - math.log(0.1)) ** 2) / 2
  assert float(got) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("name", ["pairwise_log", "mse_log"])
def test_log_losses_prefer_the_faster_program(name):
  """A gradient step on the loss must move the faster program's score above the slower one's."""
  cfg = losses.LossConfig(name)
  labels = jnp.array([[0.01], [1.0]])
  mask = jnp.ones((2, 1), bool)
  preds = jnp.array([[1.0], [-1.0]])  # wrong order, and both off their log-score targets
  grad = jax.grad(lambda p: losses.multi_head_loss(cfg, p, labels, mask))(preds)
  assert float(grad[0, 0]) > 0 > float(grad[1, 0])
  assert np.all(np.isfinite(np.asarray(grad)))
