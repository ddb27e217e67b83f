"""The log-scale losses (this project's additions to TLP's LambdaRank/MSE), checked by hand."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tlp_jax.train import losses


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


def test_listwise_log_matches_hand_computation():
  """Two groups: cross-entropy of softmax(preds) against softmax(log(y) / T), averaged."""
  cfg = losses.LossConfig("listwise_log", group_by_task=True, temperature=0.5)
  preds = np.array([0.3, -0.2, 1.0, 2.0, 0.0, 7.0])
  labels = np.array([1.0, 0.5, 0.1, 1.0, 0.25, 1.0])
  task = np.array([0, 0, 0, 1, 1, 2])  # task 2 has one program: no ranking, no loss
  expected = []
  for t in (0, 1):
    sel = task == t
    q = labels[sel] ** (1 / 0.5)
    q /= q.sum()
    log_p = preds[sel] - np.log(np.exp(preds[sel]).sum())
    expected.append(-(q * log_p).sum())
  got = losses.multi_head_loss(cfg, jnp.array(preds)[:, None], jnp.array(labels)[:, None],
                               jnp.ones((6, 1), bool), jnp.array(task))
  assert float(got) == pytest.approx(np.mean(expected), rel=1e-5)


def test_listwise_log_is_stable_for_large_scores_and_ignores_masked_rows():
  cfg = losses.LossConfig("listwise_log", group_by_task=True)
  preds = jnp.array([[1e4], [-1e4], [3.0]])
  labels = jnp.array([[1.0], [0.5], [jnp.nan]])
  mask = jnp.array([[True], [True], [False]])
  loss, grad = jax.value_and_grad(
      lambda p: losses.multi_head_loss(cfg, p, labels, mask, jnp.zeros(3, jnp.int32)))(preds)
  # Target (2/3, 1/3); the model puts all mass on row 0: loss = -(1/3) * log p_1 = (1/3) * 2e4.
  assert float(loss) == pytest.approx(2e4 / 3, rel=1e-5)
  assert np.all(np.isfinite(np.asarray(grad))) and float(grad[2, 0]) == 0.0


def test_centered_mse_log_ignores_a_per_task_offset():
  cfg = losses.LossConfig("centered_mse_log", group_by_task=True)
  labels = jnp.array([[1.0], [0.1], [1.0], [0.5]])
  task = jnp.array([0, 0, 1, 1])
  mask = jnp.ones((4, 1), bool)
  exact = jnp.log(labels) + jnp.array([[3.0], [3.0], [-2.0], [-2.0]])  # offset per task
  assert float(losses.multi_head_loss(cfg, exact, labels, mask, task)) == pytest.approx(
      0.0, abs=1e-10)
  # Residuals (r0, r1) = (0, 1) in task 0 and 0 in task 1: centred error +-0.5 on 2 of 4 rows.
  off = exact.at[1, 0].add(1.0)
  assert float(losses.multi_head_loss(cfg, off, labels, mask, task)) == pytest.approx(
      (0.25 + 0.25) / 4, rel=1e-6)


def test_non_positive_temperature_rejected():
  with pytest.raises(ValueError, match="temperature"):
    losses.LossConfig("listwise_log", temperature=0.0)


@pytest.mark.parametrize("name", ["pairwise_log", "mse_log", "listwise_log", "centered_mse_log"])
def test_log_losses_prefer_the_faster_program(name):
  """A gradient step on the loss must move the faster program's score above the slower one's."""
  cfg = losses.LossConfig(name)
  labels = jnp.array([[0.01], [1.0]])
  mask = jnp.ones((2, 1), bool)
  preds = jnp.array([[1.0], [-1.0]])  # wrong order, and both off their log-score targets
  grad = jax.grad(lambda p: losses.multi_head_loss(cfg, p, labels, mask))(preds)
  assert float(grad[0, 0]) > 0 > float(grad[1, 0])
  assert np.all(np.isfinite(np.asarray(grad)))


def test_aux_loss_adds_a_weighted_second_loss_with_its_own_grouping():
  preds = jnp.array([[0.2], [1.0], [-0.5], [0.7]])
  labels = jnp.array([[1.0], [0.3], [1.0], [0.6]])
  mask = jnp.ones((4, 1), bool)
  task = jnp.array([0, 0, 1, 1])
  within = losses.LossConfig("pairwise_log", group_by_task=True)
  whole = losses.LossConfig("lambdarank", group_by_task=False)
  mixed = losses.LossConfig("pairwise_log", group_by_task=True, aux_name="lambdarank",
                            aux_weight=0.25, aux_group_by_task=False)
  expected = (losses.multi_head_loss(within, preds, labels, mask, task)
              + 0.25 * losses.multi_head_loss(whole, preds, labels, mask, task))
  got = losses.multi_head_loss(mixed, preds, labels, mask, task)
  assert float(got) == pytest.approx(float(expected), rel=1e-6)
  # The whole-batch term sees cross-task pairs: it differs from its grouped version here.
  grouped = losses.LossConfig("lambdarank", group_by_task=True)
  assert float(losses.multi_head_loss(grouped, preds, labels, mask, task)) != pytest.approx(
      float(losses.multi_head_loss(whole, preds, labels, mask, task)))


def test_unknown_aux_loss_rejected():
  with pytest.raises(ValueError, match="unknown loss"):
    losses.LossConfig("pairwise_log", aux_name="hinge", aux_weight=1.0)
