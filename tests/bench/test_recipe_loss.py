"""bench.train_throughput's block-diagonal pairwise_log (a measured lever): the library's loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bench import train_throughput as tt
from tlp_jax.train import losses


def _task_batch(seed, n=96, tasks=9, shuffled=True):
  rng = np.random.default_rng(seed)
  groups = rng.integers(0, tasks, n)
  if not shuffled:
    groups = np.sort(groups)
  labels = rng.random(n).astype(np.float32)
  labels[rng.random(n) < 0.1] = labels[0]  # ties give zero-weight pairs
  valid = rng.random(n) > 0.15
  labels[~valid] = np.nan  # absent labels may hold anything
  preds = rng.normal(size=n).astype(np.float32)
  return jnp.asarray(preds), jnp.asarray(labels), jnp.asarray(valid), jnp.asarray(groups)


@pytest.mark.parametrize("shuffled", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_band_equals_the_library_loss_and_gradient(seed, shuffled):
  preds, labels, valid, groups = _task_batch(seed, shuffled=shuffled)
  cfg = losses.LossConfig("pairwise_log", group_by_task=True)

  def dense(p):
    return losses.pairwise_log_head(p, labels, valid, groups, cfg)

  want, want_grad = jax.value_and_grad(dense)(preds)
  biggest = tt.max_group_size(np.asarray(groups)[np.asarray(valid)])
  for window in (biggest - 1, biggest + 4, 10**6):
    band = tt.band_loss_config(cfg, window)

    def banded(p, band=band):
      return losses.LOSSES[band.name](p, labels, valid, groups, band)

    got, grad = jax.value_and_grad(banded)(preds)
    assert float(got) == pytest.approx(float(want), rel=1e-5)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(want_grad), rtol=1e-4, atol=1e-7)


def test_band_narrower_than_a_task_misses_pairs():
  preds = jnp.array([0.3, -1.0, 2.0, 0.5, 0.1, -0.4])
  labels = jnp.array([1.0, 0.5, 0.1, 0.2, 0.9, 0.4])
  groups = jnp.array([1, 0, 1, 0, 1, 0])
  valid = jnp.ones(6, bool)
  cfg = losses.LossConfig("pairwise_log", group_by_task=True)
  want = float(losses.pairwise_log_head(preds, labels, valid, groups, cfg))
  assert tt.max_group_size(np.asarray(groups)) == 3
  exact, short = (tt.band_loss_config(cfg, w) for w in (2, 1))
  assert float(tt.losses_lib.LOSSES[exact.name](preds, labels, valid, groups, exact)) == (
    pytest.approx(want, rel=1e-6)
  )
  assert float(tt.losses_lib.LOSSES[short.name](preds, labels, valid, groups, short)) != (
    pytest.approx(want, rel=1e-3)
  )
